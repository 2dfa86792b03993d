"""The audit report: its inputs and the HTML page."""

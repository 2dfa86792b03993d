"""Validation sets as dynamic partitions: one per dataset directory under
``data/validation_sets/<name>/`` (DESIGN, Dagster and DVC together)."""
import dagster as dg

VALIDATION_SETS = "validation_sets"

validation_sets = dg.DynamicPartitionsDefinition(name=VALIDATION_SETS)

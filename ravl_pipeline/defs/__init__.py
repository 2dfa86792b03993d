"""Dagster definitions of the RaVL pipeline, loaded by ``load_from_defs_folder``."""

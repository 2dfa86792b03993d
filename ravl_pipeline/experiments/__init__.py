"""Synthetic settings, the recipe of the built-in audited model, image-level\nbaselines and the benchmarks."""

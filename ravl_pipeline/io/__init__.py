"""Files in and out: atomic writes and folder swaps, Parquet helpers, content
hashes, the dataset manifest, datasets and importers (the bottom layer)."""

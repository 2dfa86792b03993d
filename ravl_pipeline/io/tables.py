"""Matrices in Parquet: one fixed-size list column per ``[N, D]`` array.

Embeddings, probabilities and boxes are stored this way everywhere, so any
Parquet reader sees one row per image or region with its vector.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["fixed_list", "matrix"]


def fixed_list(arr: np.ndarray) -> pa.FixedSizeListArray:
    """A float32 ``[N, D]`` array as a column of ``N`` lists of ``D`` values."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def matrix(col) -> np.ndarray:
    """The float32 ``[N, D]`` array of a fixed-size list column."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    width = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)

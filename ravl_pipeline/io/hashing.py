"""Content digests: of files, of JSON values and of dataset directories.

A result is traced to its inputs by what they contain, never by a name or a
timestamp: a changed validation set must make only its own results stale,
and a copied checkpoint must share its cached embeddings.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .manifest import MANIFEST_NAME, read_manifest

__all__ = ["file_sha256", "memo_file_sha256", "json_sha256", "dvc_md5", "dataset_fingerprint"]

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# Digests keyed by (path, size, mtime): a checkpoint or image is hashed once
# per process however often it is asked for.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def memo_file_sha256(path: str | os.PathLike) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = file_sha256(path)
    return _FILE_DIGESTS[key]


def json_sha256(obj: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def dvc_md5(dataset_dir: Path) -> str | None:
    """The md5 DVC recorded for this directory (``<dir>.dvc`` beside it), if any."""
    dvc_file = dataset_dir.with_name(dataset_dir.name + ".dvc")
    if not dvc_file.is_file():
        return None
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    except yaml.YAMLError:
        return None
    md5 = outs[0].get("md5") if outs and isinstance(outs[0], dict) else None
    return f"dvc-{md5}" if md5 else None


def dataset_fingerprint(dataset_dir: str | os.PathLike) -> str:
    """Content hash of a dataset directory: DVC's md5 when DVC tracks it,
    else the manifest bytes and the bytes of every image it references, in
    manifest order."""
    dataset_dir = Path(dataset_dir)
    recorded = dvc_md5(dataset_dir)
    if recorded:
        return recorded
    digest = hashlib.sha256()
    digest.update((dataset_dir / MANIFEST_NAME).read_bytes())
    for rel in read_manifest(dataset_dir).column("path").to_pylist():
        image = dataset_dir / rel
        digest.update(rel.encode())
        digest.update(image.read_bytes() if image.is_file() else b"<missing>")
    return digest.hexdigest()[:24]

"""Where the pipeline reads and writes: the ``ravl`` resource.

Every asset, check, sensor and observation finds its files through
:class:`RavlProject`, so a test points the whole graph at a temporary folder
by handing in another instance of it. Layout under ``data_dir``::

    validation_sets/<name>/      one dataset directory per validation set (a partition)
    default_setting/             the built-in synthetic setting and its models
    outputs/audited_model.json   which model is audited (written by the asset)
    outputs/<name>/...           everything computed for one validation set
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from ..ml.data import MANIFEST_NAME, read_manifest, replace_dir
from ..ml.params import PARAMS_NAME, load_params

PARTITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def project_root() -> Path:
    """The repository holding this package when installed in development mode
    (it has ``pyproject.toml``), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def default_data_dir() -> Path:
    return Path(os.environ.get("RAVL_DATA_DIR") or project_root() / "data")


def default_params_path() -> Path:
    return Path(os.environ.get("RAVL_PARAMS") or project_root() / PARAMS_NAME)


class RavlProject(dg.ConfigurableResource):
    """Data folder and parameters file of one pipeline deployment."""

    data_dir: str
    params_path: str

    @classmethod
    def from_env(cls) -> "RavlProject":
        return cls(data_dir=str(default_data_dir()), params_path=str(default_params_path()))

    # ------------------------------------------------------------------ inputs
    def params(self) -> dict[str, dict[str, Any]]:
        return load_params(self.params_path)

    @property
    def validation_root(self) -> Path:
        return Path(self.data_dir) / "validation_sets"

    def validation_set_dir(self, name: str) -> Path:
        path = self.validation_root / name
        if not (path / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"validation set {name!r}: no {MANIFEST_NAME} in {path}")
        return path

    def validation_set_names(self) -> list[str]:
        """Directories under ``validation_sets/`` that hold a manifest."""
        return list_validation_sets(self.validation_root)

    # ----------------------------------------------------------------- outputs
    @property
    def outputs_root(self) -> Path:
        return Path(self.data_dir) / "outputs"

    def output_dir(self, partition: str) -> Path:
        out = self.outputs_root / partition
        out.mkdir(parents=True, exist_ok=True)
        return out

    @property
    def audited_record_path(self) -> Path:
        return self.outputs_root / "audited_model.json"

    @property
    def default_setting_dir(self) -> Path:
        return Path(self.data_dir) / "default_setting"


def list_validation_sets(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
                  and PARTITION_NAME.match(p.name))


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


def dataset_fingerprint(dataset_dir: Path) -> str:
    """Content hash of a dataset directory: the manifest bytes and the bytes of
    every image it references, in manifest order (DESIGN: a changed set must
    make only its own downstream stale; timestamps would not be content)."""
    recorded = dvc_md5(dataset_dir)
    if recorded:
        return recorded
    digest = hashlib.sha256()
    manifest = dataset_dir / MANIFEST_NAME
    digest.update(manifest.read_bytes())
    for rel in read_manifest(dataset_dir).column("path").to_pylist():
        image = dataset_dir / rel
        digest.update(rel.encode())
        digest.update(image.read_bytes() if image.is_file() else b"<missing>")
    return digest.hexdigest()[:24]


def copy_dataset_dir(src: Path, target: Path, extra_files: tuple[Path, ...] = ()) -> Path:
    """Copy a dataset directory (plus ``extra_files``) into ``target``
    atomically: built beside it, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged = tmp / "set"
        shutil.copytree(src, staged)
        for extra in extra_files:
            shutil.copy2(extra, staged / extra.name)
        replace_dir(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield an empty folder beside ``target``; on success it replaces
    ``target`` in one rename, on failure it is removed and ``target`` (the
    previous materialization) is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

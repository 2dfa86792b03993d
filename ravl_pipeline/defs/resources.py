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

import os
import re
from pathlib import Path

import dagster as dg

from ..config import PARAMS_NAME, Params, load_params
from ..io.manifest import MANIFEST_NAME
from ..pipeline import Audit

PARTITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Where `ravl ui` serves the reports (data/outputs/<set>/report/) to the browser.
REPORTS_URL_ENV = "RAVL_REPORTS_URL"
DEFAULT_REPORTS_URL = "http://127.0.0.1:3001"


def report_url(partition: str) -> str:
    """The address of a set's report.html, as the asset page links it."""
    base = (os.environ.get(REPORTS_URL_ENV) or DEFAULT_REPORTS_URL).rstrip("/")
    return f"{base}/{partition}/report/report.html"


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
    def params(self) -> Params:
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

    @property
    def audited_record_path(self) -> Path:
        return self.outputs_root / "audited_model.json"

    @property
    def default_setting_dir(self) -> Path:
        return Path(self.data_dir) / "default_setting"

    def audit(self, partition: str) -> Audit:
        """The audit of one validation set, with the current parameters."""
        return Audit(partition, self.validation_set_dir(partition), self.outputs_root / partition, self.params(),
                     self.audited_record_path)


def list_validation_sets(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
                  and PARTITION_NAME.match(p.name))

"""Observable source assets: what the pipeline reads but does not make.

* ``validation_set`` — one data version per partition from the set's content
  (the ``.dvc`` md5 when DVC tracks it, else a hash of the manifest and image
  bytes), so a changed set makes only its own downstream stale;
* ``params_<section>`` — one source per ``params.yaml`` section with the
  section's hash as data version, so changing a parameter makes exactly the
  assets that read that section (and their downstream) stale; a key that
  only some of a section's readers use (``mitigation.control``) is a source
  of its own (``params_control``).
"""

import warnings

import dagster as dg

from ..config import PARAMS_SOURCE_NAMES, SPLIT_KEYS, section_values, section_version
from ..io.hashing import dataset_fingerprint
from .partitions import validation_sets
from .resources import RavlProject

# observable source assets are the documented way to version external data
# (DESIGN); their beta label is no news to anyone reading the run logs
warnings.filterwarnings("ignore", category=dg.BetaWarning)


def set_versions(ravl: RavlProject, known: set[str]) -> dict[str, str]:
    """Content version of every registered validation set on disk."""
    return {name: dataset_fingerprint(ravl.validation_root / name)
            for name in ravl.validation_set_names() if name in known}


def params_observation(ravl: RavlProject, section: str) -> tuple[str, dict]:
    """Data version and metadata of one ``params.yaml`` section."""
    params = ravl.params()
    values = section_values(params, section)
    if not isinstance(values, dict):  # one key observed apart (SPLIT_KEYS): shown under its name
        values = {SPLIT_KEYS[section][1]: values}
    return section_version(params, section), {"values": dg.MetadataValue.json(values),
                                              "path": dg.MetadataValue.path(ravl.params_path)}


@dg.observable_source_asset(partitions_def=validation_sets, group_name="sources",
                            description="A labelled validation set (dataset directory, SPEC §5).")
def validation_set(context, ravl: RavlProject) -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(
        set_versions(ravl, set(context.instance.get_dynamic_partitions(validation_sets.name))))


def _params_source(section: str) -> dg.SourceAsset:
    what = (f"The `{section}` section of params.yaml" if section not in SPLIT_KEYS
            else f"`{'.'.join(SPLIT_KEYS[section])}` in params.yaml (observed apart from its section)")

    @dg.observable_source_asset(name=f"params_{section}", group_name="params", description=f"{what}.")
    def _observe(ravl: RavlProject) -> dg.ObserveResult:
        version, metadata = params_observation(ravl, section)
        return dg.ObserveResult(data_version=dg.DataVersion(version), metadata=metadata)

    return _observe


PARAMS_SOURCES = {section: _params_source(section) for section in PARAMS_SOURCE_NAMES}
params_audited_model = PARAMS_SOURCES["audited_model"]
params_regions = PARAMS_SOURCES["regions"]
params_labels = PARAMS_SOURCES["labels"]
params_scores = PARAMS_SOURCES["scores"]
params_discovery = PARAMS_SOURCES["discovery"]
params_mitigation = PARAMS_SOURCES["mitigation"]
params_evaluation = PARAMS_SOURCES["evaluation"]
params_control = PARAMS_SOURCES["control"]

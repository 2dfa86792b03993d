"""The audited model: shared by every validation set, so unpartitioned."""
import hashlib
import json
import sys

import dagster as dg

from ..experiments.recipe import DEFAULT_RECIPE, build_audited_model
from ..pipeline import describe_audited_model
from . import metadata as meta
from .partitions import AUDIT_GROUP, MODEL_POOL, failing_cleanly
from .resources import RavlProject
from .sources import params_audited_model


def _recipe_version() -> str:
    text = json.dumps([DEFAULT_RECIPE.to_dict(), DEFAULT_RECIPE.small().to_dict()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dg.asset(deps=[params_audited_model], kinds={"pytorch", "open_clip"}, group_name=AUDIT_GROUP,
          code_version=f"2-{_recipe_version()}", pool=MODEL_POOL,
          description="The fine-tuned CLIP model under audit: the built-in synthetic default "
                      "(recipe) or an existing checkpoint named in params.yaml.")
@failing_cleanly
def audited_model(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    cfg = ravl.params().audited_model
    recipe = DEFAULT_RECIPE.small() if cfg.recipe == "small" else DEFAULT_RECIPE
    built = (build_audited_model(ravl.default_setting_dir, recipe, progress=sys.stderr.isatty())
             if cfg.source == "synthetic-default" else None)
    record = describe_audited_model(cfg, built)
    record.write(ravl.audited_record_path)
    context.log.info(f"audited model: {record.model}")
    return dg.MaterializeResult(metadata=meta.audited_model(record, ravl.audited_record_path))

"""Stage 1 of one validation set, one asset per step of the reading path:
region_proposals → region_embeddings → zero_shot_scores → region_clusters →
spurious_features (SPEC §1–2). Each asset calls one step of
:class:`~ravl_pipeline.pipeline.Audit`, which reads what the step before
wrote and replaces its own output atomically; nothing goes through an IO
manager, so nothing is ever pickled."""
import dagster as dg

from . import metadata as meta
from .model import audited_model
from .partitions import MODEL_POOL, audit_asset, set_data_version
from .resources import RavlProject
from .sources import params_discovery, params_labels, params_regions, params_scores, validation_set


@audit_asset(deps=[validation_set, params_regions], kinds={"parquet"}, code_version="1",
             description="Candidate regions of every discovery image (SPEC §1.1).")
def region_proposals(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    table = audit.propose()
    return dg.MaterializeResult(data_version=set_data_version(audit.dataset_dir, audit.params.regions.proposer),
                                metadata=meta.proposals(audit, table.num_rows))


@audit_asset(deps=[region_proposals, audited_model, params_regions], kinds={"pytorch", "parquet"},
             code_version="1", pool=MODEL_POOL,
             description="L2-normalised image and region embeddings, one backbone pass per image (SPEC §1.2).")
def region_embeddings(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    emb, seconds = audit.embed()
    return dg.MaterializeResult(metadata=meta.embeddings(audit, emb, seconds))


@audit_asset(deps=[region_embeddings, audited_model, params_scores, params_labels], kinds={"parquet"},
             code_version="1", pool=MODEL_POOL,
             description="Zero-shot class probabilities of images and regions (SPEC §1.3–1.4).")
def zero_shot_scores(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    sc, labels = audit.score()
    return dg.MaterializeResult(metadata=meta.scores(audit, sc, labels))


@audit_asset(deps=[region_embeddings, params_discovery, params_labels], kinds={"parquet"}, code_version="1",
             description="K-medoids over cosine distance, K chosen by silhouette over [2|Y|, 5|Y|) (SPEC §2.1).")
def region_clusters(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    return dg.MaterializeResult(metadata=meta.clusters(audit, audit.cluster()))


@audit_asset(deps=[region_clusters, zero_shot_scores, audited_model, params_discovery], kinds={"json"},
             code_version="3", pool=MODEL_POOL,
             description="Ranked spurious region features with their evidence (permutation p- and "
                         "BH q-values, the masking check, model-derived names): findings.json "
                         "(SPEC §2.2–2.6, §5), with what changed since the set's previous audit.")
def spurious_features(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    found = audit.find()
    return dg.MaterializeResult(metadata=meta.findings(audit, found, audit.paths.findings, audit.drift()))


DISCOVERY_ASSETS = [region_proposals, region_embeddings, zero_shot_scores, region_clusters, spurious_features]

"""Stage 1 of one validation set, one asset per step of the reading path:
region_proposals → region_embeddings → zero_shot_scores → region_clusters →
spurious_features (SPEC §1–2). Each asset calls one step of
:class:`~ravl_pipeline.pipeline.Audit`, which reads what the step before
wrote and replaces its own output atomically; nothing goes through an IO
manager, so nothing is ever pickled.

``region_embeddings`` is a graph of three kinds of step, so one large set's
embedding spreads over the executor's processes or Celery workers:
``plan`` fans out ``compute.shards`` ``shard`` steps (contiguous rows each,
in the ``ravl_model`` pool: raise its limit to run several at once), and
``merge`` joins them in row order."""
import dagster as dg

from . import metadata as meta
from .model import audited_model
from .partitions import AUDIT_GROUP, MODEL_POOL, audit_asset, failing_cleanly, set_data_version, validation_sets
from .resources import RavlProject
from .sources import params_discovery, params_labels, params_regions, params_scores, validation_set


@audit_asset(deps=[validation_set, params_regions], kinds={"parquet"}, code_version="1",
             description="Candidate regions of every discovery image (SPEC §1.1).")
def region_proposals(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    table = audit.propose()
    return dg.MaterializeResult(data_version=set_data_version(audit.dataset_dir, audit.params.regions.proposer),
                                metadata=meta.proposals(audit, table.num_rows))


@dg.op(ins={name: dg.In(dg.Nothing) for name in ("region_proposals", "audited_model", "params_regions")},
       out=dg.DynamicOut(dg.Nothing), description="One shard step per compute.shards.")
@failing_cleanly
def plan(context: dg.OpExecutionContext, ravl: RavlProject) -> list[dg.DynamicOutput]:
    return [dg.DynamicOutput(None, mapping_key=str(index)) for index in range(ravl.params().compute.shards)]


@dg.op(ins={"planned": dg.In(dg.Nothing)}, out=dg.Out(dg.Nothing), pool=MODEL_POOL,
       description="Image and region embeddings of one shard's rows.")
@failing_cleanly
def shard(context: dg.OpExecutionContext, ravl: RavlProject) -> None:
    audit = ravl.audit(context.partition_key)
    _, seconds = audit.embed_shard(int(context.get_mapping_key()), ravl.params().compute.shards)
    context.log.info(f"shard {context.get_mapping_key()} embedded in {seconds:.1f}s")


@dg.op(ins={"shards": dg.In(dg.Nothing)}, out=dg.Out(dg.Nothing), description="The shards joined in row order.")
@failing_cleanly
def merge(context: dg.OpExecutionContext, ravl: RavlProject) -> None:
    audit = ravl.audit(context.partition_key)
    emb, seconds = audit.merge_shards(ravl.params().compute.shards)
    context.add_output_metadata(meta.embeddings(audit, emb, seconds))


@dg.graph_asset(partitions_def=validation_sets, group_name=AUDIT_GROUP, kinds={"pytorch", "parquet"}, code_version="2",
                ins={"region_proposals": dg.AssetIn(dagster_type=dg.Nothing),
                     "audited_model": dg.AssetIn(dagster_type=dg.Nothing),
                     "params_regions": dg.AssetIn(dagster_type=dg.Nothing)},
                description="L2-normalised image and region embeddings, one backbone pass per image (SPEC §1.2), "
                            "in compute.shards parallel steps.")
def region_embeddings(region_proposals, audited_model, params_regions):
    planned = plan(region_proposals=region_proposals, audited_model=audited_model, params_regions=params_regions)
    return merge(shards=planned.map(lambda each: shard(planned=each)).collect())


@audit_asset(deps=[region_embeddings, audited_model, params_scores, params_labels], kinds={"parquet"},
             code_version="2", pool=MODEL_POOL,
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

"""The one composition every entry point calls: the method's steps in memory
(:mod:`.stages`) and one validation set's audit on disk (:mod:`.audit`)."""
from .audit import Audit, AuditError, AuditPaths, ModelRecord, describe_audited_model, findings_summary
from .stages import (Stage1Result, add_evidence, classes_for, cluster, embed, evaluate, find, ground_truth, score,
                     stage1, templates_for, train, write_metrics)

__all__ = ["Audit", "AuditError", "AuditPaths", "ModelRecord", "describe_audited_model", "findings_summary",
           "Stage1Result", "add_evidence", "classes_for", "cluster", "embed", "evaluate", "find", "ground_truth",
           "score", "stage1", "templates_for", "train", "write_metrics"]

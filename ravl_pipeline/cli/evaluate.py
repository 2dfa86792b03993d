"""``ravl evaluate``: image/region overall and worst-group accuracy of one
model on one split (SPEC §4.2) → ``metrics.json``. Groups are (class,
feature present) from the data's region labels; on data without them,
``--findings`` forms the groups from the discovered features (SPEC §5
``groups_from``)."""
from __future__ import annotations

from ..config import EvaluationConfig, InputError, RegionsConfig, option
from ..core.findings import read_findings
from ..io.dataset import dataset_inputs, load_dataset
from ..io.manifest import SPLITS
from ..models import load_model, model_inputs
from ..pipeline import stages
from .common import (add_compute_args, add_model_args, compute_flags, flag_classes, flag_templates, metrics_line,
                     warn_if_untrained)
from .errors import check_output_file


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="image/region overall and worst-group accuracy (SPEC §4.2)",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"],
                   help="split to evaluate (default test; 'all' for every row)")
    p.add_argument("--feature", action="append", default=None,
                   help="region label of a feature defining the groups (repeatable; default: setting.json)")
    p.add_argument("--findings", default=None,
                   help="findings.json whose mitigated features form the groups where the data does not annotate "
                        "the feature (presence: a region nearest the finding's medoid under the audited model)")
    p.add_argument("--audited-model", default=None,
                   help="the model the findings came from (default: the findings' 'model' and 'pretrained')")
    p.add_argument("--audited-pretrained", default=None, help="open_clip pretrained tag or weights file of it")
    p.add_argument("--template", action="append", default=None, help="prompt template (default from the dataset)")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: setting or labels)")
    p.add_argument("--min-group-size", **option(EvaluationConfig, "min_group_size"))
    p.add_argument("--batch-size", **option(RegionsConfig, "batch_size"))
    p.add_argument("--out", required=True, help="metrics.json to write")
    add_compute_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    check_output_file(args.out, inputs=[*dataset_inputs(args.data), *model_inputs(args.model, args.pretrained),
                                        *([("--findings", args.findings)] if args.findings else [])])
    compute = compute_flags(args)
    templates = flag_templates(args.template)
    classes = flag_classes(args.classes)
    warn_if_untrained("evaluate", args.model, args.pretrained, 0)
    discovered = None
    if args.findings:
        findings = read_findings(args.findings)
        audited = args.audited_model or findings.model
        pretrained = args.audited_pretrained or (None if args.audited_model else findings.pretrained)
        if not audited:
            raise InputError(f"{args.findings}: names no audited model ('model'); pass --audited-model")
        split = None if args.split == "all" else args.split
        ds = load_dataset(args.data, classes=classes, split=split, require_labels=True)
        discovered = stages.discovered_groups(load_model(audited, pretrained, compute=compute), ds, findings,
                                              progress=not args.quiet)
    metrics = stages.evaluate(args.model, args.data, split=args.split, features=args.feature,
                              templates=templates, pretrained=args.pretrained, classes=classes,
                              min_group_size=args.min_group_size, batch_size=args.batch_size,
                              progress=not args.quiet, compute=compute, discovered=discovered)
    stages.write_metrics(metrics, args.out)
    print(f"wrote {args.out}: {metrics_line(metrics)}  (groups from {metrics['groups_from']})"
          + ("  (partial)" if metrics["partial"] else ""))
    for w in metrics["warnings"]:
        print(f"  warning: {w}")
    return 0

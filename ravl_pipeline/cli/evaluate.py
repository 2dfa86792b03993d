"""``ravl evaluate``: image/region overall and worst-group accuracy of one
model on one split (SPEC §4.2) → ``metrics.json``."""
from __future__ import annotations

from ..config import EvaluationConfig, RegionsConfig, option
from ..io.dataset import dataset_inputs
from ..io.manifest import SPLITS
from ..models import model_inputs
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
    p.add_argument("--template", action="append", default=None, help="prompt template (default from the dataset)")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: setting or labels)")
    p.add_argument("--min-group-size", **option(EvaluationConfig, "min_group_size"))
    p.add_argument("--batch-size", **option(RegionsConfig, "batch_size"))
    p.add_argument("--out", required=True, help="metrics.json to write")
    add_compute_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    check_output_file(args.out, inputs=[*dataset_inputs(args.data), *model_inputs(args.model, args.pretrained)])
    compute = compute_flags(args)
    templates = flag_templates(args.template)
    classes = flag_classes(args.classes)
    warn_if_untrained("evaluate", args.model, args.pretrained, 0)
    metrics = stages.evaluate(args.model, args.data, split=args.split, features=args.feature,
                              templates=templates, pretrained=args.pretrained, classes=classes,
                              min_group_size=args.min_group_size, batch_size=args.batch_size,
                              progress=not args.quiet, compute=compute)
    stages.write_metrics(metrics, args.out)
    print(f"wrote {args.out}: {metrics_line(metrics)}" + ("  (partial)" if metrics["partial"] else ""))
    for w in metrics["warnings"]:
        print(f"  warning: {w}")
    return 0

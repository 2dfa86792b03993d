"""``ravl discover``: Stage 1 — ranked spurious region features with their
evidence (SPEC §2) → ``findings.json``."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import (EMBEDDING_MODES, MASK_CONTROLS, MASK_FILL_CHOICES, DiscoveryConfig, RegionsConfig, ScoresConfig,
                      option)
from ..core.cache import EmbeddingCache
from ..core.evidence.names import load_vocabulary
from ..core.findings import write_findings
from ..core.scores import check_classes
from ..io.dataset import dataset_inputs, load_dataset
from ..io.manifest import SPLITS
from ..models import load_model, model_inputs
from ..pipeline import stages
from .common import (add_compute_args, add_model_args, compute_flags, flag_classes, flag_templates, print_findings,
                     proposer_flag, warn_if_untrained)
from .errors import check_output_dir, check_output_file


def register(sub) -> None:
    p = sub.add_parser("discover", help="Stage 1: find spurious region features (SPEC §2)", description=__doc__)
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None, choices=SPLITS, help="discover on this split only (default: every row)")
    p.add_argument("--out", required=True, help="findings.json to write")
    p.add_argument("--proposer", type=proposer_flag, **option(RegionsConfig, "proposer"))
    p.add_argument("--mode", choices=list(EMBEDDING_MODES), **option(RegionsConfig, "mode"))
    p.add_argument("--batch-size", **option(RegionsConfig, "batch_size"))
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {} for the class (repeatable); default from the dataset")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: labels in the data)")
    p.add_argument("--tau", **option(ScoresConfig, "tau"))
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="embedding cache directory: reuse embeddings of unchanged images (e.g. data/cache/embeddings)")
    p.add_argument("--seed", **option(DiscoveryConfig, "seed"))
    p.add_argument("--cluster-workers", **option(DiscoveryConfig, "cluster_workers"))
    p.add_argument("--permutations", **option(DiscoveryConfig, "permutations"))
    p.add_argument("--alpha", **option(DiscoveryConfig, "alpha"))
    p.add_argument("--mask-fill", choices=list(MASK_FILL_CHOICES), **option(DiscoveryConfig, "mask_fill"))
    p.add_argument("--mask-control", choices=list(MASK_CONTROLS), **option(DiscoveryConfig, "mask_control"))
    p.add_argument("--vocab", action="append", default=None, metavar="FILE",
                   help="extra naming concepts, one per line (repeatable; added to the packaged list)")
    p.add_argument("--no-evidence", action="store_true", help="skip significance, the masking check and names")
    add_compute_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def discovery_config(args) -> DiscoveryConfig:
    return DiscoveryConfig(seed=args.seed, cluster_workers=args.cluster_workers, evidence=not args.no_evidence,
                           permutations=args.permutations, alpha=args.alpha, mask_fill=args.mask_fill,
                           mask_control=args.mask_control)


def inputs(args) -> list:
    """What the command reads, which its output may not replace."""
    return [*dataset_inputs(args.data), *model_inputs(args.model, args.pretrained),
            *(("--vocab", path) for path in args.vocab or [])]


def run(args) -> int:
    check_output_file(args.out, inputs=inputs(args))
    if args.cache:
        check_output_dir(args.cache, "--cache")
    compute = compute_flags(args)
    templates = flag_templates(args.template)
    classes = flag_classes(args.classes)
    discovery = discovery_config(args)
    vocab = load_vocabulary(args.vocab) if args.vocab and discovery.evidence else None
    ds = load_dataset(args.data, classes=classes, split=args.split, require_labels=True)
    classes = check_classes(classes or ds.classes(), "--classes" if classes else f"{ds.manifest_file}: the classes")
    lm = load_model(args.model, args.pretrained, compute=compute, seed=args.seed)
    warn_if_untrained("discover", args.model, args.pretrained, args.seed)
    cache = EmbeddingCache(Path(args.cache)) if args.cache else None
    t0 = time.perf_counter()
    templates = templates or stages.templates_for(args.data, recorded=lm.meta.get("train"))
    result = stages.stage1(lm, ds, classes, templates=templates,
                           regions=RegionsConfig(proposer=args.proposer, mode=args.mode, batch_size=args.batch_size),
                           scores=ScoresConfig(tau=args.tau), discovery=discovery, cache=cache, vocab=vocab,
                           progress=not args.quiet)
    findings = result.findings
    findings.seconds = time.perf_counter() - t0
    if cache is not None and not args.quiet:
        print(f"embedding cache {args.cache}: {cache.stats.hits} images reused, {cache.stats.misses} embedded")
    write_findings(findings, args.out)
    print_findings(findings, args.out)
    return 0

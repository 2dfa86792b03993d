"""``ravl import imagefolder|coco``: build a dataset directory (SPEC §5)
from an ImageFolder tree or COCO instances files (several files, e.g. one
per split, go into one manifest: ``--split`` once per file)."""
from __future__ import annotations

from ..config import InputError
from ..io.importers import import_coco, import_imagefolder
from .errors import check_output_dir


def register(sub) -> None:
    p = sub.add_parser("import", help="build a dataset manifest from an ImageFolder tree or COCO JSON",
                       description=__doc__)
    p.add_argument("format", choices=["imagefolder", "coco"])
    p.add_argument("src", nargs="+", help="ImageFolder root, or COCO instances JSON file(s)")
    p.add_argument("--images", help="COCO images directory")
    p.add_argument("--out", required=True, help="dataset directory to write manifest.parquet into")
    p.add_argument("--split", action="append", default=None,
                   help="split of every row (train/val/test); for several COCO files, once per file in order")
    p.add_argument("--copy", action="store_true", help="copy images into the dataset directory")
    p.set_defaults(func=run)


def run(args) -> int:
    check_output_dir(args.out)
    splits = args.split or [None]
    if args.format == "imagefolder":
        if len(args.src) != 1 or len(splits) != 1:
            raise InputError("ravl import imagefolder: give one folder and at most one --split")
        ds = import_imagefolder(args.src[0], args.out, split=splits[0], copy=args.copy)
    else:
        if not args.images:
            raise InputError("--images DIR is required for a COCO import")
        if len(splits) not in (1, len(args.src)):
            raise InputError(f"--split: {len(args.src)} instances files but {len(splits)} --split values; "
                             "give one per file, or one for all")
        ds = import_coco(args.src, args.images, args.out, split=splits if len(splits) > 1 else splits[0],
                         copy=args.copy)
    counts = {}
    for s in ds.splits or []:
        counts[s] = counts.get(s, 0) + 1
    detail = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"wrote {ds.manifest_file} ({len(ds)} images{': ' + detail if detail else ''})")
    return 0

"""``ravl import imagefolder|coco``: build a dataset directory (SPEC §5)
from an ImageFolder tree or a COCO instances file."""
from __future__ import annotations

from ..config import InputError
from ..io.importers import import_coco, import_imagefolder
from .errors import check_output_dir


def register(sub) -> None:
    p = sub.add_parser("import", help="build a dataset manifest from an ImageFolder tree or COCO JSON",
                       description=__doc__)
    p.add_argument("format", choices=["imagefolder", "coco"])
    p.add_argument("src", help="ImageFolder root, or COCO instances JSON")
    p.add_argument("--images", help="COCO images directory")
    p.add_argument("--out", required=True, help="dataset directory to write manifest.parquet into")
    p.add_argument("--split", default=None)
    p.add_argument("--copy", action="store_true", help="copy images into the dataset directory")
    p.set_defaults(func=run)


def run(args) -> int:
    check_output_dir(args.out)
    if args.format == "imagefolder":
        ds = import_imagefolder(args.src, args.out, split=args.split, copy=args.copy)
    else:
        if not args.images:
            raise InputError("--images DIR is required for a COCO import")
        ds = import_coco(args.src, args.images, args.out, split=args.split, copy=args.copy)
    print(f"wrote {ds.manifest_file} ({len(ds)} images)")
    return 0

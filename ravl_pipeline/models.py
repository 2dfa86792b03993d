"""open_clip model handling: one factory, built-in tiny configurations, and
checkpoints in open_clip's ``local-dir`` format (SPEC §5, Checkpoints).

A model is named by one string:

* ``ravl-tiny-rn`` / ``ravl-tiny-vit`` — built-in tiny configurations shipped
  as JSON next to this module (random init; trained here in minutes);
* ``local-dir:PATH`` — a directory holding ``open_clip_config.json`` and
  ``open_clip_model.safetensors`` (what :func:`save_model` writes);
* any open_clip model name, with ``pretrained`` a tag or a weights file.

Weights are read with safetensors or ``torch.load(weights_only=True)``; no
arbitrary pickle is ever executed.
"""
from __future__ import annotations

import contextlib
import json
import itertools
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .compute import CPU, Compute, use_device
from .config import InputError
from .io.files import atomic_dir, read_json

CONFIG_DIR = Path(__file__).parent / "model_configs"
BUILTIN_MODELS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
RAVL_META_NAME = "ravl_model.json"

open_clip.add_model_config(CONFIG_DIR)

# Preprocessing of the built-in tiny models. Pixels are scaled so that black
# is 0, the value convolutions pad with: with open_clip's default (CLIP)
# normalisation black becomes about -1.8, the image border stands out from a
# black background, and region features pick up where in the image a region
# sits rather than what it shows. ``ravl-tiny-rn-clip`` is the same ResNet with
# CLIP's standard normalisation: the second model family every default is
# checked on, as the models users bring are preprocessed that way.
SCALED_TO_BLACK = {"image_mean": (0.0, 0.0, 0.0), "image_std": (0.5, 0.5, 0.5)}
BUILTIN_PREPROCESS: dict[str, dict[str, Any]] = {
    name: SCALED_TO_BLACK for name in BUILTIN_MODELS if not name.endswith("-clip")
}


class ModelError(InputError):
    """A model name, checkpoint or architecture that cannot be used."""


@dataclass
class LoadedModel:
    """An open_clip model with everything needed to use and save it."""

    model: open_clip.CLIP
    preprocess: Callable  # PIL image -> normalised tensor (evaluation transform)
    tokenizer: Callable  # list[str] -> LongTensor
    name: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False  # no trained weights: a built-in or an open_clip name without `pretrained`
    pretrained: str | None = None  # the tag or weights file the model was loaded with
    compute: Compute = CPU  # the device it sits on, its precision and its image-loading workers

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"].get("image_size", 224))
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def architecture(self) -> str:
        """``resnet`` (ModifiedResNet), ``vit`` (VisionTransformer) or ``other``."""
        return visual_architecture(self.model)


def visual_architecture(model: torch.nn.Module) -> str:
    visual = model.visual
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        return "resnet"
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        return "vit"
    return "other"


def _parse_name(spec: str) -> tuple[str, str | None]:
    if spec.startswith("local-dir:"):
        return "local-dir", spec[len("local-dir:"):]
    return "name", spec


def untrained(spec: str, pretrained: str | None = None) -> bool:
    """Whether ``spec`` names a model without trained weights: a built-in
    configuration or an open_clip name without ``pretrained`` (random init)."""
    kind, ident = _parse_name(str(spec))
    return kind == "name" and pretrained is None and open_clip.get_model_config(ident.replace("/", "-")) is not None


def meta_path(spec: str) -> Path | None:
    """Where a ``local-dir:`` checkpoint records how it was made
    (``ravl_model.json``); ``None`` for any other model."""
    kind, ident = _parse_name(str(spec))
    return Path(ident) / RAVL_META_NAME if kind == "local-dir" else None


def model_inputs(spec: str | None, pretrained: str | None = None, flag: str = "--model",
                 pretrained_flag: str = "--pretrained") -> list[tuple[str, Path]]:
    """What loading model ``spec`` reads, as ``(name, path)`` for the output
    rule (:func:`~ravl_pipeline.io.files.output_problem`): a ``local-dir:``
    checkpoint's folder and files, and a ``pretrained`` weights file."""
    out: list[tuple[str, Path]] = []
    kind, ident = _parse_name(str(spec)) if spec else ("name", None)
    if kind == "local-dir" and ident:
        folder = Path(ident)
        out += [(f"{flag} {spec}", folder)] + [(f"{flag} {spec}", folder / name)
                                               for name in (CONFIG_NAME, WEIGHTS_NAME, RAVL_META_NAME)]
    if pretrained and os.path.lexists(pretrained):
        out.append((f"{pretrained_flag} {pretrained}", Path(pretrained)))
    return out


def read_meta(spec: str) -> dict[str, Any]:
    """What a checkpoint records of how it was made (:func:`meta_path`; its
    training configuration under ``train``); ``{}`` for any other model, or a
    checkpoint that records nothing."""
    path = meta_path(spec)
    return read_json(path, ModelError) if path is not None and path.is_file() else {}


def load_model(spec: str, pretrained: str | None = None, compute: Compute | None = None,
               seed: int | None = None) -> LoadedModel:
    """Load a model by name (see module docstring) onto ``compute``'s device
    (default: the CPU, fp32). ``seed`` fixes random init (drawn on the CPU,
    so the same weights on every device); a model without trained weights
    (a built-in or an open_clip name without ``pretrained``) says so in
    ``random_init``."""
    compute = compute or CPU
    use_device(compute)
    kind, ident = _parse_name(str(spec))
    meta: dict[str, Any] = {}
    if kind == "local-dir":
        path = Path(ident)
        if not path.is_dir():
            raise ModelError(f"checkpoint {path}: no such directory (local-dir:PATH names a checkpoint folder)")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise ModelError(f"checkpoint {path}: missing {name}")
        config = read_json(path / CONFIG_NAME, ModelError)
        if not isinstance(config.get("model_cfg"), dict):
            raise ModelError(f"checkpoint {path / CONFIG_NAME}: no 'model_cfg' object")
        meta = read_meta(spec)
        model_name, pretrained = f"local-dir:{path}", None
    else:
        model_name = ident
        if open_clip.get_model_config(ident.replace("/", "-")) is None:
            raise ModelError(
                f"unknown model {ident!r}: use a built-in ({', '.join(BUILTIN_MODELS)}), "
                "an open_clip model name, or local-dir:PATH")
        if pretrained is not None and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(ident)
            if pretrained not in tags:
                raise ModelError(f"model {ident!r}: pretrained {pretrained!r} is neither a file "
                                 f"nor a known tag ({', '.join(tags) or 'none'})")
    if seed is not None:
        torch.manual_seed(seed)
    overrides = BUILTIN_PREPROCESS.get(model_name, {}) if kind == "name" else {}
    # a built-in tiny model starts from random weights by design; open_clip's
    # "no pretrained weights loaded" warning is kept for every other model
    quiet = kind == "name" and pretrained is None and model_name in BUILTIN_MODELS
    try:
        with _without_random_init_warning(quiet):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=compute.device, weights_only=True, **overrides)
    except pickle.UnpicklingError as exc:
        raise ModelError(_refused_pickle(pretrained, exc)) from exc
    except (TypeError, AttributeError) as exc:  # a model_cfg value of the wrong type
        if kind != "local-dir":
            raise
        raise ModelError(f"cannot build model {spec!r} from {Path(ident) / CONFIG_NAME}: its 'model_cfg' holds a "
                         f"value of the wrong type ({_reason(exc)})") from exc
    except (SafetensorError, RuntimeError, ValueError, KeyError, EOFError, OSError) as exc:
        weights = pretrained if kind == "name" else Path(ident) / WEIGHTS_NAME
        raise ModelError(f"cannot load model {spec!r}: weights {weights} are unreadable or do not fit the "
                         f"architecture ({_reason(exc)})") from exc
    if kind == "local-dir" or pretrained is not None:
        weights = Path(ident) / WEIGHTS_NAME if kind == "local-dir" else pretrained
        # parameters finite; buffers without NaN (the text tower's causal mask holds -inf by design)
        tensors = itertools.chain(((n, t, lambda x: ~torch.isfinite(x)) for n, t in model.named_parameters()),
                                  ((n, t, torch.isnan) for n, t in model.named_buffers()))
        for name, tensor, bad in tensors:
            if tensor.is_floating_point() and bool(bad(tensor).any()):
                raise ModelError(f"cannot load model {spec!r}: weights {weights}: tensor {name!r} holds NaN or "
                                 "infinite values (a corrupt file, or a training run that diverged)")
    tokenizer = open_clip.get_tokenizer(model_name)
    model_cfg = _model_cfg(model_name)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    model.eval()
    return LoadedModel(model, preprocess, tokenizer, str(spec), model_cfg, preprocess_cfg, meta,
                       random_init=untrained(spec, pretrained), pretrained=pretrained, compute=compute)


def _reason(exc: BaseException, limit: int = 600) -> str:
    """An exception's message on one line (a state_dict mismatch lists its
    keys on the lines after its heading), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refused_pickle(pretrained: str | None, exc: Exception) -> str:
    """The one line for a pickled checkpoint ``torch.load(weights_only=True)`` refused."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    why = f"it holds {found.group(1)}, which is not a tensor" if found else "it holds objects other than tensors"
    return (f"--pretrained {pretrained}: refusing to unpickle this checkpoint ({why}); ravl never executes a "
            "pickle. Convert it once, where you trust the file, to safetensors (e.g. "
            "safetensors.torch.save_file(state_dict, 'model.safetensors')) or to a plain state_dict of tensors "
            "saved with torch.save, and pass that file")


@contextlib.contextmanager
def _without_random_init_warning(active: bool):
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        if active:
            root.removeFilter(keep)


def _model_cfg(model_name: str) -> dict[str, Any]:
    kind, ident = _parse_name(model_name)
    if kind == "local-dir":
        return json.loads((Path(ident) / CONFIG_NAME).read_text())["model_cfg"]
    return open_clip.get_model_config(ident.replace("/", "-"))


def save_model(lm: LoadedModel, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``lm`` as an open_clip ``local-dir`` checkpoint, atomically.

    The directory is built beside the target and renamed into place, so an
    interrupted save never leaves a half-written checkpoint, and an existing
    checkpoint is replaced only once the new one is complete.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        config = {"model_cfg": lm.model_cfg, "preprocess_cfg": _jsonable(lm.preprocess_cfg)}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in lm.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        if meta is not None:
            (tmp / RAVL_META_NAME).write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True))
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def architecture_key(lm: LoadedModel) -> dict[str, Any]:
    """What must match for two checkpoints to be the same architecture."""
    return {"model_cfg": lm.model_cfg, "image_size": lm.image_size}


def check_same_architecture(a: LoadedModel, b: LoadedModel) -> None:
    if architecture_key(a) != architecture_key(b):
        raise ModelError(
            f"model {b.name!r} has a different architecture from {a.name!r} "
            f"({_cfg_diff(a.model_cfg, b.model_cfg)})")


def _cfg_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = _cfg_diff(va, vb, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif va != vb:
            diffs.append(f"{prefix}{key}: {va!r} vs {vb!r}")
    return "; ".join(diffs)

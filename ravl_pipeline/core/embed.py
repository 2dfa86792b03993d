"""Image, region and class-text embeddings and zero-shot scores (SPEC §1).

Region embeddings take one backbone pass per image when the model's own
input shows the whole image (a square image); a non-square image's boxes are
read from a second pass over a region view of the whole image
(:mod:`.views`), so a box outside the model's centre crop still sees its own
pixels, while the image embedding stays the model's own:

* ResNet (open_clip ``ModifiedResNet``): stem + layer1..layer3 once, each box
  RoI-aligned onto the stride-16 layer3 map at the map's full size, then
  layer4 and the attention pool per region — so the whole-image box gives back
  the image embedding;
* ViT: the final patch tokens inside the box are RoI-aligned on the token grid
  and averaged, then ``ln_post`` and ``proj``;
* ``roi-half`` (ResNet): the RoI-aligned layer3 features at half the map's
  size, so layer4 and the attention pool (its positional embedding resized
  bicubically) cost a quarter per region — about one extra layer4 pass for
  four regions instead of four; a quadrant of the image is then sampled at
  its native resolution. Not SPEC §1.2's identity (the whole-image box no
  longer reproduces the image embedding exactly); for ViT it is ``roi``;
* ``crop``: crop, resize, encode — exact for any model, R× slower.

:func:`encode_image_and_regions` is differentiable and is also what Stage-2
training uses, so discovery and mitigation see regions the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from ..config import EMBEDDING_MODES as MODES
from ..config import InputError, RegionsConfig
from ..io.files import atomic_dir
from ..io.tables import fixed_list, matrix
from ..models import LoadedModel, visual_architecture
from .loader import stream
from .regions import propose_dataset
from .views import DEFAULT_REGION_VIEW, ViewError, ViewSpec, input_boxes, region_view  # noqa: F401 (input_boxes: API)

ROI_SCALE = {"roi": 1.0, "roi-half": 0.5}


class EmbedError(InputError):
    pass


# --------------------------------------------------------------------------- encoders

def resolve_mode(model: torch.nn.Module, mode: str) -> str:
    if mode not in MODES:
        raise EmbedError(f"unknown embedding mode {mode!r}; expected one of {', '.join(MODES)}")
    arch = visual_architecture(model)
    if mode == "auto":
        return "roi" if arch in ("resnet", "vit") else "crop"
    if mode in ROI_SCALE and arch == "other":
        raise EmbedError(f"mode {mode!r} needs an open_clip ModifiedResNet or VisionTransformer; "
                         f"got {type(model.visual).__name__} (use mode 'crop')")
    if mode == "roi-half" and arch == "vit":
        return "roi"  # token pooling has no per-region backbone work to shrink
    return mode


def resized_grid_positions(pos: torch.Tensor, n_prefix: int, size: tuple[int, int]) -> torch.Tensor:
    """A positional embedding ``[n_prefix + side², C]`` whose grid part is
    resized bicubically to ``size`` (the usual way CLIP models change
    resolution); unchanged when the grid already has that size."""
    side = int(round((pos.shape[0] - n_prefix) ** 0.5))
    if tuple(size) == (side, side):
        return pos
    grid = pos[n_prefix:].reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=tuple(size), mode="bicubic", align_corners=False)
    return torch.cat([pos[:n_prefix], grid[0].flatten(1).T], dim=0)


def pool_at_size(pool, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` on a feature map of any size: the
    spatial part of its positional embedding is resized bicubically to the
    map (the usual way CLIP models change resolution)."""
    pos = resized_grid_positions(pool.positional_embedding, 1, tuple(x.shape[-2:]))
    x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pos[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training,
        need_weights=False)
    return out[0]


def _rois(feature_map, pixels, boxes, views, size, trunk) -> torch.Tensor:
    """RoI-aligned features ``[ΣR_i, C, *size]`` in image order. Image
    ``i``'s boxes are read from ``feature_map[i]`` (the image pass over
    ``pixels``) when ``views[i]`` is None, else from ``trunk`` run on its
    region view; views of one shape share a batch."""
    def align(fmap, inputs, bxs):
        # in fp32: torchvision registers autocast for roi_align on some backends only (not MPS)
        return roi_align(fmap.float(), [b.float() for b in bxs], output_size=size,
                         spatial_scale=fmap.shape[-1] / inputs.shape[-1], sampling_ratio=0, aligned=True)

    if views is None or all(v is None for v in views):
        return align(feature_map, pixels, boxes)
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(None if v is None else tuple(v.shape), []).append(i)
    parts: list[torch.Tensor | None] = [None] * len(boxes)
    for shape, members in groups.items():
        if shape is None:
            sel = torch.tensor(members, device=feature_map.device)
            inputs, fmap = pixels, feature_map.index_select(0, sel)
        else:
            inputs = torch.stack([views[i] for i in members])
            fmap = trunk(inputs)
        out = align(fmap, inputs, [boxes[i] for i in members])
        for i, chunk in zip(members, out.split([len(boxes[i]) for i in members])):
            parts[i] = chunk
    return torch.cat(parts)


def _resnet_trunk(visual, x: torch.Tensor) -> torch.Tensor:
    """stem + layer1..layer3 (stride 16) of a ModifiedResNet, any input size."""
    return visual.layer3(visual.layer2(visual.layer1(visual.stem(x))))


def _resnet_image_and_regions(visual, pixels, boxes, roi_scale: float = 1.0, views=None):
    feat3 = _resnet_trunk(visual, pixels)
    image = visual.attnpool(visual.layer4(feat3))
    h3, w3 = feat3.shape[-2:]
    size = (max(1, round(h3 * roi_scale)), max(1, round(w3 * roi_scale)))
    rois = _rois(feat3, pixels, boxes, views, size, lambda x: _resnet_trunk(visual, x))
    feat4 = visual.layer4(rois)
    regions = visual.attnpool(feat4) if size == (h3, w3) else pool_at_size(visual.attnpool, feat4)
    return image, regions


def _vit_embeds(visual, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``VisionTransformer._embeds`` on an input of any size
    whose sides are multiples of the patch size: the grid part of the
    position embedding is interpolated to the input's token grid."""
    grid = _token_grid(visual, x)
    if grid == tuple(visual.grid_size):
        return visual._embeds(x)
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = x + resized_grid_positions(visual.positional_embedding, 1, grid).to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def _token_grid(visual, x: torch.Tensor) -> tuple[int, int]:
    patch = visual.conv1.stride
    return x.shape[-2] // patch[0], x.shape[-1] // patch[1]


def _vit_token_map(out: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The final patch tokens of transformer output ``out`` as a ``[B, C, gh, gw]`` map."""
    gh, gw = grid
    tokens = out[:, out.shape[1] - gh * gw:]
    return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], gh, gw)


def _vit_trunk(visual, x: torch.Tensor) -> torch.Tensor:
    return _vit_token_map(visual.transformer(_vit_embeds(visual, x)), _token_grid(visual, x))


def _vit_image_and_regions(visual, pixels, boxes, views=None):
    x = visual.transformer(visual._embeds(pixels))
    pooled, _ = visual._pool(x)
    image = pooled @ visual.proj if visual.proj is not None else pooled
    gh, gw = visual.grid_size
    tokens = _vit_token_map(x, (gh, gw))
    rois = _rois(tokens, pixels, boxes, views, (gh, gw), lambda v: _vit_trunk(visual, v))
    regions = visual.ln_post(rois.mean(dim=(2, 3)))
    if visual.proj is not None:
        regions = regions @ visual.proj
    return image, regions


def encode_image_and_regions(model: torch.nn.Module, pixels: torch.Tensor,
                             boxes: Sequence[torch.Tensor], roi_scale: float = 1.0,
                             views: Sequence[torch.Tensor | None] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised image features [B, D] and region features [ΣR_i, D].

    ``pixels`` is the model's own input; ``boxes[i]`` is [R_i, 4] in the
    pixels of image ``i``'s region view ``views[i]`` ([3, H, W], see
    :mod:`.views`), or of ``pixels[i]`` when there is no view (``views`` None
    or ``views[i]`` None: one backbone pass serves the image and its
    regions). ``roi_scale`` < 1 (ResNet only) RoI-aligns onto that fraction
    of the layer3 map's size (mode ``roi-half``); 1 is SPEC §1.2."""
    arch = visual_architecture(model)
    boxes = [b.to(pixels.dtype) for b in boxes]
    if arch == "resnet":
        return _resnet_image_and_regions(model.visual, pixels, boxes, roi_scale, views)
    if arch == "vit":
        return _vit_image_and_regions(model.visual, pixels, boxes, views)
    raise EmbedError(f"RoI region embeddings are not defined for {type(model.visual).__name__}; use mode 'crop'")


# --------------------------------------------------------------------------- datasets

@dataclass
class Embeddings:
    """L2-normalised image and region embeddings of one dataset under one model."""

    image_ids: list[str]
    image_emb: np.ndarray  # [N, D]
    region_emb: np.ndarray  # [M, D]
    region_image: np.ndarray  # [M] index into image_ids
    region_index: np.ndarray  # [M] index of the region within its image
    boxes: np.ndarray  # [M, 4] original pixels
    mode: str
    proposer: str

    @property
    def n_regions(self) -> int:
        return int(len(self.region_emb))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Two Parquet tables (``images``, ``regions``) in a directory, written atomically."""
        out = Path(out_dir)
        meta = {b"mode": self.mode.encode(), b"proposer": self.proposer.encode()}
        images = pa.table({"image_id": self.image_ids,
                           "embedding": fixed_list(self.image_emb)}).replace_schema_metadata(meta)
        regions = pa.table({
            "image_id": [self.image_ids[i] for i in self.region_image],
            "image_row": pa.array(self.region_image, pa.int64()),
            "region_index": pa.array(self.region_index, pa.int64()),
            "box": fixed_list(self.boxes),
            "embedding": fixed_list(self.region_emb),
        })
        # never delete before replacing: a crash must leave the old embeddings whole
        with atomic_dir(out) as tmp:
            pq.write_table(images, tmp / "images.parquet")
            pq.write_table(regions, tmp / "regions.parquet")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Embeddings":
        path = Path(path)
        try:
            images = pq.read_table(path / "images.parquet")
            regions = pq.read_table(path / "regions.parquet")
        except (OSError, pa.ArrowInvalid) as exc:
            raise EmbedError(f"cannot read embeddings in {path}: {exc}") from exc
        meta = images.schema.metadata or {}
        return cls(
            image_ids=images.column("image_id").to_pylist(),
            image_emb=matrix(images.column("embedding")),
            region_emb=matrix(regions.column("embedding")),
            region_image=regions.column("image_row").to_numpy().astype(np.int64),
            region_index=regions.column("region_index").to_numpy().astype(np.int64),
            boxes=matrix(regions.column("box")),
            mode=meta.get(b"mode", b"roi").decode(),
            proposer=meta.get(b"proposer", b"").decode(),
        )


def preprocess_images(lm: LoadedModel, ds, indices: Sequence[int] | None = None,
                      progress: bool = False) -> torch.Tensor:
    """Stack the evaluation transform of the chosen images: [B, 3, S, S]
    (all in memory: for small sets and tests; the stages stream)."""
    indices = range(len(ds)) if indices is None else indices
    it = tqdm(indices, desc="load images", leave=False, disable=not progress)
    return torch.stack([lm.preprocess(ds.load_image(i)) for i in it])


@dataclass(frozen=True)
class ImageItem:
    """Loader item: image ``i`` through the model's own evaluation transform."""

    transform: Callable

    def __call__(self, ds, i: int) -> torch.Tensor:
        return self.transform(ds.load_image(i))


@dataclass(frozen=True)
class RoiItem:
    """Loader item of the RoI modes: image ``i``'s own input, its region view
    (None when the input shows the whole image) and its boxes in the view's
    pixels (:func:`region_inputs`)."""

    transform: Callable
    spec: ViewSpec
    proposals: Sequence[np.ndarray]
    view: str = DEFAULT_REGION_VIEW

    def __call__(self, ds, i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        image = ds.load_image(i)
        return (self.transform(image), *region_inputs(self.spec, ds, i, self.proposals[i], self.view, image))


@dataclass(frozen=True)
class CropItem:
    """Loader item of ``crop`` mode: image ``i``'s own input and each box cropped and preprocessed."""

    transform: Callable
    proposals: Sequence[np.ndarray]

    def __call__(self, ds, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image = ds.load_image(i)
        crops = [self.transform(image.crop(pixel_box(box, image.width, image.height))) for box in self.proposals[i]]
        return self.transform(image), crops


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels a crop of ``box`` takes: its corners rounded, as PIL rounds
    them, and at least one pixel wide and high inside the image (a box of a
    fraction of a pixel would otherwise crop to nothing)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    return x1, y1, min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)


def shard_rows(n: int, shards: int, index: int) -> range:
    """Rows ``[start, stop)`` of shard ``index`` of ``shards`` contiguous
    shards of ``n`` rows (the first ``n % shards`` take one more); merged in
    shard order they give back every row once, in order."""
    if not 0 <= index < shards:
        raise EmbedError(f"shard {index} does not exist; shards are 0..{shards - 1}")
    base, extra = divmod(n, shards)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def merge_embeddings(parts: Sequence["Embeddings"]) -> "Embeddings":
    """One :class:`Embeddings` from those of consecutive shards of a set
    (:func:`shard_rows`), rows in shard order."""
    if not parts:
        raise EmbedError("no shard embeddings to merge")
    first = parts[0]
    if any(p.mode != first.mode or p.proposer != first.proposer for p in parts):
        raise EmbedError("shard embeddings were made with different modes or proposers; re-embed the set")
    offsets = np.cumsum([0] + [len(p.image_ids) for p in parts[:-1]])
    return Embeddings(
        image_ids=[i for p in parts for i in p.image_ids],
        image_emb=np.concatenate([p.image_emb for p in parts]),
        region_emb=np.concatenate([p.region_emb for p in parts]),
        region_image=np.concatenate([p.region_image + o for p, o in zip(parts, offsets)]).astype(np.int64),
        region_index=np.concatenate([p.region_index for p in parts]).astype(np.int64),
        boxes=np.concatenate([p.boxes for p in parts]),
        mode=first.mode, proposer=first.proposer)


def embed_dataset(lm: LoadedModel, ds, proposer: str = "quadrants", mode: str = "auto",
                  batch_size: int = RegionsConfig.batch_size, progress: bool = True, cache=None,
                  view: str = DEFAULT_REGION_VIEW) -> Embeddings:
    """Image and region embeddings of every image of ``ds`` (SPEC §1.2).

    Images come from the model's own preprocessing; in the RoI modes the
    boxes of a non-square image are read from its region ``view`` of the
    whole image (:mod:`.views`), so a box outside the model's centre crop
    still sees its own pixels. Images are streamed (:mod:`.loader`) by
    ``lm.compute``'s workers to its device, and encoded in its precision.
    With ``cache`` (an :class:`~ravl_pipeline.core.cache.EmbeddingCache`),
    images already embedded under the same model, boxes, mode and view are
    read back and only the others are computed (and added to the cache).
    """
    if cache is not None:
        return cache.embed(lm, ds, proposer=proposer, mode=mode, batch_size=batch_size, progress=progress,
                           view=view)
    mode = resolve_mode(lm.model, mode)
    proposals = propose_dataset(ds, proposer)
    compute = lm.compute
    image_out, region_out = [], []
    lm.model.eval()
    roi = mode in ROI_SCALE
    item = RoiItem(lm.preprocess, ViewSpec.of(lm), proposals, view) if roi else CropItem(lm.preprocess, proposals)
    bar = tqdm(total=len(ds), desc=f"embed ({mode})", disable=not progress, leave=False)
    with torch.inference_mode(), compute.autocast():
        for batch in stream(ds, item, batch_size=batch_size, compute=compute):
            img, reg = (_encode_roi(lm, batch, ROI_SCALE[mode]) if roi else _encode_crops(lm, batch))
            image_out.append(F.normalize(img.float(), dim=-1).cpu().numpy())
            region_out.append(F.normalize(reg.float(), dim=-1).cpu().numpy())
            bar.update(len(batch))
    bar.close()
    return assemble(ds.image_ids, image_out, region_out, proposals, mode, proposer, int(lm.model_cfg["embed_dim"]))


def assemble(image_ids: Sequence[str], image_emb: list[np.ndarray], region_emb: list[np.ndarray],
             proposals: list[np.ndarray], mode: str, proposer: str, dim: int) -> Embeddings:
    """:class:`Embeddings` from blocks of image rows and of region rows (in
    image order) and the boxes of every image."""
    counts = np.array([len(p) for p in proposals], dtype=np.int64)
    return Embeddings(
        image_ids=list(image_ids),
        image_emb=np.concatenate(image_emb).astype(np.float32) if image_emb else np.zeros((0, dim), np.float32),
        region_emb=np.concatenate(region_emb).astype(np.float32) if region_emb else np.zeros((0, dim), np.float32),
        region_image=np.repeat(np.arange(len(counts), dtype=np.int64), counts),
        region_index=(np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if len(counts)
                      else np.zeros(0, np.int64)),
        boxes=np.concatenate(proposals).astype(np.float32) if proposals else np.zeros((0, 4), np.float32),
        mode=mode,
        proposer=proposer,
    )


def region_inputs(lm: "LoadedModel | ViewSpec", ds, i: int, boxes: np.ndarray, view: str = DEFAULT_REGION_VIEW,
                  image=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Image ``i``'s region view for :func:`encode_image_and_regions` (None
    when the model's own input shows the whole image) and ``boxes``
    (original pixels) in the view's pixels; an :class:`EmbedError` naming
    the row for a box with no area there. ``lm`` is the model or its
    :class:`~.views.ViewSpec`."""
    rv = region_view(lm, ds.load_image(i) if image is None else image, view)
    try:
        mapped = rv.boxes(boxes, f"{ds.manifest_file}: row {i} (image_id {ds.image_ids[i]!r})")
    except ViewError as exc:
        raise EmbedError(str(exc)) from None
    return rv.pixels, torch.from_numpy(mapped)


def _encode_roi(lm, batch, roi_scale: float = 1.0):
    compute = lm.compute
    pixels = compute.to(torch.stack([p for p, _, _ in batch]))
    views = [compute.to(v) for _, v, _ in batch]
    boxes = [compute.to(b) for _, _, b in batch]
    return encode_image_and_regions(lm.model, pixels, boxes, roi_scale, views)


def _encode_crops(lm, batch):
    compute = lm.compute
    img = lm.model.encode_image(compute.to(torch.stack([whole for whole, _ in batch])))
    reg = lm.model.encode_image(compute.to(torch.stack([c for _, crops in batch for c in crops])))
    return img, reg

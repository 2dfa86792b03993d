"""Image, region and class-text embeddings and zero-shot scores (SPEC §1).

Region embeddings take one backbone pass per image:

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
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from ..config import EMBEDDING_MODES as MODES
from ..config import InputError
from ..io.files import atomic_dir
from ..io.tables import fixed_list, matrix
from ..models import LoadedModel, visual_architecture
from .regions import propose_dataset

ROI_SCALE = {"roi": 1.0, "roi-half": 0.5}


class EmbedError(InputError):
    pass


# --------------------------------------------------------------------------- boxes

def input_boxes(boxes: np.ndarray, width: float, height: float, preprocess_cfg: dict,
                image_size: int) -> np.ndarray:
    """Map boxes from original pixels to the preprocessed input's pixels.

    Mirrors open_clip's evaluation transform (``resize_mode`` ``shortest``:
    resize the short side then centre-crop; ``squash``: resize both sides;
    ``longest``: resize the long side then centre-pad), and clips to the input.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = float(image_size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "squash":
        sx, sy, ox, oy = s / width, s / height, 0.0, 0.0
    else:
        scale = s / (min(width, height) if mode == "shortest" else max(width, height))
        new_w, new_h = width * scale, height * scale
        sx = sy = scale
        ox, oy = (new_w - s) / 2.0, (new_h - s) / 2.0
    out = np.empty_like(boxes)
    out[:, [0, 2]] = boxes[:, [0, 2]] * sx - ox
    out[:, [1, 3]] = boxes[:, [1, 3]] * sy - oy
    return np.clip(out, 0.0, s).astype(np.float32)


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


def pool_at_size(pool, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` on a feature map of any size: the
    spatial part of its positional embedding is resized bicubically to the
    map (the usual way CLIP models change resolution)."""
    pos = pool.positional_embedding
    side = int(round((pos.shape[0] - 1) ** 0.5))
    h, w = x.shape[-2:]
    if (h, w) != (side, side):
        grid = pos[1:].reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid[0].flatten(1).T], dim=0)
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


def _resnet_image_and_regions(visual, pixels, boxes, roi_scale: float = 1.0):
    x = visual.stem(pixels)
    feat3 = visual.layer3(visual.layer2(visual.layer1(x)))
    image = visual.attnpool(visual.layer4(feat3))
    h3, w3 = feat3.shape[-2:]
    size = (max(1, round(h3 * roi_scale)), max(1, round(w3 * roi_scale)))
    rois = roi_align(feat3, boxes, output_size=size, spatial_scale=w3 / pixels.shape[-1],
                     sampling_ratio=0, aligned=True)
    feat4 = visual.layer4(rois)
    regions = visual.attnpool(feat4) if size == (h3, w3) else pool_at_size(visual.attnpool, feat4)
    return image, regions


def _vit_image_and_regions(visual, pixels, boxes):
    x = visual.transformer(visual._embeds(pixels))
    pooled, _ = visual._pool(x)
    image = pooled @ visual.proj if visual.proj is not None else pooled
    n_prefix = x.shape[1] - visual.grid_size[0] * visual.grid_size[1]
    gh, gw = visual.grid_size
    tokens = x[:, n_prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
    rois = roi_align(tokens, boxes, output_size=(gh, gw), spatial_scale=gw / pixels.shape[-1],
                     sampling_ratio=0, aligned=True)
    regions = visual.ln_post(rois.mean(dim=(2, 3)))
    if visual.proj is not None:
        regions = regions @ visual.proj
    return image, regions


def encode_image_and_regions(model: torch.nn.Module, pixels: torch.Tensor,
                             boxes: Sequence[torch.Tensor], roi_scale: float = 1.0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised image features [B, D] and region features [ΣR_i, D], one
    backbone pass per image; ``boxes[i]`` is [R_i, 4] in input-pixel coords.
    ``roi_scale`` < 1 (ResNet only) RoI-aligns onto that fraction of the
    layer3 map's size (mode ``roi-half``); 1 is SPEC §1.2."""
    arch = visual_architecture(model)
    boxes = [b.to(pixels.dtype) for b in boxes]
    if arch == "resnet":
        return _resnet_image_and_regions(model.visual, pixels, boxes, roi_scale)
    if arch == "vit":
        return _vit_image_and_regions(model.visual, pixels, boxes)
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
    """Stack the evaluation transform of the chosen images: [B, 3, S, S]."""
    indices = range(len(ds)) if indices is None else indices
    it = tqdm(indices, desc="load images", leave=False, disable=not progress)
    return torch.stack([lm.preprocess(ds.load_image(i)) for i in it])


def embed_dataset(lm: LoadedModel, ds, proposer: str = "quadrants", mode: str = "auto",
                  batch_size: int = 64, progress: bool = True, cache=None) -> Embeddings:
    """Image and region embeddings of every image of ``ds`` (SPEC §1.2).

    With ``cache`` (an :class:`~ravl_pipeline.core.cache.EmbeddingCache`), images
    already embedded under the same model, boxes and mode are read back and
    only the others are computed (and added to the cache).
    """
    if cache is not None:
        return cache.embed(lm, ds, proposer=proposer, mode=mode, batch_size=batch_size, progress=progress)
    mode = resolve_mode(lm.model, mode)
    proposals = propose_dataset(ds, proposer)
    device = next(lm.model.parameters()).device
    image_out, region_out = [], []
    lm.model.eval()
    bar = tqdm(total=len(ds), desc=f"embed ({mode})", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(ds), batch_size):
            idx = list(range(start, min(start + batch_size, len(ds))))
            if mode in ROI_SCALE:
                img, reg = _embed_batch_roi(lm, ds, idx, proposals, device, ROI_SCALE[mode])
            else:
                img, reg = _embed_batch_crop(lm, ds, idx, proposals, device)
            image_out.append(F.normalize(img.float(), dim=-1).cpu().numpy())
            region_out.append(F.normalize(reg.float(), dim=-1).cpu().numpy())
            bar.update(len(idx))
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


def _embed_batch_roi(lm, ds, idx, proposals, device, roi_scale: float = 1.0):
    pixels = preprocess_images(lm, ds, idx).to(device)
    boxes = []
    for i in idx:
        w, h = ds.image_size(i)
        boxes.append(torch.from_numpy(input_boxes(proposals[i], w, h, lm.preprocess_cfg, lm.image_size)).to(device))
    return encode_image_and_regions(lm.model, pixels, boxes, roi_scale)


def _embed_batch_crop(lm, ds, idx, proposals, device):
    whole, crops = [], []
    for i in idx:
        image = ds.load_image(i)
        whole.append(lm.preprocess(image))
        for x1, y1, x2, y2 in proposals[i]:
            crops.append(lm.preprocess(image.crop((float(x1), float(y1), float(x2), float(y2)))))
    img = lm.model.encode_image(torch.stack(whole).to(device))
    reg = lm.model.encode_image(torch.stack(crops).to(device))
    return img, reg

"""The losses of Stage 2 and its baselines (SPEC §3.3, §3.6), as plain
functions of features, labels and group ids."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DEFAULT_TAU

__all__ = ["clip_loss", "region_aware_loss", "group_dro_step", "class_prompt_logits"]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (the standard CLIP objective)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def region_aware_loss(region_feats: torch.Tensor, region_image: torch.Tensor, spurious: torch.Tensor,
                      labels: torch.Tensor, text_feats: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """``L_R + L_A`` of SPEC §3.3, averaged over images with a relevant region.

    ``region_feats`` [M, D] (any norm) of the batch's regions, ``region_image``
    [M] their image (0..B-1), ``spurious`` [M] bool, ``labels`` [B] class
    indices into ``text_feats`` [C, D]. Everything stays in log space:
    ``log σ(R, y)`` is a max of ``cos/τ``, and each ``−log(a / Σ)`` is
    ``logsumexp(terms) − log a``.
    """
    f = F.normalize(region_feats, dim=-1)
    g = F.normalize(text_feats, dim=-1)
    batch_labels, lab_pos = torch.unique(labels, return_inverse=True)  # Y_B and y_i's column in it
    logits = f @ g[batch_labels].T / tau  # [M, |Y_B|] = log s(r, y)
    n_images = len(labels)
    neg_inf = torch.finfo(logits.dtype).min  # finite: keeps max/logsumexp gradients NaN-free
    log_sigma = _log_sigma_relevant(logits, region_image, spurious, n_images, neg_inf)  # [B, |Y_B|]
    has_relevant = torch.zeros(n_images, dtype=torch.bool, device=logits.device)
    has_relevant[region_image[~spurious]] = True
    if not has_relevant.any():
        return region_feats.sum() * 0.0
    own = log_sigma.gather(1, lab_pos[:, None]).squeeze(1)  # log σ(R^r_i, y_i)
    spur = logits[spurious]  # [S, |Y_B|]

    # L_R: Σ_y σ(R^r_i, y) + Σ_{r∈R^s_B} max_y s(r, y)
    spur_max = spur.max(dim=1).values if len(spur) else logits.new_zeros(0)
    terms_r = torch.cat([log_sigma, spur_max[None, :].expand(n_images, -1)], dim=1)
    loss_r = torch.logsumexp(terms_r, dim=1) - own

    # L_A: σ(R^r_i, y_i) + Σ_{j: y_j≠y_i} σ(R^r_j, y_i) + Σ_{r∈R^s_B} s(r, y_i)
    others = log_sigma[:, lab_pos].T  # [i, j] = log σ(R^r_j, y_i)
    others = others.masked_fill(labels[None, :] == labels[:, None], neg_inf)
    spur_own = spur[:, lab_pos].T  # [i, r] = log s(r, y_i)
    terms_a = torch.cat([own[:, None], others, spur_own], dim=1)
    loss_a = torch.logsumexp(terms_a, dim=1) - own

    return (loss_r + loss_a)[has_relevant].mean()


def _log_sigma_relevant(logits: torch.Tensor, region_image: torch.Tensor, spurious: torch.Tensor,
                        n_images: int, neg_inf: float) -> torch.Tensor:
    """``log σ(R^r_i, y) = max_{r∈R^r_i} log s(r, y)`` as [B, |Y_B|]; ``neg_inf``
    where image ``i`` has no relevant region (σ of an empty set is 0)."""
    counts = torch.bincount(region_image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(region_image, stable=True)
    slot = torch.empty_like(region_image)
    slot[order] = torch.arange(len(region_image), device=region_image.device) - starts[region_image[order]]
    width = int(counts.max().item()) if len(counts) else 0
    masked = logits.masked_fill(spurious[:, None], neg_inf)
    dense = logits.new_full((n_images, max(width, 1), logits.shape[1]), neg_inf)
    dense = dense.index_put((region_image, slot), masked)
    return dense.max(dim=1).values


def class_prompt_logits(model, pixels: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
    image = F.normalize(model.encode_image(pixels), dim=-1)
    return model.logit_scale.exp() * image @ F.normalize(class_text, dim=-1).T


def group_dro_step(per_sample: torch.Tensor, groups: torch.Tensor, q: torch.Tensor,
                   step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Online group DRO (Sagawa et al. 2020): mean loss per group (0 for
    groups absent from the batch), ``q ← q·exp(η·loss_g)`` renormalised, and
    the loss ``Σ_g q_g·loss_g``. Returns (loss, new q)."""
    n_groups = len(q)
    sums = torch.zeros(n_groups, dtype=per_sample.dtype).index_add(0, groups, per_sample)
    counts = torch.bincount(groups, minlength=n_groups).to(per_sample.dtype)
    group_loss = sums / counts.clamp(min=1)
    q = q * torch.exp(step_size * group_loss.detach())
    q = q / q.sum()
    return (q * group_loss).sum(), q

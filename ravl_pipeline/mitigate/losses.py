"""The losses of Stage 2 and its baselines (SPEC §3.3, §3.6), as plain
functions of features, labels and group ids."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DEFAULT_TAU, REGION_LOSS_FORMS

__all__ = ["clip_loss", "region_aware_loss", "REGION_LOSS_FORMS", "spurious_aware_terms", "group_dro_step",
           "class_prompt_logits"]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (the standard CLIP objective)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def region_aware_loss(region_feats: torch.Tensor, region_image: torch.Tensor, spurious: torch.Tensor,
                      labels: torch.Tensor, text_feats: torch.Tensor, tau: float = DEFAULT_TAU, *,
                      form: str = "spec", spurious_class: torch.Tensor | None = None,
                      parts: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``L_R + L_A`` of SPEC §3.3, averaged over images with a relevant region.

    ``region_feats`` [M, D] (any norm) of the batch's regions, ``region_image``
    [M] their image (0..B-1), ``spurious`` [M] bool, ``labels`` [B] class
    indices into ``text_feats`` [C, D]. Everything stays in log space:
    ``log σ(R, y)`` is a max of ``cos/τ``, and each ``−log(a / Σ)`` is
    ``logsumexp(terms) − log a``.

    ``form="spec"`` is SPEC §3.3: every spurious region of the batch enters
    the denominator of L_R through its best-matching batch class
    (``max_y s(r, y)``) and the denominator of L_A of every image
    (``s(r, y_i)``), so spurious regions are pushed away from every class
    text and every class text away from them. ``form="correlated"`` pushes a
    spurious region away from the text of its feature's correlated class only
    (``spurious_class`` [M], class index per region, −1 where not spurious
    or where the feature's class is not among ``text_feats``: such a region
    enters neither denominator):
    ``s(r, c(r))`` in L_R, and in L_A only for the images of that class.
    ``parts=True`` returns ``(L_R, L_A)`` (each averaged the same way).
    """
    if form not in REGION_LOSS_FORMS:
        raise ValueError(f"region loss form must be one of {', '.join(REGION_LOSS_FORMS)}, got {form!r}")
    if form == "correlated" and spurious_class is None:
        raise ValueError("region loss form 'correlated' needs the correlated class of every spurious region")
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
        zero = region_feats.sum() * 0.0
        return (zero, zero) if parts else zero
    own = log_sigma.gather(1, lab_pos[:, None]).squeeze(1)  # log σ(R^r_i, y_i)
    others = log_sigma[:, lab_pos].T  # [i, j] = log σ(R^r_j, y_i)
    others = others.masked_fill(labels[None, :] == labels[:, None], neg_inf)

    if form == "spec":
        spur = logits[spurious]  # [S, |Y_B|]
        # L_R: Σ_y σ(R^r_i, y) + Σ_{r∈R^s_B} max_y s(r, y)
        spur_r = spur.max(dim=1).values if len(spur) else logits.new_zeros(0)
        spur_r = spur_r[None, :].expand(n_images, -1)
        # L_A: … + Σ_{r∈R^s_B} s(r, y_i)
        spur_a = spur[:, lab_pos].T  # [i, r] = log s(r, y_i)
    else:
        cls = spurious_class[spurious]
        # a spurious region whose feature has no class among the texts (−1) has nothing to be pushed from
        own_text = (f[spurious] * g[cls.clamp(min=0)]).sum(-1) / tau  # log s(r, c(r))
        own_text = own_text.masked_fill(cls < 0, neg_inf)
        spur_r = own_text[None, :].expand(n_images, -1)
        spur_a = own_text[None, :].masked_fill(labels[:, None] != cls[None, :], neg_inf)
    loss_r = torch.logsumexp(torch.cat([log_sigma, spur_r], dim=1), dim=1) - own
    loss_a = torch.logsumexp(torch.cat([own[:, None], others, spur_a], dim=1), dim=1) - own
    if parts:
        return loss_r[has_relevant].mean(), loss_a[has_relevant].mean()
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


def spurious_aware_terms(image_feats: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                         attribute_text: torch.Tensor) -> dict[str, torch.Tensor]:
    """The in-modal and cross-modal terms of Spurious-Aware fine-tuning (Yang
    et al., ICML 2023), on cosines (``labels`` index ``class_text`` [C, D];
    ``attribute_text`` [S, D] names the spurious attributes):

    * ``image``: minus the mean cosine over pairs of distinct images of one
      class plus the mean cosine over pairs of images of different classes;
    * ``text``: the mean cosine between the texts of different classes;
    * ``class``: minus the mean cosine of images to their class text plus
      the mean cosine of images to the other class texts;
    * ``spurious_image``: mean ``|cos(image, attribute)|``;
    * ``spurious_text``: mean ``|cos(class text of the batch, attribute)|``.

    Means are over the pairs that exist (an image alone in its class has no
    positive pair); each term is 0 where it has no pair at all.
    """
    f = F.normalize(image_feats, dim=-1)
    t = F.normalize(class_text, dim=-1)
    a = F.normalize(attribute_text, dim=-1)
    n, c = len(f), len(t)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    sim = f @ f.T
    zero = f.sum() * 0.0
    image = -_masked_mean(sim, same & ~eye, zero) + _masked_mean(sim, ~same, zero)
    tt = t @ t.T
    text = _masked_mean(tt, ~torch.eye(c, dtype=torch.bool, device=t.device), zero)
    ft = f @ t.T  # [n, C]
    own = F.one_hot(labels, c).bool()
    cls = -ft[own].mean() + (_masked_mean(ft, ~own, zero) if c > 1 else zero)
    spurious_image = (f @ a.T).abs().mean()
    spurious_text = (t[torch.unique(labels)] @ a.T).abs().mean()
    return {"image": image, "text": text, "class": cls, "spurious_image": spurious_image,
            "spurious_text": spurious_text}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    return values[mask].mean() if mask.any() else empty


def class_prompt_logits(model, pixels: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
    image = F.normalize(model.encode_image(pixels), dim=-1)
    return model.logit_scale.exp() * image @ F.normalize(class_text, dim=-1).T


def group_dro_step(per_sample: torch.Tensor, groups: torch.Tensor, q: torch.Tensor,
                   step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Online group DRO (Sagawa et al. 2020): mean loss per group (0 for
    groups absent from the batch), ``q ← q·exp(η·loss_g)`` renormalised, and
    the loss ``Σ_g q_g·loss_g``. Returns (loss, new q)."""
    n_groups = len(q)
    groups, q = groups.to(per_sample.device), q.to(per_sample.device)
    sums = torch.zeros(n_groups, dtype=per_sample.dtype, device=per_sample.device).index_add(0, groups, per_sample)
    counts = torch.bincount(groups, minlength=n_groups).to(per_sample.dtype)
    group_loss = sums / counts.clamp(min=1)
    q = q * torch.exp(step_size * group_loss.detach())
    q = q / q.sum()
    return (q * group_loss).sum(), q

"""The training loss of every sequence model: the official HLLM `nce`, a sampled softmax over shared negatives.

Scores are cosine similarities (both sides L2-normalised) times a learnable scale, `logit_scale` = log(scale),
initialised to log(1/0.07) and clamped so the scale stays in [1, 100]. Negatives are drawn uniformly from the
catalogue and shared by every position of every user in the global batch. Unlike the official code, a negative
is masked when it *is* the target (by item id), not when its cosine with the target exceeds 0.99: once
embeddings collapse that rule masks everything and training silently stops. Logits and loss are fp32.

Shapes: P valid positions, D embedding size, K negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class NCEOutput:
    loss_per_position: torch.Tensor
    """(P,) fp32."""
    surviving_negatives: torch.Tensor
    """(P,) negatives left after masking collisions with the target."""
    top1_correct: torch.Tensor
    """(P,) bool: the positive outscored every surviving negative."""


def nce_loss(user_out: torch.Tensor, targets: torch.Tensor, target_ids: torch.Tensor, negatives: torch.Tensor,
             negative_ids: torch.Tensor, logit_scale: torch.Tensor) -> NCEOutput:
    """user_out (P, D) predictions at valid positions, targets (P, D) the next items' embeddings, target_ids (P,),
    negatives (K, D) shared by every position, negative_ids (K,), logit_scale a scalar (log of the scale)."""
    with torch.autocast(user_out.device.type, enabled=False):  # fp32 logits even inside a bf16 forward
        return _nce_loss(user_out, targets, target_ids, negatives, negative_ids, logit_scale)


def _nce_loss(user_out, targets, target_ids, negatives, negative_ids, logit_scale) -> NCEOutput:
    u = F.normalize(user_out.float(), dim=-1)  # (P, D)
    t = F.normalize(targets.float(), dim=-1)  # (P, D)
    n = F.normalize(negatives.float(), dim=-1)  # (K, D)
    scale = logit_scale.float().exp()
    pos = (u * t).sum(-1, keepdim=True) * scale  # (P, 1)
    neg = (u @ n.T) * scale  # (P, K)
    collide = target_ids[:, None] == negative_ids[None, :]  # (P, K)
    # mask after scaling: a -inf that reaches the product would make the scale's gradient NaN
    neg = neg.masked_fill(collide, float("-inf"))
    logits = torch.cat([pos, neg], dim=1)  # (P, 1 + K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction="none")  # (P,)
    return NCEOutput(loss, (~collide).sum(1), logits.argmax(1) == 0)


def softmax_loss(user_out: torch.Tensor, target_ids: torch.Tensor, catalogue: torch.Tensor,
                 logit_scale: torch.Tensor) -> NCEOutput:
    """Full cross-entropy over the catalogue: user_out (P, D), target_ids (P,) in 1..N, catalogue (N, D) the
    embeddings of items 1..N in order (or of any N items, target_ids then being each target's row + 1). The same
    loss as nce_loss with every item a negative (the target's own copy masked), computed without the (P, 1 + N)
    concatenation and mask: one matmul and one cross-entropy."""
    with torch.autocast(user_out.device.type, enabled=False):
        return _softmax_loss(user_out, target_ids, catalogue, logit_scale)


def _softmax_loss(user_out, target_ids, catalogue, logit_scale) -> NCEOutput:
    u = F.normalize(user_out.float(), dim=-1)  # (P, D)
    c = F.normalize(catalogue.float(), dim=-1)  # (N, D)
    return _catalogue_cross_entropy((u @ c.T) * logit_scale.float().exp(), target_ids)


def _catalogue_cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor) -> NCEOutput:
    """logits (P, N) over items 1..N, target_ids (P,) -> the loss terms (every other item a negative)."""
    loss = F.cross_entropy(logits, target_ids - 1, reduction="none")  # (P,)
    kept = torch.full_like(target_ids, logits.shape[1] - 1)
    return NCEOutput(loss, kept, logits.argmax(1) == target_ids - 1)


def projected_softmax_loss(hidden: torch.Tensor, projection: nn.Linear, target_ids: torch.Tensor,
                           catalogue: torch.Tensor, logit_scale: torch.Tensor) -> NCEOutput:
    """softmax_loss(projection(hidden), target_ids, catalogue, logit_scale) for hidden (P, D) in a User LLM's
    width D below the item size D_item, scored in D: with W, b the projection and c the normalised catalogue,
    cos(W h + b, c) = (h . W^T c + b . c) / |W h + b|, so the (P, N) scores cost P*N*D multiply-adds instead of
    P*N*D_item (8x fewer for 384-d items and a 50-wide SASRec)."""
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.float()
        norms = projection(h).norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (P, 1), as F.normalize does
        c = F.normalize(catalogue.float(), dim=-1)  # (N, D_item)
        bias = projection.bias.float() if projection.bias is not None else torch.zeros_like(c[0])
        keys = torch.cat([c @ projection.weight.float(), (c @ bias)[:, None]], dim=1)  # (N, D + 1)
        # the bias term, the norm and the scale ride in the matmul: no pass over the (P, N) scores besides it
        queries = torch.cat([h, torch.ones_like(h[:, :1])], dim=1) * (logit_scale.float().exp() / norms)  # (P, D+1)
        return _catalogue_cross_entropy(queries @ keys.T, target_ids)  # (P, N) scores

"""The SFT loss terms as pure functions of tensors (each tested against hand-computed cases).

* :func:`lm_cross_entropy` keeps the model able to write its response (and the embed token);
* :func:`kl_to_reference` keeps its next-token distributions near the frozen base model;
* :func:`info_nce` pulls each query to its positive document against the rest of the batch;
* :func:`triplet_margin` asks each positive to beat each hard negative by a margin.

Embeddings are expected L2-normalised, so inner products are cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(name: str, x: torch.Tensor, ndim: int) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)} ({x.dtype})")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor, got {x.dtype}")


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits (N, V) at the positions *before* each target; targets (N,)."""
    _check("logits", logits, 2)
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: expected shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    return F.cross_entropy(logits.float(), targets)


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, unknown: int | None = None) -> torch.Tensor:
    """Mean over positions of KL(p_model || p_reference); both (N, V) logits at the same positions.

    This direction penalises the model for putting mass where the base model
    puts little, the usual choice for keeping a fine-tuned policy near its base.

    ``unknown``: a token id the reference never learned (the embed token added to
    a base model). Both distributions are then taken over the other tokens,
    renormalised. Counted in, the reference's ~1e-6 for it is a veto, not an
    anchor: against an LM term of equal weight the KL caps the token's
    probability at a few percent, and the model never learns to emit it.
    """
    _check("logits", logits, 2)
    if reference_logits.shape != logits.shape:
        raise ValueError(f"reference_logits: expected shape {tuple(logits.shape)}, got {tuple(reference_logits.shape)}")
    if unknown is not None:
        if not 0 <= unknown < logits.shape[1]:
            raise ValueError(f"unknown: token id {unknown} outside the vocabulary of {logits.shape[1]}")
        keep = torch.arange(logits.shape[1], device=logits.device) != unknown
        logits, reference_logits = logits[:, keep], reference_logits[:, keep]
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(reference_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive: torch.Tensor,
    temperature: float,
    exclude: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean cross-entropy of picking each query's positive among all candidates (per query: ``reduction="none"``).

    Args:
        queries: (B, d) query embeddings.
        candidates: (C, d) documents: every query's positive, in-batch others and hard negatives.
        positive: (B,) int64 index into ``candidates`` of each query's positive.
        temperature: softmax temperature on the cosine scores (> 0).
        exclude: optional (B, C) bool, True for candidates that must not count as negatives of
            that query (other documents judged relevant to it); never the positive itself.
    """
    _check("queries", queries, 2)
    _check("candidates", candidates, 2)
    if candidates.shape[1] != queries.shape[1]:
        raise ValueError(f"candidates: expected dim {queries.shape[1]}, got shape {tuple(candidates.shape)}")
    if positive.shape != queries.shape[:1]:
        raise ValueError(f"positive: expected shape ({queries.shape[0]},), got {tuple(positive.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = queries.float() @ candidates.float().T / temperature  # (B, C)
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude: expected shape {tuple(scores.shape)}, got {tuple(exclude.shape)}")
        if exclude.gather(1, positive[:, None]).any():
            raise ValueError("exclude must not mask a query's own positive")
        scores = scores.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(scores, positive, reduction=reduction)


def triplet_margin(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over (query, hard negative) of max(0, margin - cos(q, p) + cos(q, n)).

    queries, positives: (B, d); negatives: (B, H, d), H hard negatives per query.
    """
    _check("queries", queries, 2)
    _check("negatives", negatives, 3)
    if positives.shape != queries.shape or negatives.shape[::2] != queries.shape:
        raise ValueError(
            f"expected positives {tuple(queries.shape)} and negatives (B, H, d) matching queries "
            f"{tuple(queries.shape)}; got {tuple(positives.shape)} and {tuple(negatives.shape)}"
        )
    pos = (queries * positives).sum(-1, keepdim=True)  # (B, 1)
    neg = torch.einsum("bd,bhd->bh", queries, negatives)  # (B, H)
    return F.relu(margin - pos + neg).mean()

"""Fit an SPT-patched pretrained model's data-dependent parts before fine-tuning: FFN blocks, routers, PQ codebooks.

Freshly patched, a model quantises each layer's queries and keys with a codebook fitted to whatever batch came first,
and routes tokens with random routers over blocks of consecutive hidden units. The router is what costs most: a
pretrained SwiGLU FFN is not block-sparse, so masking the wrong half of it wrecks the model (SmolLM2-135M, 2 of 4
blocks: held-out loss 3.6 -> 11-12) before fine-tuning has a chance to teach the router anything. `calibrate` runs
a few batches through the model (the FFNs dense, so every layer sees the pretrained model's inputs) and

1. regroups each FFN's hidden units so that units that fire on the same tokens share a block (balanced k-means on
   the units' activation profiles, as in MoEfication), so a token's important units concentrate in few blocks;
2. fits every router by ridge regression (closed form, no gradient steps) to predict the norm of each block's
   contribution to the FFN output, so top-k of the router picks the blocks that matter most for each token;
3. refits every layer's PQ codebook by k-means on the queries and keys of all calibration batches;
4. fits, under the fitted routers, what the routed FFN adds back for each block a token skips
   (`RoutedMLP.skip_compensation`): the least-squares regression of the skipped blocks' summed output on which
   blocks were skipped. It is fitted jointly because a per-block mean of the skipped output helps coarse blocks
   (SmolLM2, 2 of 4: +77% -> +51%) but hurt fine ones (48 of 64: +7.4% -> +8.2%), where 16 noisy means add up.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .patching import SPTAttentionState
from .routed_ffn import route_tokens
from .routed_mlp import RoutedMLP, skipped_blocks

PROFILE_TOKENS = 2048  # tokens (evenly spaced over each batch's) whose activations describe a hidden unit
KMEANS_ITERATIONS = 10


class _UnitProfiles:
    """Pass 1: per hidden unit, |activation| x |its W_down column| on a sample of calibration tokens."""

    def __init__(self, per_batch: int):
        self.per_batch = per_batch
        self.columns: list[torch.Tensor] = []

    def observe(self, mlp: RoutedMLP, tokens: torch.Tensor) -> torch.Tensor:
        h, w_down = mlp.unit_activations(tokens)
        pick = torch.linspace(0, len(h) - 1, min(len(h), self.per_batch), device=h.device).long()
        self.columns.append((h[pick].abs() * w_down.norm(dim=0)).T.float().cpu())  # (I, tokens)
        return h @ w_down.T

    def unit_order(self, n_blocks: int) -> torch.Tensor:
        return balanced_kmeans_order(torch.cat(self.columns, dim=1), n_blocks)


class _RouterFit:
    """Pass 2: running normal equations of one router's ridge regression, block-norm targets from [x, 1]."""

    def __init__(self, hidden: int, n_blocks: int):
        self.gram = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
        self.cross = torch.zeros(hidden + 1, n_blocks, dtype=torch.float64)
        self.tokens = 0

    def observe(self, mlp: RoutedMLP, tokens: torch.Tensor) -> torch.Tensor:
        y, norms = mlp.dense_with_block_norms(tokens)
        features = torch.cat([tokens, torch.ones_like(tokens[:, :1])], dim=1).double().cpu()
        self.gram += features.T @ features
        self.cross += features.T @ norms.double().cpu()
        self.tokens += len(tokens)
        return y

    def solve(self, ridge: float) -> torch.Tensor:
        """(n_blocks, hidden + 1): weights and bias."""
        return ridge_solve(self.gram, self.cross, ridge).T


class _CompensationFit:
    """Pass 3: running normal equations of the compensation's least squares: the summed output of the blocks a
    token skips (its routing error), regressed on the 0/1 mask of which blocks it skips."""

    def __init__(self, hidden: int, n_blocks: int):
        self.gram = torch.zeros(n_blocks, n_blocks, dtype=torch.float64)
        self.cross = torch.zeros(n_blocks, hidden, dtype=torch.float64)

    def observe(self, mlp: RoutedMLP, tokens: torch.Tensor) -> torch.Tensor:
        parts = mlp.block_outputs(tokens)
        picked, _ = route_tokens(mlp.router(tokens), mlp.active_blocks)
        skipped = skipped_blocks(picked, mlp.n_blocks).to(parts.dtype)
        error = torch.einsum("tn,tnh->th", skipped, parts).double().cpu()
        skipped = skipped.double().cpu()
        self.gram += skipped.T @ skipped
        self.cross += skipped.T @ error
        return parts.sum(1)

    def solve(self, ridge: float) -> torch.Tensor:
        """(n_blocks, hidden): what to add back for each skipped block."""
        return ridge_solve(self.gram, self.cross, ridge)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W |A W - B|^2 + lambda |W|^2 from gram = A^T A and cross = A^T B; lambda is ridge x mean diag(gram).

    lstsq, not solve: with ridge 0 a column A never uses (a block no token skipped) leaves gram singular."""
    scale = ridge * gram.diagonal().mean()
    return torch.linalg.lstsq(gram + scale * torch.eye(len(gram), dtype=gram.dtype), cross).solution


def balanced_kmeans_order(profiles: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """A permutation of the rows of `profiles` (I, d) putting similar rows (cosine) into n equal consecutive blocks.

    Spherical k-means whose assignment step fills blocks greedily, most similar (row, centroid) pairs first, so
    every block gets exactly I / n rows; deterministic (centroids start at evenly spaced rows).
    """
    units = profiles.shape[0]
    capacity = units // n_blocks
    rows = F.normalize(profiles.float(), dim=1)
    centroids = rows[torch.linspace(0, units - 1, n_blocks).long()]
    assign = np.zeros(units, dtype=np.int64)
    for _ in range(KMEANS_ITERATIONS):
        similarity = (rows @ centroids.T).numpy()  # (I, n)
        assign.fill(-1)
        filled = np.zeros(n_blocks, dtype=np.int64)
        placed = 0
        for flat in np.argsort(-similarity, axis=None, kind="stable"):
            unit, block = divmod(int(flat), n_blocks)
            if assign[unit] < 0 and filled[block] < capacity:
                assign[unit] = block
                filled[block] += 1
                placed += 1
                if placed == units:  # the rest of the I x n pairs cannot change anything
                    break
        members = torch.from_numpy(assign)
        centroids = F.normalize(torch.stack([rows[members == b].mean(0) for b in range(n_blocks)]), dim=1)
    return torch.from_numpy(np.argsort(assign, kind="stable"))


def _run(model: nn.Module, observers: dict, batches: list, desc: str, progress: bool) -> None:
    """Forward `batches` in eval mode with each module's `calibration` set to its observer (the FFNs run dense)."""
    was_training = model.training
    model.eval()
    try:
        for module, observer in observers.items():
            module.calibration = observer
        for batch in tqdm(batches, desc=desc, disable=not progress):
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(input_ids=batch)
    finally:
        model.train(was_training)
        for module in observers:
            module.calibration = None


def _patched_parts(model: nn.Module) -> tuple[list[RoutedMLP], list[SPTAttentionState]]:
    mlps = [m for m in model.modules() if isinstance(m, RoutedMLP)]
    attention = [m.spt for m in model.modules() if isinstance(getattr(m, "spt", None), SPTAttentionState)]
    if not mlps and not attention:
        raise ValueError("needs an SPT-patched model: call spt_kernels.patch_model first")
    return mlps, attention


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, ridge: float = 1e-3, regroup: bool = True,
              compensate: bool = True, progress: bool = True) -> dict:
    """Fit the SPT-patched `model` on `batches` (input-id tensors or dicts of model kwargs): see the module doc.

    regroup=False keeps each FFN's blocks as they are (consecutive units, or an earlier calibration's grouping);
    compensate=False adds nothing back for skipped blocks (the plain routed FFN); ridge applies to both fits.
    Returns a summary: batches and tokens seen, layers fitted.
    """
    mlps, attention = _patched_parts(model)
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate got no batches")
    if regroup and mlps:
        profiles = {mlp: _UnitProfiles(max(1, PROFILE_TOKENS // len(batches))) for mlp in mlps}
        _run(model, profiles, batches, "SPT calibration: FFN blocks", progress)
        for mlp in mlps:
            mlp.unit_order.copy_(mlp.unit_order[profiles[mlp].unit_order(mlp.n_blocks).to(mlp.unit_order.device)])
    fits = {mlp: _RouterFit(mlp.router.in_features, mlp.n_blocks) for mlp in mlps}
    rows = {state: [] for state in attention}
    _run(model, {**fits, **rows}, batches, "SPT calibration: routers, codebooks", progress)
    for state, chunks in rows.items():
        state.pq.initialize(torch.cat(chunks))
    for mlp, fit in fits.items():
        solution = fit.solve(ridge).to(mlp.router.weight.dtype)
        mlp.router.weight.copy_(solution[:, :-1])
        mlp.router.bias.copy_(solution[:, -1])
    routed = [mlp for mlp in mlps if mlp.active_blocks < mlp.n_blocks]
    compensation = {mlp: _CompensationFit(mlp.router.in_features, mlp.n_blocks) for mlp in routed if compensate}
    if compensation:
        _run(model, compensation, batches, "SPT calibration: skipped-block compensation", progress)
    for mlp in mlps:
        fit = compensation.get(mlp)
        mlp.skip_compensation.copy_(fit.solve(ridge) if fit else torch.zeros_like(mlp.skip_compensation))
    return {
        "batches": len(batches),
        "tokens": fits[mlps[0]].tokens if mlps else None,
        "router_fit_layers": len(mlps),
        "codebook_layers": len(attention),
    }


class _RouterRecall:
    """Counts, per token, how many of its k largest blocks (by output norm) the router's top-k picks."""

    def __init__(self):
        self.hits = 0
        self.picks = 0

    def observe(self, mlp: RoutedMLP, tokens: torch.Tensor) -> torch.Tensor:
        y, norms = mlp.dense_with_block_norms(tokens)
        picked, _ = route_tokens(mlp.router(tokens), mlp.active_blocks)
        best = norms.topk(mlp.active_blocks, dim=-1).indices
        self.hits += int((picked[:, :, None] == best[:, None, :]).any(-1).sum())
        self.picks += picked.numel()
        return y


@torch.no_grad()
def router_recall(model: nn.Module, batches: Iterable, progress: bool = False) -> list[float]:
    """Per routed FFN layer: the fraction of each token's k most important blocks that its router picks.

    "Important" is measured, not predicted: the norm of each block's share of the dense FFN output under the
    current weights. 1.0 means the router computes exactly the blocks a perfect top-k would; recall that falls
    during fine-tuning says the router no longer tracks the weights (recalibrate, with `regroup=False`).
    """
    mlps, _ = _patched_parts(model)
    recall = {mlp: _RouterRecall() for mlp in mlps}
    _run(model, recall, list(batches), "SPT router recall", progress)
    return [r.hits / max(1, r.picks) for r in recall.values()]

"""Fit an SPT-patched pretrained model's data-dependent parts before fine-tuning: PQ codebooks and FFN routers.

Freshly patched, a model quantises each layer's queries and keys with a codebook fitted to whatever batch came first,
and routes tokens with random routers. The random router is what costs most: a pretrained SwiGLU FFN is not
block-sparse, so masking the wrong half of it wrecks the model (SmolLM2-135M, 2 of 4 blocks: held-out loss 3.6 ->
10.7) before fine-tuning has a chance to teach the router anything. `calibrate` runs a few batches through the
model and

* fits every router by ridge regression (closed form, no gradient steps) to predict the norm of each block's
  contribution to the dense FFN output, so top-k of the router picks the blocks that matter most for each token;
  the FFN runs dense while calibrating, so every layer sees the inputs of the pretrained model;
* refits every layer's PQ codebook by k-means on the queries and keys of all calibration batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .patching import SPTAttentionState
from .routed_mlp import RoutedMLP



class _RouterFit:
    """Running normal equations of one router's ridge regression: block-norm targets from [x, 1]."""

    def __init__(self, hidden: int, n_blocks: int):
        self.gram = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
        self.cross = torch.zeros(hidden + 1, n_blocks, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor, norms: torch.Tensor) -> None:
        features = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).double().cpu()
        self.gram += features.T @ features
        self.cross += features.T @ norms.double().cpu()
        self.tokens += len(x)

    def solve(self, ridge: float) -> torch.Tensor:
        """(n_blocks, hidden + 1): weights and bias; ridge is relative to the mean diagonal of the Gram matrix."""
        scale = ridge * self.gram.diagonal().mean()
        eye = torch.eye(len(self.gram), dtype=torch.float64)
        return torch.linalg.solve(self.gram + scale * eye, self.cross).T


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, ridge: float = 1e-3, progress: bool = True) -> dict:
    """Fit routers and codebooks of the SPT-patched `model` on `batches` (input-id tensors or dicts of model kwargs).

    Returns a summary: batches and tokens seen, layers fitted.
    """
    mlps = [m for m in model.modules() if isinstance(m, RoutedMLP)]
    attention = [m.spt for m in model.modules() if isinstance(getattr(m, "spt", None), SPTAttentionState)]
    if not mlps and not attention:
        raise ValueError("calibrate needs an SPT-patched model: call spt_kernels.patch_model first")
    fits = {mlp: _RouterFit(mlp.router.in_features, mlp.n_blocks) for mlp in mlps}
    for mlp in mlps:
        mlp.calibration = fits[mlp]
    rows = {state: [] for state in attention}
    for state in attention:
        state.calibration = rows[state]
    was_training = model.training
    model.eval()
    batches_seen = 0
    try:
        for batch in tqdm(batches, desc="SPT calibration", disable=not progress):
            model(**batch) if isinstance(batch, dict) else model(input_ids=batch)
            batches_seen += 1
    finally:
        model.train(was_training)
        for module in [*mlps, *attention]:
            module.calibration = None
    if not batches_seen:
        raise ValueError("calibrate got no batches")
    for state, chunks in rows.items():
        state.pq.initialize(torch.cat(chunks))
    for mlp, fit in fits.items():
        solution = fit.solve(ridge).to(mlp.router.weight.dtype)
        mlp.router.weight.copy_(solution[:, :-1])
        mlp.router.bias.copy_(solution[:, -1])
    return {
        "batches": batches_seen,
        "tokens": fits[mlps[0]].tokens if mlps else None,
        "router_fit_layers": len(mlps),
        "codebook_layers": len(attention),
    }

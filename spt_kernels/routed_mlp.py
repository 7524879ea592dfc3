"""RoutedMLP: a drop-in replacement for a Llama-family gated MLP (Llama, Qwen2, SmolLM2) that runs the routed FFN."""

import torch
import torch.nn.functional as F
from torch import nn

from .host_flags import host_flag
from .routed_ffn import route_tokens, routed_ffn


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a Linear applies, including active LoRA adapters when peft has wrapped it.

    The routed FFN multiplies block slices of the weight, so a LoRA adapter on an MLP projection is folded in as
    W + scale * B @ A (differentiable in A and B). LoRA dropout cannot be folded in, so it is refused.
    """
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight
    weight = base.weight
    if linear.disable_adapters or linear.merged:  # merged: the base weight already holds the adapters
        return weight
    for name in linear.active_adapters:
        if name not in linear.lora_A:
            continue
        if linear.use_dora.get(name, False):
            raise NotImplementedError(f"DoRA adapter {name!r} on an MLP projection is not supported by the routed FFN")
        dropout = linear.lora_dropout[name]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            raise ValueError(
                f"LoRA adapter {name!r} has lora_dropout={dropout.p} on an MLP projection; the routed FFN folds "
                "LoRA into the weight and cannot apply dropout: use lora_dropout=0 or target only attention projections"
            )
        weight = weight + linear.get_delta_weight(name)
    return weight


def is_identity(order: torch.Tensor) -> bool:
    return torch.equal(order, torch.arange(len(order), device=order.device))


def skipped_blocks(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(T, n) float mask, 1 where a token's chosen blocks (T, k) do not include the block."""
    return torch.ones(len(blocks), n_blocks, device=blocks.device).scatter_(1, blocks, 0.0)


class RoutedMLP(nn.Module):
    """Routed form of `down(silu(gate(x)) * up(x))`: k of n hidden-unit blocks per token, chosen by a learned router.

    It adopts the original MLP's gate_proj / up_proj / down_proj modules (so state-dict keys and LoRA targets are
    unchanged) and adds `router`, a Linear(hidden, n), and `unit_order`, the hidden units in block order (block b
    runs units unit_order[b * I/n : (b+1) * I/n]); `calibrate` regroups units that fire together into one block,
    without touching the weights. The original module is kept (outside the module tree) for `unpatch_model`. While
    `calibration` is set (by `calibrate`) the forward hands the tokens to it and returns the dense FFN's output.

    `skip_compensation[b]` (hidden,) is added to the output for each block b a token skips: the bias compensation
    that structured pruning (e.g. FLAP) gives to pruned channels, made conditional on the routing. `calibrate` fits
    it by least squares (zero until then: the plain routed FFN).
    """

    def __init__(self, mlp: nn.Module, n_blocks: int, active_blocks: int, router_init_std: float, backend: str):
        super().__init__()
        act = getattr(getattr(mlp, "config", None), "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"the routed FFN implements SwiGLU (silu); this MLP uses {act!r}")
        bases = [getattr(p, "base_layer", p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]  # under LoRA
        if any(b.bias is not None for b in bases):
            raise ValueError("the routed FFN supports bias-free MLP projections only (mlp_bias=False)")
        gate_base = bases[0]
        if gate_base.out_features % n_blocks:
            raise ValueError(f"FFN width {gate_base.out_features} is not divisible into ffn_blocks={n_blocks}")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        weight = gate_base.weight
        self.router = nn.Linear(gate_base.in_features, n_blocks, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.router.weight, std=router_init_std)
        nn.init.zeros_(self.router.bias)
        self.register_buffer("unit_order", torch.arange(gate_base.out_features, device=weight.device))
        self.register_buffer("skip_compensation", torch.zeros(n_blocks, gate_base.in_features, device=weight.device,
                                                              dtype=weight.dtype))
        self.n_blocks = n_blocks
        self.active_blocks = active_blocks
        self.backend = backend
        self.calibration = None
        self.__dict__["dense_mlp"] = mlp  # not a submodule: neither trained, saved nor moved with this module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (T, hidden)
        if self.calibration is not None:
            return self.calibration.observe(self, tokens).view(x.shape)
        # The gate's gradient is a surrogate (its value is 1): it may train the router, but passed on into the
        # residual stream it would add a term no loss asked for to every earlier layer's gradient.
        blocks, gate = route_tokens(self.router(tokens.detach()), self.active_blocks)
        y = routed_ffn(tokens, *self.block_ordered_weights(), blocks, gate, self.n_blocks, self.backend)
        if self.active_blocks < self.n_blocks:
            y = y + skipped_blocks(blocks, self.n_blocks).to(y.dtype) @ self.skip_compensation.to(y.dtype)
        return y.view(x.shape)

    def block_ordered_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_gate, W_up (I, hidden) and W_down (hidden, I), LoRA included, hidden units in `unit_order`."""
        w_gate, w_up, w_down = (effective_weight(p) for p in (self.gate_proj, self.up_proj, self.down_proj))
        if host_flag(self, "unit_order", is_identity):
            return w_gate, w_up, w_down  # not regrouped: no weight copies
        return w_gate[self.unit_order], w_up[self.unit_order], w_down[:, self.unit_order]

    def unit_activations(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense FFN's hidden activations h (T, I) and W_down (hidden, I), units in `unit_order`."""
        w_gate, w_up, w_down = self.block_ordered_weights()
        return F.silu(tokens @ w_gate.T) * (tokens @ w_up.T), w_down

    def block_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each block's share (T, n, hidden) of the dense FFN output; summed over blocks it is that output."""
        h, w_down = self.unit_activations(tokens)
        n = self.n_blocks
        return torch.einsum("tnw,hnw->tnh", h.view(len(h), n, -1), w_down.view(len(w_down), n, -1))

    def dense_with_block_norms(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense FFN output (T, hidden) and the norm (T, n) of each block's share of it."""
        parts = self.block_outputs(tokens)
        return parts.sum(1), parts.norm(dim=-1)

    def restore(self) -> nn.Module:
        """The original dense MLP, given back the (possibly LoRA-wrapped) projections this module now holds."""
        mlp = self.dense_mlp
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = self.gate_proj, self.up_proj, self.down_proj
        return mlp

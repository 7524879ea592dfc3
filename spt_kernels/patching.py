"""Turn a Llama-family Hugging Face model (Llama, Qwen2, SmolLM2) into its SPT form in place, and back.

Attention: transformers 5.x picks each layer's attention function by name from `AttentionInterface` using
`config._attn_implementation`. `patch_model` registers `spt_attention_forward` under the name "spt" (plus an
"spt" mask function, without which transformers hands custom attention functions no mask at all) and selects it
with `set_attn_implementation`; every attention module also gets an `spt` submodule holding its layer's PQ codebooks.
FFN: every gated MLP is replaced by a `RoutedMLP` that adopts its projections.

LoRA (peft) composes either way round: the attention function does not touch the q/k/v/o projections, and the
routed FFN folds LoRA adapters of MLP projections into their weights. `unpatch_model` restores the original modules
and attention implementation, so the model computes exactly what it did before patching.
"""

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from .candidates import candidate_budget, select_candidates
from .config import SPTConfig
from .pq import ProductQuantizer, evenly_spaced_rows
from .routed_mlp import RoutedMLP
from .sparse_attention import sparse_attention

ATTN_IMPLEMENTATION = "spt"
CODEBOOK_ROWS = 4096  # query and key vectors (each, evenly spaced) a batch gives a codebook's k-means


class SPTAttentionState(nn.Module):
    """Per-layer SPT attention state: the PQ codebooks and the sparsity settings."""

    def __init__(self, head_dim: int, config: SPTConfig, previous_attn_implementation: str | None):
        super().__init__()
        self.pq = ProductQuantizer(head_dim, config.pq_subspace_dim, config.pq_codewords, config.codebook_decay)
        self.sparsity = config.sparsity
        self.sink_keys = config.sink_keys
        self.keep_self = config.keep_self
        self.backend = config.backend
        self.previous_attn_implementation = previous_attn_implementation
        self.calibration: list[torch.Tensor] | None = None  # set by `calibrate`: collects query and key rows


class _UpdateCodebookInBackward(torch.autograd.Function):
    """Identity on (query, key) whose backward moves the layer's codebooks one EMA step towards them.

    Updating in the forward would change the codebooks between a checkpointed layer's forward and its recompute
    (gradient checkpointing), which would then select other keys; the backward runs once per step, after any
    recompute. The price: a layer whose queries and keys get no gradient keeps its codebooks.
    """

    @staticmethod
    def forward(ctx, query, key, state):
        ctx.save_for_backward(query, key)
        ctx.state = state
        return query.view_as(query), key.view_as(key)

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        query, key = ctx.saved_tensors
        rows = torch.cat([query.reshape(-1, query.shape[-1]), key.reshape(-1, key.shape[-1])])
        ctx.state.pq.update(rows, ctx.state.backend)
        return grad_query, grad_key, None


def spt_key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The "spt" mask: just which keys are real tokens, (B, Lk) bool, or None; causality is built into selection."""
    if mask_function is not causal_mask_function:
        raise NotImplementedError(
            "SPT sparse attention supports causal + padding masks only (no packed sequences, sliding windows or "
            "custom mask functions)"
        )
    if q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError(
            "SPT sparse attention needs the queries to be the last key positions (no static / pre-allocated caches)"
        )
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)


def spt_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' AttentionInterface.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) after RoPE and cache update; returns ((B, Lq, H, D), None).
    In training mode the backward pass moves the layer's codebooks one EMA k-means step towards these queries and
    keys (see _UpdateCodebookInBackward).
    """
    state = getattr(module, "spt", None)
    if not isinstance(state, SPTAttentionState):
        raise RuntimeError(f"{type(module).__name__} has no SPT state: patch the model with spt_kernels.patch_model")
    if dropout:
        raise NotImplementedError(f"SPT sparse attention has no attention dropout (got dropout={dropout})")
    if sliding_window is not None:
        raise NotImplementedError("SPT sparse attention does not support sliding-window layers")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"SPT attention expects its own (B, Lk) key-padding mask, got a {attention_mask.dim()}D mask: custom 4D "
            "masks are not supported"
        )
    if module.training and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        query, key = _UpdateCodebookInBackward.apply(query, key, state)
    if not state.pq.is_initialized or state.calibration is not None:  # both sides: queries and keys quantise alike
        rows = torch.cat([evenly_spaced_rows(t.detach(), CODEBOOK_ROWS) for t in (query, key)])
        if not state.pq.is_initialized:
            state.pq.initialize(rows)
        if state.calibration is not None:
            state.calibration.append(rows.float())
    q_codes = state.pq.encode(query, state.backend)
    k_codes = state.pq.encode(key, state.backend)
    budget = candidate_budget(key.shape[2], state.sparsity)
    idx = select_candidates(
        q_codes, k_codes, budget, attention_mask, state.backend, sink_keys=state.sink_keys, keep_self=state.keep_self
    )
    out = sparse_attention(query, key, value, idx, scaling, state.backend)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, spt_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, spt_key_padding_mask)


def _hf_model(model: nn.Module) -> PreTrainedModel:
    """The outermost Hugging Face model inside `model` (which may be a peft wrapper)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no transformers PreTrainedModel")


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def is_patched(model: nn.Module) -> bool:
    """Whether `model` holds SPT attention state or routed FFNs."""
    return any(isinstance(m, (SPTAttentionState, RoutedMLP)) for m in model.modules())


def patch_model(model: nn.Module, config: SPTConfig | None = None) -> nn.Module:
    """Convert `model` to SPT in place (sparse attention and/or routed FFN, per `config`) and return it."""
    config = config or SPTConfig()
    hf = _hf_model(model)
    if is_patched(model):
        raise RuntimeError("model is already SPT-patched; call unpatch_model first")
    previous = hf.config._attn_implementation
    attention = [m for m in model.modules() if _is_attention(m)]
    mlps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _is_gated_mlp(child)
    ]
    if config.sparse_attention and not attention:
        raise ValueError(f"found no Llama-style attention modules (q/k/v/o_proj) in {type(hf).__name__}")
    if config.routed_ffn and not mlps:
        raise ValueError(f"found no gated MLP modules (gate/up/down_proj) in {type(hf).__name__}")
    if config.sparse_attention:
        for module in attention:
            device = next(module.parameters()).device
            module.spt = SPTAttentionState(module.head_dim, config, previous).to(device)
        hf.set_attn_implementation(ATTN_IMPLEMENTATION)
    if config.routed_ffn:
        for parent, name, mlp in mlps:
            routed = RoutedMLP(mlp, config.ffn_blocks, config.ffn_active_blocks, config.router_init_std, config.backend)
            setattr(parent, name, routed)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo `patch_model` in place: original MLP modules, no SPT state, the previous attention implementation."""
    hf = _hf_model(model)
    previous = None
    for module in list(model.modules()):
        if isinstance(getattr(module, "spt", None), SPTAttentionState):
            previous = module.spt.previous_attn_implementation
            del module.spt
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedMLP):
                setattr(parent, name, child.restore())
    if previous is not None:
        hf.set_attn_implementation(previous)
    return model

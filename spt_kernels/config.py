"""SPTConfig: every knob of sparse attention and the routed FFN in one place."""

from dataclasses import dataclass
from typing import Literal

Backend = Literal["auto", "triton", "reference"]


@dataclass
class SPTConfig:
    sparsity: int = 8  # s: each query attends to ceil(L_k / s) keys; s = 1 is exact dense causal attention
    pq_subspace_dim: int = 8  # dims per product-quantisation subspace; must divide the head dim
    pq_codewords: int = 16  # codewords per subspace (at most 256: codes are stored as uint8)
    sink_keys: int = 1  # the first real keys of each sequence every query keeps (attention sinks); 0: none
    keep_self: bool = True  # every query keeps its own key
    codebook_decay: float = 0.99  # EMA decay of the k-means codebook update done in training mode
    sparse_attention: bool = True  # replace the attention function with SPT sparse attention
    routed_ffn: bool = True  # replace each gated MLP with a routed FFN
    ffn_blocks: int = 4  # n: the FFN hidden units are split into n equal blocks
    ffn_active_blocks: int = 2  # k: blocks each token runs through; k = n is the dense FFN
    router_init_std: float = 0.02  # std of the router's random init (small: near-uniform routing at start)
    backend: Backend = "auto"  # "auto": Triton on CUDA tensors, PyTorch reference elsewhere

    def __post_init__(self):
        if self.sparsity < 1:
            raise ValueError(f"sparsity must be >= 1, got {self.sparsity}")
        if not 1 <= self.pq_codewords <= 256:
            raise ValueError(f"pq_codewords must be in [1, 256], got {self.pq_codewords}")
        if self.pq_subspace_dim < 1:
            raise ValueError(f"pq_subspace_dim must be >= 1, got {self.pq_subspace_dim}")
        if self.sink_keys < 0:
            raise ValueError(f"sink_keys must be >= 0, got {self.sink_keys}")
        if not 0.0 <= self.codebook_decay < 1.0:
            raise ValueError(f"codebook_decay must be in [0, 1), got {self.codebook_decay}")
        if not 1 <= self.ffn_active_blocks <= self.ffn_blocks:
            raise ValueError(
                f"need 1 <= ffn_active_blocks <= ffn_blocks, got {self.ffn_active_blocks} of {self.ffn_blocks}"
            )
        if self.backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {self.backend!r}")

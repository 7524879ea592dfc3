"""SPT: sparse multi-head attention (product-quantised candidate keys) and a routed FFN for cheaper fine-tuning.

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # any Llama / Qwen2 model
    patch_model(model, SPTConfig(sparsity=8, ffn_blocks=4, ffn_active_blocks=2))
    calibrate(model, batches)                       # fit routers and codebooks to the pretrained model
    model = get_peft_model(model, LoraConfig(...))  # optional; before or after patching
    ...                                             # train as usual; codebooks update in the backward pass
    unpatch_model(model)                            # the original modules and attention implementation

CUDA tensors run Triton kernels; everything else runs the PyTorch reference (see `dispatch`). The Hugging Face
glue (`patch_model`, `unpatch_model`, `calibrate`, `router_recall`) is imported lazily so the kernels need only torch.
"""

try:
    import torch  # noqa: F401  (every kernel and reference is torch; the rest of searchr3 does not need it)
except ImportError as err:
    raise ImportError(f"spt_kernels needs the 'spt' extra: pip install 'searchr3[spt]' ({err})", name="torch") from None

from .candidates import candidate_budget, select_candidates
from .config import SPTConfig
from .pq import ProductQuantizer, pq_encode
from .routed_ffn import route_tokens, routed_ffn
from .sparse_attention import sparse_attention

__all__ = [
    "SPTConfig",
    "patch_model",
    "unpatch_model",
    "calibrate",
    "router_recall",
    "sparse_attention",
    "select_candidates",
    "candidate_budget",
    "pq_encode",
    "ProductQuantizer",
    "routed_ffn",
    "route_tokens",
]


def __getattr__(name):
    if name in ("patch_model", "unpatch_model"):
        from . import patching

        return getattr(patching, name)
    if name in ("calibrate", "router_recall"):
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module 'spt_kernels' has no attribute {name!r}")

"""What a checkpoint needs to be rebuilt, recorded in the checkpoint itself.

A checkpoint's tensors only load into a model of the same layout: the same
base model, prompt format, truncation and case folding, LoRA rank, scale,
layers and target modules, and the same SPT setting. The package once kept
the target modules and the SPT setting as module constants, and changed the
SPT setting twice, so older ``--spt`` checkpoints silently rebuilt with
another layout. Now every checkpoint's ``state.json`` carries its
:class:`Layout`, and loading reads only that. A checkpoint written before
carries none: its layout is inferred from its config and its tensor names and
shapes where the history allows (:data:`HISTORIC_SPT`), else it is refused
with what is missing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchr3_env.cache_keys import file_digest

from .checkpoint import CONFIG, STATE, WEIGHTS, CheckpointError, read_json, resolve_checkpoint
from .config import GRPOConfig, SFTConfig, upgrade_saved
from .prompts import PROMPT_FORMAT

# What new runs use. LoRA adapts every projection of attention and the FFN.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SPT as ``--spt`` uses it: sparse attention at s = 4, the FFN left dense (a routed FFN of a pretrained model costs
# quality with few large blocks and speed with many small ones: benchmarks/results/spt.md).
SPT_SETTING = {"sparsity": 4, "routed_ffn": False}
# What checkpoints written before layouts were recorded used, spelt out: the constants above may change, these not.
# LoRA's targets never changed in that time.
HISTORIC_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Every SPT setting ``--spt`` has used, by the number of FFN router blocks its tensors show (0: no routed FFN).
HISTORIC_SPT = {
    4: {"sparsity": 8, "ffn_blocks": 4, "ffn_active_blocks": 2},  # SPTConfig() as it was, until c54f681
    64: {"sparsity": 4, "ffn_blocks": 64, "ffn_active_blocks": 48},  # from c54f681 until 6e677bc
    0: {"sparsity": 4, "routed_ffn": False},  # from 6e677bc until layouts were recorded
}


@dataclass(frozen=True)
class Layout:
    """How to rebuild a checkpoint's model: its base, how it reads text, its adapters and SPT setting."""

    stage: str  # "sft" or "grpo"
    model: str  # "smollm2" or a Hugging Face folder
    max_doc_tokens: int
    max_query_tokens: int
    lowercase: bool
    prompt_format: int
    lora: bool
    lora_rank: int
    lora_alpha: int
    lora_layers: int
    lora_targets: tuple[str, ...]
    train_embed_token: bool
    spt: dict[str, Any] | None  # SPTConfig keyword arguments
    base: str | None = None  # GRPO: the SFT checkpoint merged under its adapters
    base_weights: str | None = None  # GRPO: that checkpoint's weights digest, checked on load

    @classmethod
    def of_sft(cls, cfg: SFTConfig) -> "Layout":
        return cls("sft", cfg.model, cfg.max_doc_tokens, cfg.max_query_tokens, cfg.lowercase, PROMPT_FORMAT, cfg.lora,
                   cfg.lora_rank, cfg.lora_alpha, cfg.lora_layers, LORA_TARGETS, cfg.train_embed_token,
                   dict(SPT_SETTING) if cfg.spt else None)

    @classmethod
    def of_grpo(cls, cfg: GRPOConfig, sft: "Layout", sft_checkpoint: Path) -> "Layout":
        """GRPO's fresh adapters over the merged SFT checkpoint ``sft_checkpoint`` of layout ``sft``."""
        return dataclasses.replace(sft, stage="grpo", lora=cfg.lora, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                   lora_layers=cfg.lora_layers, lora_targets=LORA_TARGETS, base=str(sft_checkpoint),
                                   base_weights=file_digest(Path(sft_checkpoint) / WEIGHTS))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"lora_targets": list(self.lora_targets)}

    @classmethod
    def from_dict(cls, saved: dict, where: Path) -> "Layout":
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in saved and f.default is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"{where}: its layout lacks {', '.join(missing)}")
        return cls(**{**saved, "lora_targets": tuple(saved["lora_targets"])})


def read_layout(checkpoint: Path) -> Layout:
    """The layout ``checkpoint`` recorded, or the one its config and tensors imply (a checkpoint from before)."""
    checkpoint = Path(checkpoint)
    state = read_json(checkpoint, STATE)
    layout = Layout.from_dict(state["layout"], checkpoint) if "layout" in state else infer_layout(checkpoint)
    if layout.base_weights is not None:
        base = Path(layout.base) / WEIGHTS
        if not base.is_file() or file_digest(base) != layout.base_weights:
            raise CheckpointError(f"{checkpoint}: it was trained on top of SFT checkpoint {layout.base}, which is "
                                  "missing or has other weights now")
    return layout


def infer_layout(checkpoint: Path) -> Layout:
    """The layout of a checkpoint that recorded none, from its config.json and its tensors' names and shapes."""
    saved = read_json(checkpoint, CONFIG)
    names = _tensor_shapes(checkpoint)
    if "group_size" in saved:  # a GRPO run (SFT has no rollout groups): its base is the SFT run it started from
        cfg = GRPOConfig(**upgrade_saved(GRPOConfig, saved))
        sft_checkpoint = resolve_checkpoint(cfg.init)
        layout = Layout.of_grpo(cfg, read_layout(sft_checkpoint), sft_checkpoint)
        return dataclasses.replace(layout, lora_targets=_lora_targets(names, checkpoint) if cfg.lora
                                   else HISTORIC_LORA_TARGETS)
    cfg = SFTConfig(**upgrade_saved(SFTConfig, saved))
    layout = Layout.of_sft(cfg)
    spt = None
    if cfg.spt:
        blocks = sorted({shape[0] for name, shape in names.items() if name.endswith("router.weight")})
        n_blocks = blocks[0] if len(blocks) == 1 else 0 if not blocks else None
        if n_blocks not in HISTORIC_SPT:
            raise CheckpointError(f"{checkpoint}: an --spt checkpoint from before layouts were recorded, with FFN "
                                  f"routers of {blocks} blocks, which no past --spt setting used; its SPT "
                                  "setting cannot be inferred")
        spt = dict(HISTORIC_SPT[n_blocks])
    targets = _lora_targets(names, checkpoint) if cfg.lora else HISTORIC_LORA_TARGETS
    return dataclasses.replace(layout, lora_targets=targets, spt=spt)


def _tensor_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the saved tensors, read from the safetensors header (no tensor is loaded)."""
    with open(Path(checkpoint) / WEIGHTS, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def _lora_targets(names: dict, checkpoint: Path) -> tuple[str, ...]:
    """The modules LoRA adapted, in the order of :data:`HISTORIC_LORA_TARGETS` (any others after, sorted)."""
    found = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name in names if ".lora_A" in name}
    if not found:
        raise CheckpointError(f"{checkpoint}: a LoRA checkpoint without LoRA tensors; its adapters cannot be inferred")
    return tuple(t for t in HISTORIC_LORA_TARGETS if t in found) + tuple(sorted(found - set(HISTORIC_LORA_TARGETS)))

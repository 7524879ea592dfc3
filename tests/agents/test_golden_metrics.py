"""Refactoring agents/ must not change what training computes: SFT and GRPO runs match committed metrics.

The goldens in ``golden/`` were written by the code before the agents redesign
(``SEARCHR3_WRITE_GOLDENS=1 pytest tests/agents/test_golden_metrics.py``): 5 SFT
steps and 3 GRPO steps on the tiny random Llama, one torch thread, fixed seeds,
once with frozen documents (LoRA, self-taught reasoning, full-retrieval
validation) and once with trained documents (full fine-tuning, GRPO refreshing
the index). Every logged number but timings and memory must match to 1e-6.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from agents.config import GRPOConfig, SFTConfig

GOLDEN = Path(__file__).parent / "golden"
NOT_COMPARED = ("step_s", "generate_s", "env_s", "update_s", "peak_mem_mb")  # wall-clock and memory vary by machine
WRITE = os.environ.get("SEARCHR3_WRITE_GOLDENS") == "1"


def runs(tiny_beir, tiny_model_dir, root: Path) -> dict[str, tuple[str, object]]:
    """name -> (trainer module, config), in the order they must run (GRPO starts from its SFT run)."""
    common = dict(data=str(tiny_beir), seed=0, progress=False, cache_dir=str(root / "cache"))
    sft = dict(model=str(tiny_model_dir), max_steps=5, batch_size=4, hard_negatives=2, mine_depth=5, val_queries=4,
               lr=1e-3, warmup_steps=1, eval_every=2, checkpoint_every=5, **common)
    grpo = dict(max_steps=3, queries_per_step=4, group_size=4, reasoning_tokens=4, val_queries=4, eval_every=1,
                lr=3e-3, hard_negatives=4, checkpoint_every=3, **common)
    return {
        "sft_frozen": ("agents.sft", SFTConfig(output_dir=str(root / "sft_frozen"), reasoning_tokens=4,
                                               reasoning_samples=2, **sft)),
        "grpo_frozen": ("agents.grpo", GRPOConfig(init=str(root / "sft_frozen"), output_dir=str(root / "grpo_frozen"),
                                                  pseudo_queries=4, **grpo)),
        "sft_trained": ("agents.sft", SFTConfig(output_dir=str(root / "sft_trained"), lora=False, train_documents=True,
                                                negatives="hashing", **sft)),
        "grpo_trained": ("agents.grpo", GRPOConfig(init=str(root / "sft_trained"),
                                                   output_dir=str(root / "grpo_trained"), refresh_pool=10, **grpo)),
    }


def compared(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in NOT_COMPARED} for line in lines]


def assert_close(got: list[dict], want: list[dict], name: str) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in want], f"{name}: other records or keys"
    for step, (g, w) in enumerate(zip(got, want)):
        for key, value in w.items():
            assert g[key] == pytest.approx(value, rel=1e-6, abs=1e-6), f"{name} record {step} {key}"


@pytest.mark.slow
def test_training_matches_the_golden_metrics(tiny_beir, tiny_model_dir, tmp_path):
    import importlib

    torch.set_num_threads(1)
    for name, (module, config) in runs(tiny_beir, tiny_model_dir, tmp_path).items():
        importlib.import_module(module).train(config)
        got = compared(Path(config.output_dir))
        golden = GOLDEN / f"{name}.jsonl"
        if WRITE:
            GOLDEN.mkdir(exist_ok=True)
            golden.write_text("".join(json.dumps(r) + "\n" for r in got))
            continue
        assert_close(got, [json.loads(line) for line in golden.read_text().splitlines()], name)

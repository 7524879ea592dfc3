"""The --spt switch: SFT runs on an SPT-patched tiny Llama, and its checkpoint loads back patched."""

import json
from pathlib import Path

import numpy as np
import pytest

from agents.layout import SPT_SETTING, Layout
from agents.policy import build_embedder, load_agent, make_trainable
from agents.sft import train
from test_sft import tiny_config


@pytest.fixture(autouse=True)
def tiny_spt_setting(monkeypatch):
    """SPT_SETTING leaves the FFN dense; these tests route it too, so the routers' calibration and reload are covered."""
    monkeypatch.setattr("agents.layout.SPT_SETTING", dict(sparsity=4, ffn_blocks=8, ffn_active_blocks=6))


def test_sft_with_spt_trains_and_reloads(tiny_beir, tiny_model_dir, tmp_path):
    import torch

    torch.set_num_threads(1)
    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run", spt=True, max_steps=2, checkpoint_every=2)
    checkpoint = train(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert any(r["loss_kl"] > 0 for r in records if "loss_kl" in r)  # the sparse model differs from the dense one
    queries, _ = load_agent(checkpoint)
    assert any("spt" in type(m).__name__.lower() or "routed" in type(m).__name__.lower()
               for m in queries.model.modules())
    # The calibrated block order and the codebooks come back with the routers that were trained with them.
    from safetensors.torch import load_file
    from spt_kernels.routed_mlp import RoutedMLP

    saved = load_file(checkpoint / "weights.safetensors")
    buffers = dict(queries.model.named_buffers())
    kept = ("unit_order", "skip_compensation", "pq.codebook", "pq.initialized")
    spt_state = [n for n in saved if n.endswith(kept)]
    assert spt_state and all(torch.equal(buffers[n], saved[n]) for n in spt_state)
    counts = [saved[n] for n in saved if n.endswith("pq.ema_count")]  # a freshly fitted codebook counts 1 everywhere
    assert counts and any(not torch.all(c == 1.0) for c in counts)  # trained in training mode: codebooks moved
    orders = [m.unit_order for m in queries.model.modules() if isinstance(m, RoutedMLP)]
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders)  # regrouped by calibration, not reset
    emb = queries.encode_queries(["a query"])
    assert emb.shape == (1, queries.dim) and np.isfinite(emb).all()


def test_spt_switch_calibrates_the_patched_model_on_documents(tiny_beir, tiny_model_dir, tmp_path):
    from spt_kernels.routed_mlp import RoutedMLP

    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run", spt=True)
    routers = {}
    for texts in ((), ("a first document about wings", "a second one, about engines and fuel")):
        embedder = build_embedder(cfg)
        make_trainable(embedder, Layout.of_sft(cfg), calibration_texts=texts)
        routers[bool(texts)] = [m.router.bias for m in embedder.model.modules() if isinstance(m, RoutedMLP)]
    assert routers[False] and all((bias == 0).all() for bias in routers[False])  # a fresh router has no bias
    assert all((bias != 0).any() for bias in routers[True])  # the calibrated one is fitted to block output norms


def test_grpo_continues_an_spt_sft_run(tiny_beir, tiny_model_dir, tmp_path):
    """GRPO loads the SPT-patched SFT checkpoint as it was trained (patched once, weights and routers restored)."""
    from agents.config import GRPOConfig
    from agents.grpo import train as train_grpo

    sft = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "sft", spt=True, max_steps=1, checkpoint_every=1)
    train(sft)
    cfg = GRPOConfig(data=str(tiny_beir), init=sft.output_dir, output_dir=str(tmp_path / "grpo"), queries_per_step=2,
                     group_size=2, reasoning_tokens=2, max_steps=1, val_queries=0, refresh_pool=5, hard_negatives=2,
                     checkpoint_every=1, progress=False)
    train_grpo(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("loss", np.nan)) for r in records)


def test_the_shipped_setting_sparsifies_attention_and_keeps_the_ffn_dense(tiny_beir, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    from spt_kernels.patching import SPTAttentionState, is_patched
    from spt_kernels.routed_mlp import RoutedMLP

    monkeypatch.setattr("agents.layout.SPT_SETTING", SPT_SETTING)  # undo the tiny setting of the fixture
    cfg = tiny_config(tiny_beir, tiny_model_dir, tmp_path / "run", spt=True)
    embedder = build_embedder(cfg)
    make_trainable(embedder, Layout.of_sft(cfg), calibration_texts=("a document about wings",))
    modules = list(embedder.model.modules())
    assert is_patched(embedder.model) and not any(isinstance(m, RoutedMLP) for m in modules)
    states = [m.spt for m in modules if isinstance(getattr(m, "spt", None), SPTAttentionState)]
    assert states and all(state.sparsity == 4 for state in states)

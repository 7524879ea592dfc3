"""The --spt switch: SFT runs on an SPT-patched tiny Llama, and its checkpoint loads back patched."""

import json
from pathlib import Path

import numpy as np

from agents.sft import load_agent, train
from test_sft import tiny_config


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
    emb = queries.encode_queries(["a query"])
    assert emb.shape == (1, queries.dim) and np.isfinite(emb).all()

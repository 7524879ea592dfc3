"""SFT warm-up of SmolLM2 as a reason-then-embed retriever on Cranfield, then its test-split metrics.

The Python API behind ``searchr3 sft`` and ``searchr3 eval --encoder llm:RUN``:

    .venv/bin/python examples/sft_cranfield.py [--data ../shared/data/cranfield] [--steps 24]

The settings of run A in ``benchmarks/results/retrieval.md``, sized for a 2-core CPU:
frozen documents (the base model's corpus index, built once and cached; the
first build is the slow part, ~10 min idle, much more on a shared machine), LoRA
on the top 15 layers, 16 queries and 7 mined hard negatives per step (~10-20 s
a step). On a GPU pass ``--device cuda`` (bfloat16, 64 queries a step).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from agents.config import SFTConfig
from agents.policy import load_agent
from agents.sft import train
from searchr3_env import RetrievalTask, evaluate_agent, load_or_build_index
from searchr3_env.task import resolve_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cranfield"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--output-dir", default="runs/sft-cranfield")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    gpu = args.device.startswith("cuda")
    cfg = SFTConfig(data=args.data, output_dir=args.output_dir, max_steps=args.steps, device=args.device,
                    dtype="bfloat16" if gpu else "float32", batch_size=64 if gpu else 16,
                    lr=2e-3, warmup_steps=2, lora_layers=15, checkpoint_every=8, eval_every=8)
    checkpoint = train(cfg)  # resumes if output_dir already holds a run

    agent, documents = load_agent(checkpoint)
    dataset = resolve_dataset(args.data)
    index = load_or_build_index(dataset, documents, cfg.cache_dir)  # the base model's index: cached by train()
    task = RetrievalTask(dataset, documents, index, split="test", top_k=1000)
    result = evaluate_agent(agent, task, desc="test queries").metrics.mean
    print(f"{dataset.name} test: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))


if __name__ == "__main__":
    main()

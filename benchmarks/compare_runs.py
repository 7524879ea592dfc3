"""Paired comparison of two TREC runs over the same judged queries: is B really better than A?

Per metric: both means, the mean per-query difference B - A with a 95% bootstrap interval, how many queries B
wins / loses / ties, and the two-sided p-value of a paired randomisation (sign-flip) test, the test IR papers
use for this (Smucker, Allan and Carterette, CIKM 2007). Resamples are seeded: the output is repeatable.

    .venv/bin/python benchmarks/compare_runs.py --data ../shared/data/cranfield A.trec B.trec
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from searchr3_env.metrics import evaluate_run  # noqa: E402
from searchr3_env.task import resolve_dataset  # noqa: E402
from searchr3_env.trec_run import read_trec_run  # noqa: E402

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def paired(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict:
    """Statistics of the per-query differences b - a."""
    diff = b - a
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    flips = rng.choice([-1.0, 1.0], size=(resamples, len(diff)))
    null = np.abs((flips * diff).mean(axis=1))
    return {
        "a": a.mean(), "b": b.mean(), "diff": diff.mean(),
        "low": np.quantile(boot, 0.025), "high": np.quantile(boot, 0.975),
        "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()), "ties": int((diff == 0).sum()),
        "p": (1 + (null >= abs(diff.mean()) - 1e-12).sum()) / (1 + resamples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", help="TREC run file of the baseline (A)")
    parser.add_argument("run_b", help="TREC run file of the candidate (B)")
    parser.add_argument("--data", required=True, help="BEIR folder whose qrels judge both runs")
    parser.add_argument("--split", default="test", choices=("all", "train", "test"))
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = resolve_dataset(args.data)
    qrels = dataset.split(args.split).qrels
    per_query = [evaluate_run(read_trec_run(path), qrels, METRICS).per_query for path in (args.run_a, args.run_b)]
    queries = sorted(per_query[0])
    print(f"{len(queries)} judged {args.split} queries of {dataset.name}; A = {args.run_a}, B = {args.run_b}\n")
    print("| metric | A | B | B - A | 95% bootstrap CI | B wins / losses / ties | p (randomisation) |")
    print("|---|---|---|---|---|---|---|")
    for metric in METRICS:
        a, b = (np.array([pq[q][metric] for q in queries]) for pq in per_query)
        s = paired(a, b, args.resamples, args.seed)
        print(f"| {metric} | {s['a']:.4f} | {s['b']:.4f} | {s['diff']:+.4f} | [{s['low']:+.4f}, {s['high']:+.4f}] "
              f"| {s['wins']} / {s['losses']} / {s['ties']} | {s['p']:.3f} |")


if __name__ == "__main__":
    main()

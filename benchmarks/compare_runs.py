"""Paired comparison of two TREC runs over the same judged queries: is B really better than A?

Per metric: both means, the mean per-query difference B - A with a 95% bootstrap interval, how many queries B
wins / loses / ties, the two-sided p-value of a paired randomisation (sign-flip) test, and the minimum
detectable effect, all from ``benchmarks/stats.py`` (one seed per arm: a run file is one run). For several
seeds and a whole table, write records and use ``benchmarks/tables.py``. Resamples are seeded.

    .venv/bin/python benchmarks/compare_runs.py --data ../shared/data/cranfield A.trec B.trec
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stats import compare  # noqa: E402
from searchr3_env.metrics import evaluate_run  # noqa: E402
from searchr3_env.task import resolve_dataset  # noqa: E402
from searchr3_env.trec_run import read_trec_run  # noqa: E402

METRICS = ("ndcg@10", "recall@100", "mrr@10")


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
    print("| metric | A | B | B - A | 95% bootstrap CI | B wins / losses / ties | p (randomisation) | MDE |")
    print("|---|---|---|---|---|---|---|---|")
    for metric in METRICS:
        a, b = (np.array([pq[q][metric] for q in queries]) for pq in per_query)
        c = compare(a, b, resamples=args.resamples, seed=args.seed)
        print(f"| {metric} | {c.mean_a:.4f} | {c.mean_b:.4f} | {c.diff:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] "
              f"| {c.wins} / {c.losses} / {c.ties} | {c.p:.3f} | {c.mde:.4f} |")


if __name__ == "__main__":
    main()

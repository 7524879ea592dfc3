"""Per-query records of the baseline agents (random, hashing, MiniLM), the reference rows of every retrieval table.

Each (collection, agent, seed) is evaluated once through the env (``evaluate_pair``: every judged query of the
split, top ``--depth``) and written as a record (``searchr3_env.records``) named
``{collection}-{split}-{agent}[-seed{N}].json``. The random agent has a seed, so it runs once per ``--seeds``
entry; hashing and MiniLM are deterministic and run once. MiniLM's corpus indexes are cached in ``--cache-dir``
(encoding NPL takes ~12 min on 2 CPU cores the first time).

    .venv/bin/python benchmarks/baseline_records.py            # test splits of synthetic, cranfield, npl, cacm
    .venv/bin/python benchmarks/tables.py                      # then regenerate the tables
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.baselines import BASELINES, make_baseline  # noqa: E402
from searchr3_env.evaluation import evaluate_pair  # noqa: E402
from searchr3_env.records import record_metadata, write_record  # noqa: E402
from searchr3_env.task import resolve_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = "../shared/data"
COLLECTIONS = ("synthetic", f"{SHARED}/cranfield", f"{SHARED}/npl", f"{SHARED}/cacm")
SEEDED = ("random",)  # agents whose answers depend on a seed


def record_name(collection: str, split: str, agent: str, seed: int | None) -> str:
    return f"{collection}-{split}-{agent}" + ("" if seed is None else f"-seed{seed}") + ".json"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(COLLECTIONS), help="'synthetic' or BEIR folders")
    parser.add_argument("--agents", nargs="+", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the seeded agents")
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "records" / "retrieval")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "searchr3",
                        help="corpus index cache (MiniLM's encoding is the slow part)")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/baseline_records.py", *(sys.argv[1:] if argv is None else argv)])

    written = []
    for data in args.data:
        dataset = resolve_dataset(data)
        for agent_name in args.agents:
            for seed in args.seeds if agent_name in SEEDED else [None]:
                start = time.perf_counter()
                agent, encoder = make_baseline(agent_name, dataset, seed=seed or 0)
                row, evaluation = evaluate_pair(agent_name, agent, encoder, dataset, split=args.split, depth=args.depth,
                                                cache_dir=args.cache_dir, progress=False)
                path = args.out / record_name(dataset.name, args.split, agent_name, seed)
                write_record(path, evaluation, record_metadata(
                    dataset, agent=agent_name, split=args.split, depth=args.depth, seed=seed, command=command, data=data))
                written.append(path)
                print(f"{path.name}: {row['queries']} queries, nDCG@10 {row['ndcg@10']:.4f}, "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()

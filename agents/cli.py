"""The ``searchr3`` command line.

    searchr3 demo [--data DIR ...]            baseline table on the synthetic collection (and any BEIR folders)
    searchr3 eval --data DIR --encoder NAME    one agent's metrics, optionally JSON and a TREC run file
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from searchr3_env.evaluation import DEFAULT_METRICS, AgentEvaluation, evaluate_agent
from searchr3_env.index import CorpusIndex, load_or_build_index
from searchr3_env.task import RetrievalTask, resolve_dataset
from searchr3_env.trec_run import write_trec_run

from .baselines import BASELINES, make_baseline

log = logging.getLogger("searchr3")
TABLE_METRICS = ("ndcg@10", "recall@100", "mrr@10")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "searchr3"


def evaluate_baseline(name: str, data: str, split: str, depth: int, cache_dir: Path | None, progress: bool):
    """(evaluation, dataset, seconds spent encoding the corpus) for one baseline on one collection."""
    dataset = resolve_dataset(data)
    agent, encoder = make_baseline(name, dataset)
    start = time.perf_counter()
    if cache_dir is not None and name == "minilm":  # slow encoders are worth caching; hashing takes seconds
        index = load_or_build_index(dataset, encoder, cache_dir, progress=progress)
    else:
        index = CorpusIndex.build(dataset, encoder, progress=progress)
    encode_s = time.perf_counter() - start
    task = RetrievalTask(dataset, encoder, index, split=split, top_k=depth)
    evaluation = evaluate_agent(agent, task, progress=progress, desc=f"{name} on {dataset.name}")
    return evaluation, task.dataset, encode_s


def format_table(rows: list[dict]) -> str:
    header = ["collection", "split", "queries", "agent", *TABLE_METRICS, "index build s"]
    body = [
        [r["collection"], r["split"], str(r["queries"]), r["agent"], *(f"{r[m]:.4f}" for m in TABLE_METRICS),
         f"{r['index_s']:.1f}"]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def cmd_demo(args) -> int:
    rows = []
    for data in args.data:
        for name in args.agents:
            evaluation, dataset, encode_s = evaluate_baseline(
                name, data, args.split, args.depth, args.cache_dir, not args.no_progress
            )
            rows.append(_row(name, dataset, evaluation, encode_s))
            log.info("%s on %s: %s", name, dataset.name, evaluation.metrics.mean)
    print(format_table(rows))
    return 0


def _row(name: str, dataset, evaluation: AgentEvaluation, encode_s: float) -> dict:
    return {
        "collection": dataset.name,
        "split": dataset.split_name,
        "queries": len(evaluation.metrics.per_query),
        "agent": name,
        "index_s": encode_s,
        **evaluation.metrics.mean,
    }


def cmd_eval(args) -> int:
    evaluation, dataset, encode_s = evaluate_baseline(
        args.encoder, args.data, args.split, args.depth, args.cache_dir, not args.no_progress
    )
    if args.run_out:
        write_trec_run(args.run_out, evaluation.run, tag=f"searchr3-{args.encoder}")
    if args.json:
        print(json.dumps({"collection": dataset.name, "split": dataset.split_name, "agent": args.encoder,
                          "queries": len(evaluation.metrics.per_query), **evaluation.metrics.mean}, indent=2))
    else:
        print(format_table([_row(args.encoder, dataset, evaluation, encode_s)]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="searchr3", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--split", default="test", choices=("all", "train", "test"),
                       help="deterministic query split to report on (default: test)")
        p.add_argument("--depth", type=int, default=1000, help="documents retrieved per query (default 1000)")
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                       help="where slow encoders' corpus indexes are cached (default: %(default)s)")
        p.add_argument("--no-cache", dest="cache_dir", action="store_const", const=None, help="never cache indexes")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    demo = sub.add_parser("demo", help="evaluate the baseline agents through the env and print one table")
    demo.add_argument("--data", nargs="+", default=["synthetic"],
                      help="'synthetic' (default) and/or BEIR folders, e.g. ../shared/data/*")
    demo.add_argument("--agents", type=lambda s: s.split(","), default=list(BASELINES),
                      help=f"comma-separated baselines (default: {','.join(BASELINES)})")
    common(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="metrics of one agent on one collection")
    ev.add_argument("--data", default="synthetic", help="'synthetic' or a BEIR folder")
    ev.add_argument("--encoder", default="hashing", choices=BASELINES)
    ev.add_argument("--json", action="store_true", help=f"print JSON with keys {', '.join(DEFAULT_METRICS)}")
    ev.add_argument("--run-out", type=Path, help="write a TREC run file (qid Q0 docid rank score tag)")
    common(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``searchr3`` command line.

    searchr3 demo [--data DIR] [--device cuda ...]   the main job: baseline eval -> SFT -> GRPO -> eval, one table
    searchr3 demo --baselines-only [--data DIR ...]  baseline table on the synthetic collection (and any BEIR folders)
    searchr3 eval --data DIR --encoder NAME    one agent's metrics, optionally JSON and a TREC run file
                                               (NAME: a baseline, or llm:CHECKPOINT_DIR / llm:smollm2 / llm:HF_DIR)
    searchr3 sft --data DIR [--model smollm2|PATH] [--output-dir RUN ...]   SFT warm-up of the LLM embedder
    searchr3 rl --data DIR --init SFT_RUN [--output-dir RUN ...]            GRPO of the embedder against the env

A base install runs the env, the hashing and random baselines and ``--help``:
the training modules (torch) are imported only by the commands that run them.
User errors (bad data, paths, settings, a missing extra) print one line and
exit with status 2; Ctrl-C exits with 130; ``--debug`` (or SEARCHR3_DEBUG=1)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from searchr3_env.evaluation import DEFAULT_METRICS, evaluate_pair
from searchr3_env.extras import explain_missing
from searchr3_env.records import record_metadata, record_path_beside, write_record
from searchr3_env.task import resolve_dataset
from searchr3_env.trec_run import check_run_ids, check_writable, write_trec_run

from .baselines import BASELINES, make_baseline
from .config import GRPOConfig, PipelineConfig, SFTConfig, groups, user_cache_dir

log = logging.getLogger("searchr3")
TABLE_METRICS = ("ndcg@10", "recall@100", "mrr@10")
DEMO_SHARED = ("data", "cache_dir", "progress")  # pipeline settings that the demo's common flags already set


def evaluate_baseline(name: str, data, split: str, depth: int, cache_dir: Path | None, progress: bool):
    """(table row, evaluation) for one baseline on one collection (a dataset, or what ``resolve_dataset`` takes)."""
    dataset = resolve_dataset(data)
    agent, encoder = make_baseline(name, dataset)
    # Slow encoders are worth caching; hashing takes seconds.
    return evaluate_pair(name, agent, encoder, dataset, split=split, depth=depth,
                         cache_dir=cache_dir if name == "minilm" else None, progress=progress)


def make_llm_agent(spec: str, args):
    """(query agent, document encoder, weights) for ``llm:SPEC``: an SFT or GRPO checkpoint or run folder, else a
    base model. ``weights`` is the checkpoint or model folder evaluated (None for the packaged SmolLM2): a record
    names the weights it measured by their digest."""
    from .checkpoint import CheckpointError, resolve_checkpoint
    from .policy import build_embedder, load_agent

    device = dict(device=args.device, dtype=args.dtype)
    try:
        checkpoint = resolve_checkpoint(spec)
    except CheckpointError:
        cfg = SFTConfig(data="", model=spec, max_doc_tokens=args.max_doc_tokens, lowercase=args.lowercase, **device,
                        **({"cache_dir": str(args.cache_dir)} if args.cache_dir else {}))
        embedder = build_embedder(cfg).with_options(reasoning_tokens=args.reasoning, batch_size=args.batch_size)
        return embedder, embedder, Path(spec) if Path(spec).is_dir() else None
    if args.lowercase:
        raise ValueError(f"--lowercase applies to base models only; checkpoint {checkpoint} keeps the setting it "
                         "was trained with")
    agent, documents = load_agent(checkpoint, reasoning_tokens=args.reasoning, batch_size=args.batch_size,
                                  cache_dir=args.cache_dir, **device)
    return agent, documents, checkpoint


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
    if not args.baselines_only and args.agents is None:
        return cmd_pipeline(args)
    rows = []
    for data in args.data:
        for name in args.agents or list(BASELINES):
            row, evaluation = evaluate_baseline(name, data, args.split, args.depth, args.cache_dir, not args.no_progress)
            rows.append(row)
            log.info("%s on %s: %s", name, row["collection"], evaluation.metrics.mean)
    print(format_table(rows))
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run

    if len(args.data) > 1:
        raise ValueError("the pipeline trains on one collection; pass one --data (or --baselines-only)")
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineConfig) if f.name not in DEMO_SHARED}
    cfg = PipelineConfig(data=args.data[0], cache_dir=str(args.cache_dir or user_cache_dir()),
                         progress=not args.no_progress, **flags)
    print(format_table(run(cfg)))
    print(f"plots: {Path(cfg.output_dir) / 'sft' / 'metrics.png'} {Path(cfg.output_dir) / 'grpo' / 'metrics.png'}")
    return 0


def cmd_eval(args) -> int:
    dataset = resolve_dataset(args.data)
    record_out = args.record_out or (record_path_beside(args.run_out) if args.run_out else None)
    for path in (args.run_out, record_out):  # checked before any encoding, so a long evaluation is never lost
        if path:
            check_writable(path)
    if args.run_out:
        check_run_ids(dataset.split(args.split).judged_query_ids, dataset.doc_ids)
    weights = None
    if args.encoder.startswith("llm:"):
        agent, encoder, weights = make_llm_agent(args.encoder[len("llm:"):], args)
        if args.reasoning:
            args.encoder += f"+reasoning{args.reasoning}"
        row, evaluation = evaluate_pair(args.encoder, agent, encoder, dataset, split=args.split,
                                        depth=args.depth, cache_dir=args.cache_dir, progress=not args.no_progress)
    else:
        row, evaluation = evaluate_baseline(args.encoder, dataset, args.split, args.depth, args.cache_dir,
                                            not args.no_progress)
    if args.run_out:
        write_trec_run(args.run_out, evaluation.run, tag=f"searchr3-{args.encoder}")
    if record_out:
        write_record(record_out, evaluation, record_metadata(
            dataset, agent=args.encoder, split=args.split, depth=args.depth, checkpoint=weights,
            seed=0 if args.encoder == "random" else None))  # the random baseline's seed (make_baseline's default)
    if args.json:
        print(json.dumps({k: v for k, v in row.items() if k != "index_s"}, indent=2))
    else:
        print(format_table([row]))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``searchr3 eval: argument --depth: ...`` (the usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="searchr3", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(p):
        p.add_argument("--split", default="test", choices=("all", "train", "test"),
                       help="deterministic query split to report on (default: test)")
        p.add_argument("--depth", type=positive_int, default=1000, help="documents retrieved per query (default 1000)")
        p.add_argument("--cache-dir", type=Path, default=user_cache_dir(),
                       help="where slow encoders' corpus indexes are cached (default: %(default)s)")
        p.add_argument("--no-cache", dest="cache_dir", action="store_const", const=None, help="never cache indexes")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    demo = sub.add_parser("demo", help="the main job: baseline eval, SFT, GRPO and eval of SmolLM2, one table "
                                       "(--baselines-only: the baseline agents' table)")
    demo.add_argument("--data", nargs="+", default=["synthetic"],
                      help="'synthetic' (default) or a BEIR folder; several with --baselines-only")
    demo.add_argument("--baselines-only", action="store_true", help="only the baseline agents' table, no training")
    demo.add_argument("--agents", type=baseline_names, default=None,
                      help=f"comma-separated baselines, implies --baselines-only (default: {','.join(BASELINES)})")
    common(demo)
    add_config_arguments(demo, PipelineConfig, skip=DEMO_SHARED)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="metrics of one agent on one collection")
    ev.add_argument("--data", default="synthetic", help="'synthetic' or a BEIR folder")
    ev.add_argument("--encoder", default="hashing", type=_encoder_name,
                    help=f"{', '.join(BASELINES)}, or llm:CHECKPOINT_DIR (an SFT run or checkpoint), llm:smollm2, "
                         "llm:HF_MODEL_DIR (untrained, with the embed token)")
    ev.add_argument("--reasoning", type=int, nargs="?", const=32, default=0, metavar="N",
                    help="llm encoders: generate up to N reasoning tokens per query before embedding (default 32)")
    ev.add_argument("--max-doc-tokens", type=int, default=96, help="llm base models: document truncation")
    ev.add_argument("--lowercase", action="store_true",
                    help="llm base models: case-fold queries and documents (as `sft --lowercase` trains)")
    ev.add_argument("--batch-size", type=positive_int, default=16, help="llm encoders: sequences per forward pass")
    ev.add_argument("--device", default="cpu", help="llm encoders: torch device (cuda for a GPU)")
    ev.add_argument("--dtype", default="float32", help="llm encoders: float32, or bfloat16 on GPU")
    ev.add_argument("--json", action="store_true", help=f"print JSON with keys {', '.join(DEFAULT_METRICS)}")
    ev.add_argument("--run-out", type=Path, help="write a TREC run file (qid Q0 docid rank score tag), and its "
                                                 "per-query record beside it (RUN.record.json)")
    ev.add_argument("--record-out", type=Path, help="write the per-query record (metrics and what identifies the "
                                                    "run, for benchmarks/tables.py) here")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    sft = sub.add_parser("sft", help="SFT warm-up of the LLM embedder (resumes an existing --output-dir)",
                         formatter_class=HelpFormatter)
    add_config_arguments(sft, SFTConfig)
    sft.set_defaults(func=cmd_sft)

    rl = sub.add_parser("rl", help="GRPO of an SFT checkpoint against the env (resumes an existing --output-dir)",
                        formatter_class=HelpFormatter)
    add_config_arguments(rl, GRPOConfig)
    rl.set_defaults(func=cmd_rl)
    for command in (demo, ev, sft, rl):
        command.add_argument("--debug", action="store_true", help="show the traceback of an error (or SEARCHR3_DEBUG=1)")
    return parser


def baseline_names(value: str) -> list[str]:
    names = value.split(",")
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    return names


def _encoder_name(value: str) -> str:
    if value in BASELINES or (value.startswith("llm:") and len(value) > 4):
        return value
    raise argparse.ArgumentTypeError(f"choose from {', '.join(BASELINES)} or llm:PATH, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for a required one and a switch (``--no-progress``), whose name says it."""

    def _get_help_string(self, action):
        if action.required or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)):
            return action.help
        return super()._get_help_string(action)


def add_config_arguments(parser: argparse.ArgumentParser, config, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of a config dataclass, under its settings group, with the help its field carries;
    fields in ``skip`` are left to the caller."""
    for title, names in groups(config):
        group = parser.add_argument_group(title)
        for name in (n for n in names if n not in skip):
            f = config.__dataclass_fields__[name]
            flag, text = "--" + name.replace("_", "-"), f.metadata.get("help")
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if name == "progress":
                group.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
            elif isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            else:
                group.add_argument(flag, type=type(default) if default is not None else str, default=default,
                                   required=default is None, help=text)


def cmd_sft(args) -> int:
    from .sft import train

    cfg = SFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig)})
    checkpoint = train(cfg)
    print(f"final checkpoint: {checkpoint}\nevaluate it: searchr3 eval --data {cfg.data} --encoder llm:{cfg.output_dir}")
    return 0


def cmd_rl(args) -> int:
    from .grpo import train

    cfg = GRPOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig)})
    checkpoint = train(cfg)
    print(f"final checkpoint: {checkpoint}\nplot: {Path(cfg.output_dir) / 'metrics.png'}")
    return 0


# Errors a user can cause and fix (bad data, paths, settings, checkpoints, a missing extra); anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    command = f"searchr3 {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug or os.environ.get("SEARCHR3_DEBUG"):
            raise
        # Every file the package writes is atomic and a run resumes from its last checkpoint: nothing is half-written.
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug or os.environ.get("SEARCHR3_DEBUG"):
            raise
        missing = explain_missing(err, command) if isinstance(err, ImportError) else None
        print(missing or f"{command}: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The error's message on one line; an OSError as ``path: reason``."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename is not None else err.strerror
    return " ".join(str(err).split()) or type(err).__name__

if __name__ == "__main__":
    sys.exit(main())

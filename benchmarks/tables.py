"""The results tables, generated from committed records: never typed by hand.

Reads the per-query evaluation records under ``benchmarks/results/records/retrieval/``
(``searchr3_env.records``), the SPT fine-tuning records under ``records/spt/`` (``spt_finetune.py --json``) and
``records/carried_over.json`` (numbers from before records existed, each with its original command), and rewrites
the blocks between ``<!-- tables:NAME begin -->`` and ``<!-- tables:NAME end -->`` in ``benchmarks/RESULTS.md``,
``benchmarks/results/retrieval.md`` and the README. Regenerating is idempotent (resampling is seeded), and
``--check`` fails when a committed table differs from what the records give.

Retrieval comparisons follow ``benchmarks/PROTOCOL.md``: test-split records only; each agent against the
reference agent (hashing) on the same queries, with the hierarchical bootstrap CI, the randomisation test
over queries and seeds and the MDE of ``benchmarks/stats.py``; Holm over every comparison in a table.
The records are checked first: a test-split record without its command, or two live records of one
configuration and seed, is refused.

    .venv/bin/python benchmarks/tables.py            # rewrite the blocks
    .venv/bin/python benchmarks/tables.py --check    # exit 1 if a block is out of date
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stats import compare, holm  # noqa: E402
from searchr3_env.records import EvalRecord, read_records  # noqa: E402

HERE = ROOT / "benchmarks"
RECORDS = HERE / "results" / "records"
REFERENCE = "hashing"  # the agent every other agent is compared with
PRIMARY = "ndcg@10"  # the metric of the headline comparisons
METRICS = {"ndcg@10": "nDCG@10", "recall@100": "Recall@100", "mrr@10": "MRR@10", "map": "MAP"}
AGENT_ORDER = ("random", "hashing", "minilm")
COLLECTION_ORDER = ("synthetic-v1", "cranfield", "npl", "cacm")
ALPHA = 0.05


class ProtocolError(ValueError):
    """Records that break benchmarks/PROTOCOL.md; the message names the files."""


# ---------------------------------------------------------------- records


def check_protocol(records: list[EvalRecord]) -> list[EvalRecord]:
    """The records a table may use (superseded ones dropped), after refusing what the protocol forbids."""
    live = [r for r in records if not r.metadata.get("superseded")]
    for r in live:
        if r.metadata["split"] == "test" and not r.metadata.get("command"):
            raise ProtocolError(f"{r.path}: a test-split record must say the command that produced it")
    seen: dict[tuple, EvalRecord] = {}
    for r in live:
        key = (*r.configuration, r.metadata.get("seed"))
        if key in seen:
            raise ProtocolError(
                f"{seen[key].path} and {r.path}: two records of one configuration and seed; the test queries are "
                f"scored once per reported configuration: set \"superseded\" (why) in the metadata of the one that "
                f"no longer counts")
        seen[key] = r
    fingerprints = defaultdict(set)
    for r in live:
        fingerprints[r.metadata["collection"]].add(r.metadata["fingerprint"])
    for collection, prints in fingerprints.items():
        if len(prints) > 1:
            raise ProtocolError(f"collection {collection!r} has records of {len(prints)} different contents "
                                f"(fingerprints {sorted(p[:12] for p in prints)}): they cannot share a table")
    return live


def seed_matrix(runs: list[EvalRecord], metric: str, queries: list[str]) -> np.ndarray:
    """(seeds, queries) scores of one configuration's records, in ``queries`` order."""
    for r in runs:
        if set(r.per_query) != set(queries):
            raise ProtocolError(f"{r.path}: scores other queries than {runs[0].path}; records of one split must "
                                f"hold every judged query")
    return np.array([[r.per_query[q][metric] for q in queries] for r in runs])


def configurations(records: list[EvalRecord], split: str = "test") -> dict[str, dict[str, list[EvalRecord]]]:
    """collection -> agent -> its records (one per seed), in display order."""
    table: dict[str, dict[str, list[EvalRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.metadata["split"] == split:
            table[r.metadata["collection"]][r.metadata["agent"]].append(r)

    def rank(order, name):
        return (order.index(name) if name in order else len(order), name)

    return {c: {a: sorted(table[c][a], key=lambda r: (r.metadata.get("seed") is None, r.metadata.get("seed") or 0))
                for a in sorted(table[c], key=lambda a: rank(AGENT_ORDER, a))}
            for c in sorted(table, key=lambda c: rank(COLLECTION_ORDER, c))}


def comparisons(table, metrics, resamples: int) -> dict[tuple[str, str, str], object]:
    """(collection, agent, metric) -> stats.Comparison against the reference agent, Holm-adjusted as one family."""
    out = {}
    for collection, agents in table.items():
        if REFERENCE not in agents:
            continue
        queries = sorted(agents[REFERENCE][0].per_query)
        for agent, runs in agents.items():
            if agent == REFERENCE:
                continue
            for metric in metrics:
                a, b = seed_matrix(agents[REFERENCE], metric, queries), seed_matrix(runs, metric, queries)
                out[collection, agent, metric] = compare(a, b, resamples=resamples)
    adjusted = holm([c.p for c in out.values()]) if out else []
    return {key: (c, p) for (key, c), p in zip(out.items(), adjusted)}


# ---------------------------------------------------------------- formatting


def link(target: Path, page: Path) -> str:
    """``target`` relative to the folder of the page that links to it, with forward slashes."""
    anchor = ""
    if "#" in target.name:
        name, anchor = target.name.split("#", 1)
        target, anchor = target.with_name(name), "#" + anchor
    return Path(os.path.relpath(target, page.parent)).as_posix() + anchor


def mean_cell(runs: list[EvalRecord], metric: str) -> str:
    if metric not in runs[0].metrics:
        return ""
    means = [r.mean[metric] for r in runs]
    if len(means) == 1:
        return f"{means[0]:.4f}"
    return f"{np.mean(means):.4f} ± {np.std(means, ddof=1):.4f}"


def carried_cell(row: dict, metric: str) -> str:
    if row.get(metric) is None:
        return ""
    sd = row.get("sd", {}).get(metric)
    return f"{row[metric]:.4f}" + ("" if sd is None else f" ± {sd:.4f}")


def diff_cell(comparison, p_holm: float) -> str:
    text = f"{comparison.diff:+.4f} [{comparison.low:+.4f}, {comparison.high:+.4f}]"
    return f"**{text}**" if p_holm < ALPHA else text


def p_cell(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------- tables


def retrieval_headline(table, stats, carried: list[dict], page: Path) -> str:
    details = link(HERE / "results" / "retrieval.md#baseline-agents-test-queries", page)
    shown = [m for m in METRICS if m != "map"]  # one screen: MAP is in the full table
    header = ["collection", "agent", "queries × seeds", *(METRICS[m] for m in shown),
              f"Δ {METRICS[PRIMARY]} vs {REFERENCE} [95 % CI]", "p (Holm)", "MDE"]
    rows = []
    for collection, agents in table.items():
        for agent, runs in agents.items():
            means = [mean_cell(runs, m) for m in shown]
            if (collection, agent, PRIMARY) in stats:
                c, p = stats[collection, agent, PRIMARY]
                tail = [diff_cell(c, p), p_cell(p), f"{c.mde:.3f}"]
            else:
                tail = ["reference" if agent == REFERENCE else "", "", ""]
            rows.append([collection, f"[{agent}]({details})", f"{len(runs[0].per_query)} × {len(runs)}", *means, *tail])
        for row in (c for c in carried if c["collection"] == collection):
            cells = [carried_cell(row, m) for m in shown]
            rows.append([collection, f"[{row['agent']}]({link(HERE / row['details'], page)}) †",
                         f"{row['queries']} × {row['seeds']}", *cells, "carried over", "", ""])
    note = (f"Test queries, depth 1000. Mean ± sd over seeds where an agent has several. Δ: paired difference with "
            f"a hierarchical bootstrap CI over seeds and queries; p: randomisation test over queries and seeds, "
            f"Holm-adjusted over the table's {len(stats) or 'no'} comparisons; **bold**: p (Holm) < {ALPHA}. MDE: the "
            f"difference this comparison detects with power 0.8 at alpha {ALPHA}. † carried over: the mean of a run "
            f"from before records existed (no per-query scores, so no test); its command is in the linked section.")
    return markdown(header, rows) + "\n\n" + note


def retrieval_full(table, stats, page: Path) -> str:
    header = ["collection", "agent", "seed", *METRICS.values(), "record", "command"]
    rows = []
    for collection, agents in table.items():
        for agent, runs in agents.items():
            for r in runs:
                seed = "" if r.metadata.get("seed") is None else r.metadata["seed"]
                rows.append([collection, agent, seed, *(f"{r.mean[m]:.4f}" for m in METRICS),
                             f"[{r.path.name}]({link(r.path, page)})", f"`{r.metadata['command']}`"])
    runs_table = markdown(header, rows)
    header = ["collection", "agent", "metric", f"Δ vs {REFERENCE} [95 % CI]", "wins / losses / ties", "p", "p (Holm)",
              "MDE"]
    rows = [[collection, agent, METRICS[metric], diff_cell(c, p), f"{c.wins} / {c.losses} / {c.ties}", p_cell(c.p),
             p_cell(p), f"{c.mde:.3f}"] for (collection, agent, metric), (c, p) in stats.items()]
    return (runs_table + "\n\nEvery agent against " + REFERENCE + " on every metric (Holm over these "
            + f"{len(rows)} comparisons; wins count queries, on seed means):\n\n" + markdown(header, rows))


def carried_table(section: dict, page: Path) -> str:
    source = f"[{section['details'].split('#')[0].split('/')[-1]}]({link(HERE / section['details'], page)})"
    rows = [[*row] for row in section["rows"]]
    return (markdown(section["columns"], rows)
            + f"\n\nCarried over from {section['date']} (no record; details: {source}): `{section['command']}`")


def spt_label(args: dict) -> str:
    attention = f"sparse attention s = {args['sparsity']}" if args["sparsity"] > 1 else "dense attention"
    ffn = ("FFN dense" if args["ffn_active"] >= args["ffn_blocks"]
           else f"routed FFN {args['ffn_active']} of {args['ffn_blocks']}")
    return f"{attention}, {ffn}, {args['steps']} steps"


def spt_anchor(label: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", label.lower()).replace(" ", "-")


def spt_table(paths: list[Path], page: Path) -> str:
    def gap(a: float, b: float) -> str:
        return f"{100 * (b - a) / a:+.2f} %"

    rows = []
    for path in paths:
        run = json.loads(path.read_text())
        dense, spt, label = run["dense"], run["spt"], spt_label(run["args"])
        before = (gap(dense["heldout_base"], spt["heldout_spt_start"])
                  if "heldout_base" in dense and "heldout_spt_start" in spt else "")
        rows.append([f"[{label}]({link(HERE / 'results' / ('spt.md#' + spt_anchor(label)), page)})", before,
                     gap(dense["heldout_own"], spt["heldout_own"]), gap(dense["heldout_own"], spt["heldout_dense_eval"]),
                     f"{spt['peak_rss_mib'][-1] / dense['peak_rss_mib'][-1]:.2f}×",
                     f"[{path.name}]({link(path, page)})"])
    rows.sort(key=lambda row: float(row[2].split()[0]))
    header = ["SPT setting (SmolLM2-135M, full fine-tuning)", "held-out loss vs dense, before", "after, SPT model",
              "after, SPT-trained weights run dense", "peak RSS vs dense (CPU reference)", "record"]
    return (markdown(header, rows) + "\n\nGoal: within 2 % of dense. Held-out loss on the last 20 Cranfield documents; "
            "2 × 256 tokens per step, lr 5e-5, calibrated; CPU, so memory is the PyTorch reference path's.")


def glance(table, carried: list[dict], page: Path) -> str:
    collections = list(table)
    header = ["agent", *(f"{c} ({len(next(iter(table[c].values()))[0].per_query)} q)" for c in collections)]
    rows = []
    for agent in dict.fromkeys(a for c in collections for a in table[c]):
        rows.append([agent, *(mean_cell(table[c][agent], PRIMARY) if agent in table[c] else "" for c in collections)])
    best: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in carried:
        group = row.get("glance")
        if group and (row["collection"] not in best[group] or row[PRIMARY] > best[group][row["collection"]][PRIMARY]):
            best[group][row["collection"]] = row
    for group, by_collection in best.items():
        rows.append([f"{group} †", *(carried_cell(by_collection[c], PRIMARY) if c in by_collection else ""
                                     for c in collections)])
    results = link(HERE / "RESULTS.md", page)
    return (f"Test-query {METRICS[PRIMARY]} (mean ± sd over seeds), generated by `benchmarks/tables.py` from the "
            f"records in `benchmarks/results/records/`:\n\n" + markdown(header, rows) +
            f"\n\n† carried over (best run per collection, before per-query records). Significance, seeds, env speed, "
            f"refresh fidelity, SPT and RL: [`benchmarks/RESULTS.md`]({results}).")


# ---------------------------------------------------------------- blocks


def replace_block(text: str, name: str, content: str, page: Path) -> str:
    pattern = re.compile(rf"(<!-- tables:{re.escape(name)} begin -->).*?(<!-- tables:{re.escape(name)} end -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{page}: no '<!-- tables:{name} begin -->' ... '<!-- tables:{name} end -->' block")
    return pattern.sub(lambda m: f"{m[1]}\n{content}\n{m[2]}", text, count=1)


def blocks(records_dir: Path, resamples: int) -> dict[Path, dict[str, object]]:
    """page -> block name -> a function of the page giving the block's Markdown."""
    records = check_protocol(read_records(records_dir / "retrieval"))
    table = configurations(records)
    headline_stats = comparisons(table, [PRIMARY], resamples)
    full_stats = comparisons(table, list(METRICS), resamples)
    carried = json.loads((records_dir / "carried_over.json").read_text())
    spt = sorted(p for p in (records_dir / "spt").glob("*.json") if not p.name.startswith("."))
    return {
        HERE / "RESULTS.md": {
            "retrieval": lambda page: retrieval_headline(table, headline_stats, carried["retrieval"], page),
            "env": lambda page: carried_table(carried["env"], page),
            "corpus": lambda page: carried_table(carried["corpus"], page),
            "refresh": lambda page: carried_table(carried["refresh"], page),
            "refresh-grpo": lambda page: carried_table(carried["refresh-grpo"], page),
            "spt": lambda page: spt_table(spt, page),
            "rl": lambda page: carried_table(carried["rl"], page),
        },
        HERE / "results" / "retrieval.md": {"retrieval-full": lambda page: retrieval_full(table, full_stats, page)},
        ROOT / "README.md": {"glance": lambda page: glance(table, carried["retrieval"], page)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--resamples", type=int, default=10_000)
    args = parser.parse_args(argv)
    stale = []
    for page, named in blocks(args.records, args.resamples).items():
        old = page.read_text(encoding="utf-8")
        new = old
        for name, make in named.items():
            new = replace_block(new, name, make(page), page)
        if new != old:
            stale.append(page)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    for page in stale:
        print(f"{'out of date' if args.check else 'rewrote'}: {page.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

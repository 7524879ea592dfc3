"""Per-query evaluation records: what a results table is computed from, and what identifies the run.

A mean alone cannot be compared honestly: a paired test needs every query's score, and a table row
needs to say which agent, checkpoint, seed, collection and command produced it. So every evaluation
can write one record, a JSON file beside its run file::

    {"format": "searchr3-eval-record-v1",
     "metadata": {"agent", "checkpoint", "seed", "collection", "fingerprint", "split", "turns", "depth",
                  "command", "commit", "date", ...},
     "metrics": [...], "mean": {...}, "per_query": {qid: {metric: value}}, "unranked": [...], "mean_reward"}

``per_query`` holds every judged query of the split, zeros included (a judged query the run lacks
scores 0, as in :func:`searchr3_env.metrics.evaluate_run`), so records of two agents on one split
pair query by query. ``benchmarks/tables.py`` reads them with :func:`read_records` and writes the
results tables; ``benchmarks/PROTOCOL.md`` says which records may become a reported row.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write
from .cache_keys import file_digest, folder_digest

FORMAT = "searchr3-eval-record-v1"
REQUIRED = ("agent", "collection", "fingerprint", "split", "depth")  # a record without these identifies nothing
SPLITS = ("all", "train", "test")


class RecordError(ValueError):
    """A record file that cannot be read as one; the message names the file and the field."""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: its metadata and every judged query's metrics."""

    metadata: dict
    per_query: dict[str, dict[str, float]]
    path: Path | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(next(iter(self.per_query.values())))

    @property
    def mean(self) -> dict[str, float]:
        return {m: math.fsum(q[m] for q in self.per_query.values()) / len(self.per_query) for m in self.metrics}

    @property
    def configuration(self) -> tuple:
        """What seeds repeat: collection (and its fingerprint), split, agent, turns and depth.

        The checkpoint is not part of it (each training seed has its own), so ``agent`` must name the
        recipe, e.g. ``grpo-lowercase``; records of one configuration differ by their seed.
        """
        m = self.metadata
        return m["collection"], m["fingerprint"], m["split"], m["agent"], m.get("turns", 1), m["depth"]


def record_metadata(
    dataset,
    *,
    agent: str,
    split: str,
    depth: int,
    seed: int | None = None,
    checkpoint: str | Path | None = None,
    turns: int = 1,
    command: str | None = None,
    **extra,
) -> dict:
    """The metadata dict :func:`write_record` takes, filled from ``dataset`` (the whole collection).

    ``checkpoint`` (a file or a run/model folder) is recorded with a sha256 of its bytes, so a row
    names the weights it measured, not a folder that may since have been overwritten. ``command``
    defaults to this process's command line; ``extra`` keys (e.g. ``reasoning_tokens``) are kept.
    """
    return {
        "agent": agent,
        "checkpoint": None if checkpoint is None else checkpoint_metadata(checkpoint),
        "seed": seed,
        "collection": dataset.name,
        "fingerprint": dataset.fingerprint,
        "split": split,
        "turns": turns,
        "depth": depth,
        "command": command,
        **extra,
    }


def checkpoint_metadata(path: str | Path) -> dict:
    """``{"path", "digest"}``: the sha256 of the file, or of every file in the folder."""
    path = Path(path)
    if path.is_dir():
        return {"path": str(path), "digest": folder_digest(path)}
    if path.is_file():
        return {"path": str(path), "digest": file_digest(path)}
    raise FileNotFoundError(f"{path}: checkpoint not found, so its weights cannot be named in the record")


def record_path_beside(run_path: str | Path) -> Path:
    """Where the record of a run file goes: ``run.trec`` -> ``run.record.json``."""
    run_path = Path(run_path)
    return run_path.with_name(f"{run_path.stem}.record.json")


def write_record(path: str | Path, evaluation, metadata: Mapping) -> EvalRecord:
    """Write ``evaluation``'s per-query metrics and ``metadata`` to ``path`` atomically; returns the record.

    ``evaluation`` is an :class:`~searchr3_env.evaluation.AgentEvaluation` (from ``evaluate_agent`` or
    ``evaluate_pair``) or a :class:`~searchr3_env.metrics.RunEvaluation`. ``metadata`` needs
    ``agent``, ``collection``, ``fingerprint``, ``split`` and ``depth`` (see :func:`record_metadata`);
    ``turns`` defaults to 1, ``command`` to this process's command line, and the package's git commit
    and the UTC date are added.
    """
    run_evaluation = getattr(evaluation, "metrics", evaluation)
    per_query = getattr(run_evaluation, "per_query", None)
    if not isinstance(per_query, Mapping):
        raise TypeError(f"evaluation must be an AgentEvaluation or a RunEvaluation, got {type(evaluation).__name__}")
    meta = dict(metadata)
    for key, default in (("seed", None), ("checkpoint", None), ("turns", 1)):
        meta.setdefault(key, default)
    if not meta.get("command"):
        meta["command"] = shlex.join(sys.argv)
    meta.setdefault("commit", package_commit())
    meta.setdefault("date", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    body = {
        "format": FORMAT,
        "metadata": meta,
        "metrics": list(run_evaluation.mean),
        "mean": dict(run_evaluation.mean),
        "per_query": {q: dict(v) for q, v in per_query.items()},
        "unranked": list(getattr(evaluation, "unranked", ())),
        "mean_reward": getattr(evaluation, "mean_reward", None),
    }
    record = _validated(body, Path(path))  # refuse to write what read_records would refuse to read
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
    return record


def read_records(paths: str | Path | Iterable[str | Path]) -> list[EvalRecord]:
    """Records from files, folders (every ``*.json`` below) or glob patterns, sorted by path.

    A pattern or folder that matches nothing is an error, so a typo never yields an empty table.
    """
    sources = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: set[Path] = set()
    for source in sources:
        source_path = Path(source)
        if source_path.is_dir():
            found = list(source_path.rglob("*.json"))
        elif source_path.is_file():
            found = [source_path]
        else:
            found = [Path(p) for p in glob.glob(str(source), recursive=True)]
        if not found:
            raise RecordError(f"{source}: no record file matches")
        files.update(found)
    return [read_record(p) for p in sorted(files)]


def read_record(path: str | Path) -> EvalRecord:
    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None
    return _validated(body, path)


def _validated(body, path: Path) -> EvalRecord:
    def fail(field: str, why: str):
        raise RecordError(f"{path}: field {field!r} {why}")

    if not isinstance(body, dict):
        fail("(top level)", "must be a JSON object")
    if body.get("format") != FORMAT:
        fail("format", f"must be {FORMAT!r}, got {body.get('format')!r}")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        fail("metadata", "must be an object")
    for key in REQUIRED:
        if meta.get(key) in (None, ""):
            fail(f"metadata.{key}", "is missing")
    if meta["split"] not in SPLITS:
        fail("metadata.split", f"must be one of {SPLITS}, got {meta['split']!r}")
    for key in ("depth", "turns"):
        if not (isinstance(meta.get(key, 1), int) and meta.get(key, 1) >= 1):
            fail(f"metadata.{key}", f"must be a positive integer, got {meta.get(key)!r}")
    if meta.get("seed") is not None and not isinstance(meta["seed"], int):
        fail("metadata.seed", f"must be an integer or null, got {meta['seed']!r}")
    checkpoint = meta.get("checkpoint")
    if checkpoint is not None and not (isinstance(checkpoint, dict) and checkpoint.get("digest")):
        fail("metadata.checkpoint", "must be null or an object with 'path' and 'digest'")
    per_query = body.get("per_query")
    if not isinstance(per_query, dict) or not per_query:
        fail("per_query", "must be a non-empty object {query id: {metric: value}}")
    metrics = None
    for qid, values in per_query.items():
        if not isinstance(values, dict) or not values:
            fail(f"per_query.{qid}", "must be a non-empty object {metric: value}")
        if metrics is None:
            metrics = set(values)
        elif set(values) != metrics:
            fail(f"per_query.{qid}", f"has metrics {sorted(values)}, the first query {sorted(metrics)}")
        for metric, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"per_query.{qid}.{metric}", f"must be a finite number, got {value!r}")
    return EvalRecord(dict(meta), {q: {m: float(v) for m, v in vals.items()} for q, vals in per_query.items()}, path)


def package_commit() -> str | None:
    """The git commit of the checkout this package runs from (``+dirty`` with uncommitted changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")

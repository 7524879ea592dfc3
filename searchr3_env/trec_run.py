"""TREC run files: ``qid Q0 docid rank score tag``, one retrieved document a line.

The standard exchange format, so runs can be checked with trec_eval itself or
compared with other systems. Each query's lines are written in trec_eval's order
(:func:`searchr3_env.metrics.rank_documents`), so the rank column agrees with
the scores. Scores are written with ``repr`` and read back bit for bit. Writing
is atomic: a crash leaves the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from .atomic import atomic_write
from .metrics import rank_documents


class RunFileError(ValueError):
    """A malformed run file; the message names file and line."""


def _check_token(value: str, what: str) -> None:
    """Fields are whitespace-separated, so one with whitespace (or none at all) would not read back."""
    if not isinstance(value, str) or value.split() != [value]:
        raise ValueError(f"{what} must be a non-empty string without whitespace, got {value!r}")


def check_run_ids(query_ids: Iterable[str], doc_ids: Iterable[str]) -> None:
    """Refuse ids a run file cannot hold *before* an evaluation produces them, not when its run is written."""
    for what, ids in (("query id", query_ids), ("doc id", doc_ids)):
        bad = [i for i in ids if not isinstance(i, str) or i.split() != [i]]
        if bad:
            raise ValueError(f"{len(bad)} {what}s are empty or contain whitespace, e.g. {bad[0]!r}: "
                             "a TREC run file (whitespace-separated columns) cannot hold them")


def check_writable(path: str | Path) -> None:
    """Refuse a run file path that cannot be written, before the work that would fill it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, not a run file path", str(path))
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise NotADirectoryError(20, f"cannot write a run file there: {folder} is a file, not a folder", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):  # what an atomic write of the file will need
            pass
    except OSError as err:
        raise OSError(err.errno, f"cannot write a run file there ({err.strerror})", str(path)) from None


def write_trec_run(path: str | Path, run: Mapping[str, Mapping[str, float]], tag: str) -> Path:
    """Write ``run[qid][doc_id] = score`` to ``path`` atomically; queries in the run's order.

    Readers never see half a run, and a bad id or NaN score found midway leaves
    the old file in place (:func:`searchr3_env.atomic.atomic_write`).
    """
    path = Path(path)
    _check_token(tag, "tag")
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        for qid, doc_scores in run.items():
            _check_token(qid, "query id")
            for rank, doc_id in enumerate(rank_documents(doc_scores), 1):
                _check_token(doc_id, f"doc id (query {qid!r})")
                f.write(f"{qid} Q0 {doc_id} {rank} {float(doc_scores[doc_id])!r} {tag}\n")
    return path


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """``run[qid][doc_id] = score`` from a run file; blank lines are skipped.

    The second column is ignored and the rank column only checked to be an
    integer, as trec_eval does: the order comes from the scores.
    """
    path = Path(path)
    run: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 6:
                raise RunFileError(f"{where}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}")
            qid, _, doc_id, rank, score, _ = fields
            try:
                int(rank)
            except ValueError:
                raise RunFileError(f"{where}: rank {rank!r} is not an integer") from None
            try:
                value = float(score)
            except ValueError:
                raise RunFileError(f"{where}: score {score!r} is not a number") from None
            if value != value:
                raise RunFileError(f"{where}: score is NaN")
            scores = run.setdefault(qid, {})
            if doc_id in scores:
                raise RunFileError(f"{where}: document {doc_id!r} appears twice for query {qid!r}")
            scores[doc_id] = value
    return run

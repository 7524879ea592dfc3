"""Load BEIR-format folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<name>.tsv``.

Bad data is refused with the file and line that is wrong: malformed JSON, a
record that is not an object, a missing or non-string ``_id``, duplicate ids,
qrels rows with the wrong number of columns or a non-integer grade, and empty
files. Qrels rows naming a query or document the collection does not have are
*dropped with a warning that counts them* (``strict=True`` refuses instead):
public collections do ship such rows, and refusing them would make those
collections unusable, while silently dropping them would hide a data problem.
The counts land in ``dataset.stats``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .dataset import Document, DatasetError, RetrievalDataset

log = logging.getLogger(__name__)


def _read_jsonl(path: Path, what: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, dict]:
    """Records keyed by ``_id``; ``required`` fields must be strings, ``optional`` ones strings if present."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file not found")
    records: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            doc_id = record.get("_id")
            if not isinstance(doc_id, str) or not doc_id:
                raise DatasetError(f"{path}:{lineno}: missing or non-string '_id'")
            for key in required:
                if key not in record:
                    raise DatasetError(f"{path}:{lineno}: record {doc_id!r} has no {key!r} field")
            for key in required + optional:
                if not isinstance(record.get(key, ""), str):
                    raise DatasetError(f"{path}:{lineno}: field {key!r} of {doc_id!r} must be a string")
            if doc_id in records:
                raise DatasetError(
                    f"{path}:{lineno}: duplicate _id {doc_id!r} (first on line {first_line[doc_id]})"
                )
            records[doc_id] = record
            first_line[doc_id] = lineno
    if not records:
        raise DatasetError(f"{path}: no {what} records")
    return records


def _read_qrels(path: Path) -> list[tuple[int, str, str, int]]:
    """(line, query id, doc id, grade) rows; a header line starting with 'query-id' is skipped."""
    if not path.is_file():
        raise DatasetError(f"{path}: qrels file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if lineno == 1 and cols[0] == "query-id":
                continue
            if len(cols) != 3:
                raise DatasetError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(cols)}")
            qid, doc_id, grade = cols
            try:
                rows.append((lineno, qid, doc_id, int(grade)))
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: grade {grade!r} is not an integer") from None
    if not rows:
        raise DatasetError(f"{path}: no qrels rows")
    return rows


def load_beir(
    directory: str | Path,
    split: str = "all",
    qrels_file: str = "test",
    strict: bool = False,
    name: str | None = None,
) -> RetrievalDataset:
    """Load a BEIR folder.

    Args:
        directory: folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/``.
        split: the package's deterministic query split: ``all``, ``train`` or ``test``.
        qrels_file: which ``qrels/<qrels_file>.tsv`` holds the judgements (BEIR's own name).
        strict: refuse qrels naming unknown queries or documents instead of dropping them.
        name: dataset name; the folder name by default.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    docs = _read_jsonl(directory / "corpus.jsonl", "corpus", (), ("title", "text"))
    queries = _read_jsonl(directory / "queries.jsonl", "query", ("text",), ())
    corpus = {d: Document(r.get("title", "") or "", r.get("text", "") or "") for d, r in docs.items()}
    qpath = directory / "qrels" / f"{qrels_file}.tsv"
    qrels: dict[str, dict[str, int]] = {}
    unknown = {"query": [], "document": []}
    for lineno, qid, doc_id, grade in _read_qrels(qpath):
        kind = "query" if qid not in queries else "document" if doc_id not in corpus else None
        if kind:
            if strict:
                bad = qid if kind == "query" else doc_id
                raise DatasetError(f"{qpath}:{lineno}: unknown {kind} {bad!r}")
            unknown[kind].append(lineno)
            continue
        if doc_id in qrels.get(qid, {}):
            raise DatasetError(f"{qpath}:{lineno}: duplicate judgement for ({qid!r}, {doc_id!r})")
        qrels.setdefault(qid, {})[doc_id] = grade
    for kind, lines in unknown.items():
        if lines:
            log.warning(
                "%s: dropped %d qrels rows naming an unknown %s (first on line %d)", qpath, len(lines), kind, lines[0]
            )
    stats = {
        "dropped_qrels_unknown_query": len(unknown["query"]),
        "dropped_qrels_unknown_document": len(unknown["document"]),
    }
    texts = {q: r["text"] for q, r in queries.items()}
    dataset = RetrievalDataset(name or directory.name, corpus, texts, qrels, stats=stats)
    return dataset.split(split)

"""Load BEIR-format folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<name>.tsv``.

Bad data is refused with the file and line that is wrong: malformed JSON, a
record that is not an object, a missing or non-string ``_id``, duplicate ids,
qrels rows with the wrong number of columns or a non-integer grade, and empty
files. Qrels rows naming a query or document the collection does not have are
*dropped with a warning that counts them* (``strict=True`` refuses instead):
public collections do ship such rows, and refusing them would make those
collections unusable, while silently dropping them would hide a data problem.
The counts land in ``dataset.stats``.

Files must be UTF-8. A byte-order mark is dropped wherever a line starts with
one (Windows tools write one at the start of a file, and concatenating such
files puts one mid-file); any other encoding is refused with the line and byte
offset of the first byte that is not UTF-8 text and the ``iconv`` call that
converts the file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from .dataset import DatasetError, Document, RetrievalDataset

log = logging.getLogger(__name__)

BOM = "\ufeff"
# Read with errors="surrogateescape", a byte that is not UTF-8 becomes U+DC80..U+DCFF; a NUL is no text either.
_NOT_TEXT = re.compile("[\x00\udc80-\udcff]")
_UTF16_BOMS = ("\udcff\udcfe", "\udcfe\udcff")  # FF FE and FE FF, as surrogateescape decodes them


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, with a leading byte-order mark dropped from every line.

    Decoding with ``surrogateescape`` keeps a bad byte in place instead of raising from inside the reader,
    so the error can say where it is.
    """
    offset = 0
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        for lineno, line in enumerate(f, 1):
            bad = _NOT_TEXT.search(line)
            if bad:
                raise _not_utf8(path, lineno, offset + _size(line[: bad.start()]), bad.group(), line)
            offset += _size(line)
            yield lineno, line.lstrip(BOM)


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _not_utf8(path: Path, lineno: int, offset: int, char: str, line: str) -> DatasetError:
    """The error for a file in another encoding, with the ``iconv`` call that converts the likely one."""
    byte = 0 if char == "\x00" else ord(char) - 0xDC00
    if line.startswith(_UTF16_BOMS):
        source = "utf-16"
    elif char == "\x00":  # UTF-16 without a mark: the high byte of ASCII text is zero, after it (LE) or before (BE)
        source = "utf-16le" if offset % 2 else "utf-16be"
    else:
        source = None
    advice = f"iconv -f {source} -t utf-8" if source else "iconv -f latin1 -t utf-8 if it is Latin-1"
    looks = " (the file looks like UTF-16)" if source else ""
    return DatasetError(
        f"{path}:{lineno}: byte 0x{byte:02x} at offset {offset} is not UTF-8 text{looks}; "
        f"re-encode the file to UTF-8, e.g. with {advice}"
    )


def _read_jsonl(path: Path, what: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, dict]:
    """Records keyed by ``_id``; ``required`` fields must be strings, ``optional`` ones strings if present."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file not found")
    records: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for lineno, line in _lines(path):
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
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t")
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

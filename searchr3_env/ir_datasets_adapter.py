"""Collections from ``ir_datasets`` (optional extra ``irds``; it downloads, so it needs internet).

``load_ir_datasets("beir/scifact/test")`` turns any ir_datasets id with docs,
queries and qrels into a ``RetrievalDataset``. Documents' ``title``/``text``
fields are used where present (else ``default_text()``); queries likewise.
"""

from __future__ import annotations

from .dataset import Document, DatasetError, RetrievalDataset
from .extras import import_extra


def _text(record, field: str) -> str:
    value = getattr(record, field, None)
    if isinstance(value, str):
        return value
    return record.default_text() if field == "text" and hasattr(record, "default_text") else ""


def load_ir_datasets(dataset_id: str, split: str = "all", name: str | None = None) -> RetrievalDataset:
    """Load an ir_datasets collection; qrels naming unknown queries or documents are refused."""
    irds = import_extra("ir_datasets", "irds", "load_ir_datasets").load(dataset_id)
    for part in ("docs", "queries", "qrels"):
        if not getattr(irds, f"has_{part}")():
            raise DatasetError(f"ir_datasets {dataset_id!r} has no {part}")
    corpus: dict[str, Document] = {}
    for doc in irds.docs_iter():
        if doc.doc_id in corpus:
            raise DatasetError(f"ir_datasets {dataset_id!r}: duplicate doc id {doc.doc_id!r}")
        corpus[doc.doc_id] = Document(_text(doc, "title"), _text(doc, "text"))
    queries = {q.query_id: _text(q, "text") for q in irds.queries_iter()}
    qrels: dict[str, dict[str, int]] = {}
    for row in irds.qrels_iter():
        qrels.setdefault(row.query_id, {})[row.doc_id] = int(row.relevance)
    return RetrievalDataset(name or dataset_id, corpus, queries, qrels).split(split)

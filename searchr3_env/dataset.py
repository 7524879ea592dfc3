"""One in-memory shape for every retrieval collection.

Every source (BEIR folders, ir_datasets, the synthetic collection) produces a
``RetrievalDataset``. Two derived facts matter to the rest of the package:

* ``corpus_fingerprint`` names the documents' content, so an index built for
  other documents is refused on load;
* ``split(name)`` gives a deterministic train/test split of the queries by a
  hash of the query id, so every tool and every run agrees on which queries
  are held out, whatever the order the files list them in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

SPLITS = ("all", "train", "test")
TEST_FRACTION = 0.5
_SPLIT_SALT = b"searchr3-query-split-v1"


class DatasetError(ValueError):
    """Raised for data that cannot form a valid collection (names file and line where known)."""


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    def as_text(self) -> str:
        """Title and body as one string, the form every encoder sees."""
        if self.title and self.text:
            return f"{self.title}\n{self.text}"
        return self.title or self.text


def query_split_of(query_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """'test' or 'train' for a query id, stable across machines and Python versions."""
    digest = hashlib.sha256(_SPLIT_SALT + query_id.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if unit < test_fraction else "train"


def _hash_fields(h, *fields: str) -> None:
    """Length-prefixed, so no choice of texts (newlines, tabs) can make two datasets hash alike."""
    for field_ in fields:
        data = field_.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)


@dataclass(frozen=True)
class RetrievalDataset:
    """Corpus, queries and graded relevance judgements.

    ``qrels[qid][doc_id]`` is an integer grade; grades > 0 are relevant (trec_eval's
    convention). Queries without any judgement stay in ``queries`` (they are part
    of the collection) but are not ``judged_query_ids``: they cannot be scored.
    """

    name: str
    corpus: Mapping[str, Document]
    queries: Mapping[str, str]
    qrels: Mapping[str, Mapping[str, int]]
    split_name: str = "all"
    stats: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.corpus:
            raise DatasetError(f"dataset {self.name!r}: the corpus is empty")
        if not self.queries:
            raise DatasetError(f"dataset {self.name!r}: there are no queries")
        unknown_q = [q for q in self.qrels if q not in self.queries]
        if unknown_q:
            raise DatasetError(f"dataset {self.name!r}: qrels name unknown queries, e.g. {unknown_q[:3]}")
        unknown_d = [d for judged in self.qrels.values() for d in judged if d not in self.corpus]
        if unknown_d:
            raise DatasetError(f"dataset {self.name!r}: qrels name unknown documents, e.g. {unknown_d[:3]}")

    @property
    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def document_texts(self, doc_ids=None) -> list[str]:
        ids = self.doc_ids if doc_ids is None else doc_ids
        return [self.corpus[d].as_text() for d in ids]

    @property
    def judged_query_ids(self) -> list[str]:
        """Queries with at least one relevant (grade > 0) document, in file order."""
        return [q for q in self.queries if any(g > 0 for g in self.qrels.get(q, {}).values())]

    def relevant(self, query_id: str) -> dict[str, int]:
        """The documents with grade > 0 for a query."""
        return {d: g for d, g in self.qrels.get(query_id, {}).items() if g > 0}

    @property
    def corpus_fingerprint(self) -> str:
        """sha256 over document ids, titles and texts in corpus order."""
        h = hashlib.sha256()
        for doc_id, doc in self.corpus.items():
            _hash_fields(h, doc_id, doc.title, doc.text)
        return h.hexdigest()

    @property
    def fingerprint(self) -> str:
        """sha256 over corpus, queries and qrels: names the whole collection's content."""
        h = hashlib.sha256(self.corpus_fingerprint.encode())
        for qid, text in sorted(self.queries.items()):
            _hash_fields(h, "q", qid, text)
        for qid in sorted(self.qrels):
            for doc_id, grade in sorted(self.qrels[qid].items()):
                _hash_fields(h, "r", qid, doc_id, str(grade))
        return h.hexdigest()

    def split(self, name: str, test_fraction: float = TEST_FRACTION) -> "RetrievalDataset":
        """The same corpus with only the queries (and qrels) of split ``name``.

        ``all`` returns the dataset itself. The corpus is shared, so an index built
        for one split serves every split of the same collection.
        """
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name == "all":
            return self
        keep = {q: t for q, t in self.queries.items() if query_split_of(q, test_fraction) == name}
        if not keep:
            raise DatasetError(f"dataset {self.name!r}: split {name!r} has no queries")
        qrels = {q: dict(j) for q, j in self.qrels.items() if q in keep}
        return RetrievalDataset(self.name, self.corpus, keep, qrels, split_name=name, stats=dict(self.stats))

    def subset(self, name: str, query_ids, doc_ids=None, extra_queries=None) -> "RetrievalDataset":
        """A collection with only ``query_ids`` (their qrels too) and, if given, only ``doc_ids`` (kept in corpus
        order). ``extra_queries`` maps new query ids to (text, qrels): pseudo-queries that join the kept ones."""
        queries = {q: self.queries[q] for q in query_ids}
        qrels = {q: dict(self.qrels[q]) for q in query_ids if q in self.qrels}
        for query_id, (text, judged) in (extra_queries or {}).items():
            if query_id in self.queries:
                raise ValueError(f"{self.name}: a query is already called {query_id!r}")
            queries[query_id], qrels[query_id] = text, dict(judged)
        keep = None if doc_ids is None else set(doc_ids)
        corpus = self.corpus if keep is None else {d: doc for d, doc in self.corpus.items() if d in keep}
        return RetrievalDataset(name, corpus, queries, qrels)

    def __repr__(self) -> str:
        return (
            f"RetrievalDataset({self.name!r}, split={self.split_name!r}, docs={len(self.corpus)}, "
            f"queries={len(self.queries)}, judged={len(self.judged_query_ids)})"
        )

"""Refresh policies: keep the cached document embeddings fresh enough, cheaply.

In Search-R3 the policy that writes query embeddings also writes the document
embeddings, so every optimiser step (a new encoder ``version``) leaves the
cached index stale. Re-encoding the whole corpus after every step is what an
exact reward would need and what no one can afford. A policy decides, before a
batch of queries is scored, which rows to re-encode:

* ``FrozenDocuments``: none (the document side never changes, e.g. a frozen
  document tower, or a query-only policy).
* ``FullRefresh(every=N, background=False)``: the ANCE-style baseline. Every
  N encoder versions the whole corpus is re-encoded into a *new* index that is
  swapped in whole, so no step ever scores a half-built index. With
  ``background=True`` the rebuild runs in a thread with a deep copy of the
  encoder taken when it starts (optimiser steps during the rebuild never leak
  into the snapshot) while steps go on against the previous snapshot.
* ``LocalRefresh(pool=C, max_staleness=S)``: per batch, the *pool* is each
  query's top-C under the current index plus its judged relevant documents.
  Stale pool rows are re-encoded (at most once per document and version,
  batched across the queries of a vector step) and written back, so the rows
  that decide the reward (the top of the ranking and the relevant documents)
  are scored fresh; the rest keep cached scores. Refreshed rows can move, and
  pull other stale rows into a top-C, so the pool is recomputed until it is
  all fresh (at most ``max_rounds`` times). Rows outside the pool whose
  *cached* score is at least a relevant document's (they push its rank down)
  are refreshed too once they are more than S versions old. What this cannot
  see is a stale row whose cached score is below a relevant document but whose
  fresh score would be above it: its errors make ranks optimistic, never
  pessimistic (measured in ``benchmarks/results/refresh.md``: reward bias
  +0.000 to +0.011 on NPL, against FullRefresh(every=N)'s negative bias).

Policies with ``save_to`` write each completed snapshot atomically, so a
process killed mid-refresh leaves the last complete snapshot on disk.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from .encoders import Encoder
from .index import CorpusIndex, encode_in_batches

log = logging.getLogger(__name__)

CorpusEncodeFn = Callable[[Encoder, Sequence[str]], np.ndarray]


class Documents(Protocol):
    """What a policy refreshes (a :class:`searchr3_env.corpus.Corpus`): rows, their encoder, the texts by row."""

    index: CorpusIndex
    encoder: Encoder
    texts: Sequence[str]  # the document text of each index row, with ``take(rows)``

    def swap(self, index: CorpusIndex) -> None: ...


def encode_locally(encoder: Encoder, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """The default way to encode many documents: batches in this process, no progress bar."""
    return encode_in_batches(encoder, texts, batch_size, progress=False, desc="refresh")


@dataclass(frozen=True)
class RefreshReport:
    """What preparing one batch cost, and which snapshot it scored against."""

    docs_reencoded: int
    snapshot_id: int


class FrozenDocuments:
    """Never re-encode: the cached rows are the truth."""

    name = "frozen"

    def prepare(self, corpus: Documents, rel_positions: np.ndarray, queries: np.ndarray) -> RefreshReport:
        return RefreshReport(0, 0)


class FullRefresh:
    """Re-encode the whole corpus every ``every`` encoder versions, swapping in a complete new index."""

    name = "full"

    def __init__(
        self,
        every: int = 1,
        background: bool = False,
        save_to: str | Path | None = None,
        encode: CorpusEncodeFn = encode_locally,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.background = background
        self.save_to = Path(save_to) if save_to is not None else None
        self.encode = encode
        self.snapshot_id = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready: CorpusIndex | None = None  # a finished background build, not yet swapped in
        self._error: BaseException | None = None

    def _build(self, corpus: Documents, encoder: Encoder) -> CorpusIndex:
        """A complete new snapshot, saved before anyone can score against it."""
        old = corpus.index
        emb = self.encode(encoder, corpus.texts.take(range(len(corpus.texts))))
        index = CorpusIndex(
            old.doc_ids, emb, encoder.version, factory=old.factory, encoder_name=encoder.name,
            corpus_fingerprint=old.corpus_fingerprint,
        )
        index.index_version = old.index_version + 1
        if self.save_to is not None:
            index.save(self.save_to)
        return index

    def _swap(self, corpus: Documents, index: CorpusIndex) -> None:
        corpus.swap(index)  # every task of the corpus scores against the new snapshot
        self.snapshot_id += 1

    def _background_build(self, corpus: Documents, encoder: Encoder) -> None:
        try:
            index = self._build(corpus, encoder)
            with self._lock:
                self._ready = index
        except BaseException as err:  # surfaced on the next step, never swallowed
            with self._lock:
                self._error = err

    def prepare(self, corpus: Documents, rel_positions: np.ndarray, queries: np.ndarray) -> RefreshReport:
        version = corpus.encoder.version
        if not self.background:
            if version - corpus.index.oldest_version >= self.every:
                self._swap(corpus, self._build(corpus, corpus.encoder))
                return RefreshReport(len(corpus.index), self.snapshot_id)
            return RefreshReport(0, self.snapshot_id)
        reencoded = 0
        with self._lock:
            if self._error is not None:
                err, self._error = self._error, None
                raise RuntimeError("background corpus refresh failed") from err
            if self._ready is not None:
                self._swap(corpus, self._ready)
                reencoded, self._ready = len(corpus.index), None
        stale = version - corpus.index.oldest_version >= self.every
        if (self._thread is None or not self._thread.is_alive()) and stale:
            frozen = copy.deepcopy(corpus.encoder)  # the snapshot must not see later optimiser steps
            self._thread = threading.Thread(target=self._background_build, args=(corpus, frozen), daemon=True)
            self._thread.start()
        return RefreshReport(reencoded, self.snapshot_id)

    def wait(self) -> None:
        """Block until a running background rebuild has finished (tests, shutdown)."""
        if self._thread is not None:
            self._thread.join()

    def __getstate__(self) -> dict:
        """All but the lock and the thread: a copy restarts a rebuild that was still running when it was made."""
        with self._lock:
            return self.__dict__ | {"_lock": None, "_thread": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


class LocalRefresh:
    """Re-encode only the rows that decide this batch's rewards (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        pool: int = 100,
        max_staleness: int | None = 8,
        max_rounds: int = 4,
        encode: CorpusEncodeFn = encode_locally,
    ):
        if pool < 0:
            raise ValueError(f"pool must be >= 0, got {pool}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        self.pool = pool
        self.max_staleness = max_staleness
        self.max_rounds = max_rounds
        self.encode = encode

    def rows_to_refresh(self, corpus: Documents, rel_positions: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Unique positions of the stale rows this batch depends on."""
        index, version = corpus.index, corpus.encoder.version
        pool = [rel_positions[rel_positions >= 0]]
        if self.pool:
            pool.append(index.search(queries, self.pool)[1].ravel())
        rows = np.unique(np.concatenate(pool))
        rows = rows[(rows >= 0) & (index.versions[rows] < version)]
        if self.max_staleness is not None and index.oldest_version < version - self.max_staleness:
            touched = index.rows_at_least(queries, rel_positions)
            too_old = touched[index.versions[touched] < version - self.max_staleness]
            rows = np.union1d(rows, too_old)
        return rows

    def prepare(self, corpus: Documents, rel_positions: np.ndarray, queries: np.ndarray) -> RefreshReport:
        if corpus.index.oldest_version >= corpus.encoder.version:  # nothing is stale: exact as it stands
            return RefreshReport(0, 0)
        total = 0
        for _ in range(self.max_rounds):
            rows = self.rows_to_refresh(corpus, rel_positions, queries)
            if not len(rows):
                break
            corpus.index.update(rows, self.encode(corpus.encoder, corpus.texts.take(rows)), corpus.encoder.version)
            total += len(rows)
        return RefreshReport(total, 0)


POLICIES = {"frozen": FrozenDocuments, "full": FullRefresh, "local": LocalRefresh}


def get_policy(spec) -> FrozenDocuments | FullRefresh | LocalRefresh:
    """A policy object as is, or a new one from its name ('frozen', 'full', 'local')."""
    if isinstance(spec, str):
        if spec not in POLICIES:
            raise ValueError(f"unknown refresh policy {spec!r}; choose from {sorted(POLICIES)}")
        return POLICIES[spec]()
    if not hasattr(spec, "prepare"):
        raise TypeError(f"a refresh policy needs a prepare(corpus, rel_positions, queries) method, got {spec!r}")
    return spec

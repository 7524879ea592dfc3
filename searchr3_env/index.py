"""A versioned FAISS index over corpus embeddings, with exact ranks for rewards.

The index keeps the float32 embedding matrix itself (the truth used for exact
ranks and for saving) and a FAISS index for ``search``: exact inner product by
default (``faiss.knn`` over the matrix, so updates are free), or any
``faiss.index_factory`` string (IVF, HNSW, PQ ...), which is rebuilt lazily after
rows change since not every FAISS structure can update rows in place.

Every row remembers the encoder version that wrote it; ``index_version`` counts
mutations. Both are what the env's refresh policies and ``info`` report.

Ranks are pessimistic: rank(d) = number of documents scoring >= score(d), so a
document tied with a relevant one counts as ranked above it and ties can never
help an agent (a constant action ranks every relevant document last).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_write
from .encoders import Encoder, check_embeddings

log = logging.getLogger(__name__)

FORMAT = "searchr3-corpus-index/1"
# Score blocks of at most this many floats are materialised at once in ranks().
_BLOCK_FLOATS = 1 << 24


class IndexFileError(ValueError):
    """A saved index that is unreadable, corrupt, or built for other data."""


class CorpusIndex:
    """Document embeddings + per-row encoder versions + a FAISS search structure."""

    def __init__(
        self,
        doc_ids: Sequence[str],
        embeddings: np.ndarray,
        versions: int | Sequence[int] = 0,
        *,
        factory: str = "Flat",
        encoder_name: str = "unknown",
        corpus_fingerprint: str | None = None,
    ):
        ids = [str(d) for d in doc_ids]
        if not ids:
            raise ValueError("CorpusIndex needs at least one document")
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings: expected shape (n, dim), got {embeddings.shape} ({embeddings.dtype})")
        self._emb = check_embeddings(embeddings, embeddings.shape[1]).copy()
        if len(ids) != len(self._emb):
            raise ValueError(f"{len(ids)} doc ids but {len(self._emb)} embedding rows")
        self._pos = {d: i for i, d in enumerate(ids)}
        if len(self._pos) != len(ids):
            dup = next(d for i, d in enumerate(ids) if self._pos[d] != i)
            raise ValueError(f"duplicate doc id {dup!r}")
        self.doc_ids = ids
        self._versions = np.broadcast_to(np.asarray(versions, dtype=np.int64), (len(ids),)).copy()
        self.factory = factory
        self.encoder_name = encoder_name
        self.corpus_fingerprint = corpus_fingerprint
        self.index_version = 0
        self._ann: faiss.Index | None = None  # built on first search for non-flat factories
        self._ann_rows = 0
        if factory != "Flat":
            faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)  # fail early on a bad string

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_embeddings(cls, doc_ids, embeddings, version: int = 0, **kwargs) -> "CorpusIndex":
        """An index whose rows were all written by encoder ``version``."""
        return cls(doc_ids, embeddings, version, **kwargs)

    @classmethod
    def build(
        cls, dataset, encoder: Encoder, *, batch_size: int = 256, progress: bool = True, **kwargs
    ) -> "CorpusIndex":
        """Encode a dataset's whole corpus with ``encoder`` (progress bar over batches)."""
        ids = dataset.doc_ids
        emb = encode_in_batches(encoder, dataset.document_texts(ids), batch_size, progress, f"encode {dataset.name}")
        return cls(
            ids,
            emb,
            encoder.version,
            encoder_name=encoder.name,
            corpus_fingerprint=dataset.corpus_fingerprint,
            **kwargs,
        )

    # ------------------------------------------------------------------ state
    @property
    def dim(self) -> int:
        return self._emb.shape[1]

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def embeddings(self) -> np.ndarray:
        """Read-only view of the (n, dim) float32 matrix."""
        view = self._emb.view()
        view.flags.writeable = False
        return view

    @property
    def versions(self) -> np.ndarray:
        view = self._versions.view()
        view.flags.writeable = False
        return view

    def positions(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Row positions of ids (KeyError naming the first unknown id)."""
        try:
            return np.fromiter((self._pos[d] for d in doc_ids), dtype=np.int64, count=len(doc_ids))
        except KeyError as err:
            raise KeyError(f"unknown doc id {err.args[0]!r}") from None

    def stale_rows(self, version: int) -> np.ndarray:
        """Positions of rows written by an encoder version older than ``version``."""
        return np.flatnonzero(self._versions < version)

    # ------------------------------------------------------------------ mutation
    def update(self, positions: Sequence[int], embeddings: np.ndarray, version: int) -> None:
        """Overwrite rows (e.g. re-encoded documents) and record the version that wrote them."""
        positions = np.asarray(positions, dtype=np.int64)
        embeddings = check_embeddings(embeddings, self.dim, "update embeddings")
        if len(positions) != len(embeddings):
            raise ValueError(f"{len(positions)} positions but {len(embeddings)} embedding rows")
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)}), got {positions.min()}..{positions.max()}")
        self._emb[positions] = embeddings
        self._versions[positions] = version
        self._mutated()

    def add(self, doc_ids: Sequence[str], embeddings: np.ndarray, version: int) -> None:
        """Append new documents."""
        embeddings = check_embeddings(embeddings, self.dim, "added embeddings")
        if len(doc_ids) != len(embeddings):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(embeddings)} embedding rows")
        for d in doc_ids:
            if d in self._pos:
                raise ValueError(f"doc id {d!r} is already in the index; use update()")
        start = len(self)
        for i, d in enumerate(doc_ids):
            self._pos[str(d)] = start + i
        self.doc_ids = self.doc_ids + [str(d) for d in doc_ids]
        self._emb = np.concatenate([self._emb, embeddings])
        self._versions = np.concatenate([self._versions, np.full(len(doc_ids), version, dtype=np.int64)])
        self._mutated()

    def _mutated(self) -> None:
        self.index_version += 1
        if self._ann is not None:
            self._ann.reset()  # keeps trained quantizers; rows are re-added on the next search
            self._ann_rows = 0

    # ------------------------------------------------------------------ queries
    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None]
        return check_embeddings(queries, self.dim, "queries")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, positions) per query, best first; positions are -1 where fewer than k exist."""
        queries = self._check_queries(queries)
        k = min(k, len(self))
        if self.factory == "Flat":
            return faiss.knn(queries, self._emb, k, metric=faiss.METRIC_INNER_PRODUCT)
        if self._ann is None:
            self._ann = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
            self._ann_rows = 0
        if not self._ann.is_trained:
            self._ann.train(self._emb)
        if self._ann_rows != len(self):
            self._ann.add(self._emb)
            self._ann_rows = len(self)
        return self._ann.search(queries, k)

    def scores(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Exact inner products of query i with the rows ``positions[i]`` ((n, m); -1 gives -inf)."""
        queries = self._check_queries(queries)
        positions = np.asarray(positions, dtype=np.int64)
        rows = self._emb[np.maximum(positions, 0)]  # (n, m, dim)
        out = np.einsum("nd,nmd->nm", queries, rows)
        return np.where(positions >= 0, out, -np.inf).astype(np.float32)

    def ranks(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Exact pessimistic ranks of given rows for many queries at once.

        Args:
            queries: (n, dim) query embeddings.
            positions: (n, m) row positions per query (e.g. its relevant documents), -1 for padding.
        Returns:
            (n, m) int64: 1 + number of *other* rows scoring >= the row's score; 0 where padded.

        One matrix product per block of queries, then a single pass that keeps
        only the documents scoring at least the weakest given row; the per-row
        counts are taken over those few candidates.
        """
        queries = self._check_queries(queries)
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 2 or len(positions) != len(queries):
            raise ValueError(f"positions: expected shape ({len(queries)}, m), got {positions.shape}")
        valid = positions >= 0
        out = np.zeros(positions.shape, dtype=np.int64)
        step = max(1, _BLOCK_FLOATS // len(self))
        emb_t = self._emb.T
        for start in range(0, len(queries), step):
            sl = slice(start, start + step)
            block = queries[sl] @ emb_t  # (b, n_docs)
            pos, ok = positions[sl], valid[sl]
            thr = np.where(ok, np.take_along_axis(block, np.maximum(pos, 0), axis=1), np.inf)  # (b, m)
            rows, cols = np.nonzero(block >= thr.min(axis=1, keepdims=True))
            ge = block[rows, cols][:, None] >= thr[rows]  # (candidates, m)
            counts = np.stack([np.bincount(rows, ge[:, j], minlength=len(block)) for j in range(pos.shape[1])], 1)
            out[sl] = np.where(ok, counts, 0)
        return out

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "corpus_fingerprint": self.corpus_fingerprint,
            "dim": self.dim,
            "rows": len(self),
            "encoder_name": self.encoder_name,
            "encoder_version": int(self._versions.max()),
            "oldest_row_version": int(self._versions.min()),
            "index_version": self.index_version,
            "factory": self.factory,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"doc_ids": np.array(self.doc_ids, dtype=str), "embeddings": self._emb, "versions": self._versions}

    def save(self, path: str | Path) -> Path:
        """Write the index to one file atomically: a crash leaves the previous file intact."""
        arrays = self._arrays()
        manifest = self.manifest() | {"sha256": _checksum(arrays)}
        buf = io.BytesIO()
        np.savez(buf, manifest=np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8), **arrays)
        with atomic_write(path) as f:
            f.write(buf.getbuffer())
        return Path(path)

    @classmethod
    def load(
        cls, path: str | Path, *, corpus_fingerprint: str | None = None, dim: int | None = None
    ) -> "CorpusIndex":
        """Read a saved index, refusing a truncated, tampered or mismatched file with the reason."""
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"{path}: no such index file")
        try:
            with np.load(path, allow_pickle=False) as z:
                manifest = json.loads(bytes(z["manifest"]).decode())
                arrays = {name: z[name] for name in ("doc_ids", "embeddings", "versions")}
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as err:
            raise IndexFileError(f"{path}: unreadable or truncated index file ({err})") from None
        if manifest.get("format") != FORMAT:
            raise IndexFileError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if _checksum(arrays) != manifest.get("sha256"):
            raise IndexFileError(f"{path}: checksum mismatch, the file was modified or corrupted")
        if corpus_fingerprint is not None and manifest["corpus_fingerprint"] != corpus_fingerprint:
            raise IndexFileError(
                f"{path}: built for corpus {manifest['corpus_fingerprint']!r:.20}, not this dataset's "
                f"{corpus_fingerprint!r:.20}"
            )
        if dim is not None and manifest["dim"] != dim:
            raise IndexFileError(f"{path}: embeddings have dim {manifest['dim']}, expected {dim}")
        index = cls(
            arrays["doc_ids"].tolist(),
            arrays["embeddings"],
            arrays["versions"],
            factory=manifest["factory"],
            encoder_name=manifest["encoder_name"],
            corpus_fingerprint=manifest["corpus_fingerprint"],
        )
        index.index_version = manifest["index_version"]
        return index

    def __repr__(self) -> str:
        return (
            f"CorpusIndex(rows={len(self)}, dim={self.dim}, factory={self.factory!r}, "
            f"encoder={self.encoder_name!r}, versions={self._versions.min()}..{self._versions.max()}, "
            f"index_version={self.index_version})"
        )


def encode_in_batches(encoder: Encoder, texts: Sequence[str], batch_size: int, progress: bool, desc: str):
    """Encode documents in batches behind a progress bar, checking every batch's shape."""
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            out[start : start + len(chunk)] = check_embeddings(
                encoder.encode_documents(chunk), encoder.dim, f"{encoder.name} document embeddings"
            )
            bar.update(len(chunk))
    return out


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_or_build_index(dataset, encoder: Encoder, cache_dir: str | Path, *, progress: bool = True) -> CorpusIndex:
    """The cached index of ``dataset`` under ``encoder`` if one is saved, else build and save it.

    The file name carries the corpus fingerprint, encoder name, dim and version,
    so a changed corpus or encoder never reuses a stale file; a corrupt file is
    reported and rebuilt.
    """
    path = Path(cache_dir) / (
        f"{dataset.name}-{dataset.corpus_fingerprint[:16]}-{encoder.name}-{encoder.dim}d-v{encoder.version}.npz"
    )
    if path.is_file():
        try:
            return CorpusIndex.load(path, corpus_fingerprint=dataset.corpus_fingerprint, dim=encoder.dim)
        except IndexFileError as err:
            log.warning("rebuilding the cached index: %s", err)
    index = CorpusIndex.build(dataset, encoder, progress=progress)
    index.save(path)
    return index

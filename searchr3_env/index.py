"""A versioned FAISS index over corpus embeddings, with exact ranks for rewards.

The index keeps the float32 embedding matrix itself (the truth used for exact
ranks and for saving) and a FAISS index for ``search``: exact inner product by
default (``faiss.knn`` over the matrix, so updates are free), or any
``faiss.index_factory`` string (IVF, HNSW, PQ ...): IVF structures replace
changed rows in place, others (HNSW cannot forget a vector) are rebuilt lazily
on the next search. ``gpu=True`` searches with faiss-gpu (top-k <= 2048 there).

Every row remembers the encoder version that wrote it; ``index_version`` counts
mutations. Both are what the env's refresh policies and ``info`` report.

Ranks are pessimistic: rank(d) = number of documents scoring >= score(d), so a
document tied with a relevant one counts as ranked above it and ties can never
help an agent (a constant action ranks every relevant document last). "Tied"
includes float32 rounding: scores within ``TIE_RTOL * |q| * |d|`` of each other.

An index pickles without its FAISS objects (rebuilt on the next search); one
loaded from a file and unchanged since pickles as the file's path and checksum,
and unpickling reopens the file, refusing it if it has changed.

Two ways to persist: :meth:`CorpusIndex.save` writes the whole index to one file (``FORMAT``);
:meth:`CorpusIndex.save_incremental` checkpoints it as a manifest naming an immutable base segment (a
``FORMAT`` file) and delta segments of the rows changed since the previous checkpoint, so a checkpoint after
a local refresh writes those rows only. Segments are named by their checksum and shared between manifests;
:func:`prune_segments` deletes those no kept manifest names (checkpoint rotation).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_write, remove_stale_temporaries
from .cache_keys import sanitise
from .encoders import Encoder, check_embeddings

log = logging.getLogger(__name__)

FORMAT = "searchr3-corpus-index/1"
# Scores closer than this (relative to |q| |d|) count as ties in ranks(): ~16 float32 ulps.
TIE_RTOL = 2e-6
# Score blocks of at most this many floats are materialised at once in ranks().
_BLOCK_FLOATS = 1 << 25
# What a pickled index that equals its saved file reads back from the file instead of carrying.
_FILE_ARRAYS = ("doc_ids", "_pos", "_emb", "_versions")
# Incremental checkpoints (save_incremental): a manifest naming a base segment (a FORMAT file) and delta segments.
MANIFEST_FORMAT = "searchr3-corpus-index-manifest/1"
DELTA_FORMAT = "searchr3-corpus-index-delta/1"
# A save writes a new base instead of a delta once a manifest's deltas would exceed this share of its base's bytes.
COMPACT_ABOVE = 0.5
_SEGMENT = re.compile(r"(base|delta)-[0-9a-f]{32}\.npz")
_TEMPORARY = re.compile(r"\.((?:base|delta)-[0-9a-f]{32}\.npz|.+?\.json)\..+\.tmp\Z")  # atomic_write's names


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
        gpu: bool = False,
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
        self._ann_synced = False  # whether _ann holds exactly the current rows
        self.gpu = gpu
        self._gpu_res = None  # faiss.StandardGpuResources, made on first need
        if gpu:
            self._gpu_resources()  # fail early without a GPU
        self._oldest: int | None = None
        self._source: tuple[str, str] | None = None  # (path, checksum) of the file this index equals, if any
        self._segments: _Segments | None = None  # the checkpoint segments save_incremental extends, if any
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

    def memory(self) -> dict[str, int]:
        """Bytes held per part: the rows, their versions, the document ids and the id-to-row dict (its slots)."""
        ids = sys.getsizeof(self.doc_ids) + sum(sys.getsizeof(d) for d in self.doc_ids)
        return {"rows": self._emb.nbytes, "versions": self._versions.nbytes, "doc_ids": ids,
                "id_to_row": sys.getsizeof(self._pos)}

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

    @property
    def oldest_version(self) -> int:
        """The encoder version of the stalest row (cached: refresh policies ask every step)."""
        if self._oldest is None:
            self._oldest = int(self._versions.min())
        return self._oldest

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
        self._mutated(positions)

    def add(self, doc_ids: Sequence[str], embeddings: np.ndarray, version: int) -> None:
        """Append new documents."""
        embeddings = check_embeddings(embeddings, self.dim, "added embeddings")
        if len(doc_ids) != len(embeddings):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(embeddings)} embedding rows")
        if len(set(doc_ids)) != len(doc_ids):
            dup = next(d for i, d in enumerate(doc_ids) if d in doc_ids[:i])
            raise ValueError(f"doc id {dup!r} repeats within the added batch")
        for d in doc_ids:
            if d in self._pos:
                raise ValueError(f"doc id {d!r} is already in the index; use update()")
        start = len(self)
        for i, d in enumerate(doc_ids):
            self._pos[str(d)] = start + i
        self.doc_ids = self.doc_ids + [str(d) for d in doc_ids]
        self._emb = np.concatenate([self._emb, embeddings])
        self._versions = np.concatenate([self._versions, np.full(len(doc_ids), version, dtype=np.int64)])
        self._mutated(np.arange(start, len(self)), added=True)

    def _mutated(self, rows: np.ndarray, added: bool = False) -> None:
        """Bump the index version and bring an approximate structure up to date.

        Structures that can remove ids (IVF) get the changed rows replaced in
        place; others (HNSW) are rebuilt on the next search, since they cannot
        forget a vector.
        """
        self.index_version += 1
        self._oldest = None
        self._source = None
        if self._segments is not None:
            self._segments.note(rows, added)
        if self._ann is None or not self._ann_synced:
            return
        try:
            if not added:
                self._ann.remove_ids(rows)
            self._ann.add_with_ids(self._emb[rows], rows)
        except RuntimeError:
            self._ann_synced = False

    # ------------------------------------------------------------------ queries
    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None]
        return check_embeddings(queries, self.dim, "queries")

    def _gpu_resources(self):
        """faiss-gpu's resources, made once per process (they cannot be pickled)."""
        if self._gpu_res is None:
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
                raise RuntimeError("gpu=True needs faiss-gpu and a visible GPU (pip install 'searchr3[gpu]')")
            self._gpu_res = faiss.StandardGpuResources()
        return self._gpu_res

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, positions) per query, best first; positions are -1 where fewer than k exist."""
        queries = self._check_queries(queries)
        k = min(k, len(self))
        if self.gpu and k > 2048:
            raise ValueError(f"FAISS on GPU returns at most 2048 neighbours per query, asked for {k}")
        if self.factory == "Flat":
            if self.gpu:
                return faiss.knn_gpu(self._gpu_resources(), queries, self._emb, k, metric=faiss.METRIC_INNER_PRODUCT)
            return faiss.knn(queries, self._emb, k, metric=faiss.METRIC_INNER_PRODUCT)
        if self._ann is None:
            self._ann = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
            self._ann.train(self._emb)
            if self.gpu:
                self._ann = faiss.index_cpu_to_gpu(self._gpu_resources(), 0, self._ann)
        if not self._ann_synced:
            self._ann.reset()  # keeps the trained quantizer
            self._ann.add(self._emb)  # ids are row positions
            self._ann_synced = True
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
        """
        return self.ranks_and_top_k(queries, positions, 0)[0]

    def ranks_and_top_k(
        self, queries: np.ndarray, positions: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ranks as in :meth:`ranks`, top-k scores, top-k positions) from one pass over the corpus.

        One matrix product per block of queries gives every score; ranks are
        counts over it (:func:`_count_at_least`). Top-k:
        a partial sort of the same scores for the exact index (an approximate
        factory answers top-k from its own structure, as :meth:`search` does).
        """
        queries = self._check_queries(queries)
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 2 or len(positions) != len(queries):
            raise ValueError(f"positions: expected shape ({len(queries)}, m), got {positions.shape}")
        k = min(k, len(self))
        exact_top = self.factory == "Flat"
        valid = positions >= 0
        ranks = np.zeros(positions.shape, dtype=np.int64)
        top_scores = np.empty((len(queries), k if exact_top else 0), dtype=np.float32)
        top_pos = np.empty((len(queries), k if exact_top else 0), dtype=np.int64)
        for sl, block in self._score_blocks(queries):
            pos, ok = positions[sl], valid[sl]
            if pos.shape[1]:
                ranks[sl] = np.where(ok, _count_at_least(block, self._tie_thresholds(queries[sl], block, pos)), 0)
            if exact_top and k:
                top_pos[sl], top_scores[sl] = _top_k(block, k)
        if not exact_top and k:
            top_scores, top_pos = self.search(queries, k)
        return ranks, top_scores, top_pos

    def rows_at_least(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Unique rows scoring at least as high as (or tied with) the weakest given row of some query.

        These are the rows that decide the given rows' ranks; refresh policies
        keep them from going too stale.
        """
        queries = self._check_queries(queries)
        positions = np.asarray(positions, dtype=np.int64)
        found = [np.empty(0, dtype=np.int64)]
        for sl, block in self._score_blocks(queries):
            pos = positions[sl]
            if pos.shape[1]:
                thr = self._tie_thresholds(queries[sl], block, pos).min(axis=1, keepdims=True)
                found.append(np.unique(np.flatnonzero(block >= thr) % len(self)))
        return np.unique(np.concatenate(found))

    def _score_blocks(self, queries: np.ndarray):
        """(query slice, (b, n_docs) scores) in blocks of at most _BLOCK_FLOATS floats.

        Every block is written into one reused buffer (a fresh array per block
        costs page faults comparable to the product itself), so a block is
        only valid until the next one is produced.
        """
        step = max(1, min(len(queries), _BLOCK_FLOATS // len(self)))
        buf = np.empty((step, len(self)), dtype=np.float32)
        emb_t = self._emb.T
        for start in range(0, len(queries), step):
            sl = slice(start, start + step)
            block = buf[: len(queries[sl])]
            np.matmul(queries[sl], emb_t, out=block)
            yield sl, block

    def _tie_thresholds(self, queries: np.ndarray, block: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Scores of the given rows lowered by the float32 rounding margin (inf where padded).

        A float32 matrix product may round two identical documents differently
        depending on where they sit in the matrix; anything within
        ``TIE_RTOL * |q| * |d|`` of a given row's score counts as tied, and so
        as ranked above it.
        """
        safe = np.maximum(pos, 0)
        scores = np.take_along_axis(block, safe, axis=1)  # (b, m)
        margin = TIE_RTOL * np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(self._emb[safe], axis=2)
        return np.where(pos >= 0, scores - margin, np.inf)

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
        """Write the index to one file atomically: a crash leaves the previous file intact.

        The checksum covers the arrays *and* every manifest field, so an edited
        fingerprint or dim is caught as surely as a flipped embedding byte.
        """
        data, _ = self._file_bytes()
        with atomic_write(path) as f:
            f.write(data)
        return Path(path)

    @classmethod
    def load(
        cls, path: str | Path, *, corpus_fingerprint: str | None = None, dim: int | None = None
    ) -> "CorpusIndex":
        """Read a saved index, refusing a truncated, tampered or mismatched file with the reason."""
        path = Path(path)
        remove_stale_temporaries(path)  # what saves killed mid-write left beside it
        if not path.is_file():
            raise IndexFileError(f"{path}: no such index file")
        try:
            manifest, arrays = _read_index_file(path)
        except Exception as err:  # numpy, zipfile and json raise many types for a damaged file
            raise IndexFileError(f"{path}: unreadable or truncated index file ({type(err).__name__}: {err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise IndexFileError(f"{path}: format {found!r}, expected a {FORMAT} file")
        if _checksum(arrays, manifest) != manifest.get("sha256"):
            raise IndexFileError(f"{path}: checksum mismatch, the file was modified or corrupted")
        if corpus_fingerprint is not None and manifest["corpus_fingerprint"] != corpus_fingerprint:
            raise IndexFileError(
                f"{path}: built for corpus {manifest['corpus_fingerprint']!r:.20}, not this dataset's "
                f"{corpus_fingerprint!r:.20}"
            )
        stored_dim = arrays["embeddings"].shape[1] if arrays["embeddings"].ndim == 2 else None
        if dim is not None and stored_dim != dim:
            raise IndexFileError(f"{path}: embeddings have dim {stored_dim}, expected {dim}")
        index = cls(
            arrays["doc_ids"].tolist(),
            arrays["embeddings"],
            arrays["versions"],
            factory=manifest["factory"],
            encoder_name=manifest["encoder_name"],
            corpus_fingerprint=manifest["corpus_fingerprint"],
        )
        index.index_version = manifest["index_version"]
        index._source = (str(path.resolve()), manifest["sha256"])
        return index

    def save_incremental(self, folder: str | Path, name: str, *, compact_above: float = COMPACT_ABOVE) -> Path:
        """Checkpoint the index as ``folder/<name>.json``, writing only the rows changed since its last checkpoint.

        The manifest names an immutable *base* segment (a whole index, in the file format :meth:`load` reads)
        and the ordered *delta* segments (positions, embeddings and versions of changed rows) that turn it into
        this index, with every segment's checksum and size. Segments are named by their checksum, so manifests
        share them. A save extends the segments of the manifest this index was last saved to or loaded from in
        ``folder`` with one delta of the rows changed since (none when nothing changed). It writes a new base
        instead when there is nothing to extend (first save, another folder, a replaced index, pruned
        segments), when rows were added, or when the deltas would exceed ``compact_above`` times the base's
        bytes: past that a load reads more delta than base, and rewriting the base costs less than the deltas
        already written.

        Every file is written atomically and the manifest last, so a crash at any moment leaves every earlier
        manifest loadable; segments a killed save wrote and no manifest names go with :func:`prune_segments`.
        """
        folder, target = Path(folder), _manifest_path(folder, name)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(folder)
        segments, why = self._segments_to_extend(folder, compact_above)
        if segments is None:
            log.info("%s: writing a new base segment: %s", target, why)
            segments = [_write_segment(folder, "base", *self._file_bytes())]
        elif self._segments.dirty.any():
            segments.append(_write_segment(folder, "delta", *self._delta_bytes(segments[-1])))
        manifest = self.manifest() | {"format": MANIFEST_FORMAT, "segments": segments}
        manifest["sha256"] = _checksum({}, manifest)
        with atomic_write(target, "w") as f:
            json.dump(manifest, f, indent=1)
        self._segments = _Segments(folder.resolve(), segments, np.zeros(len(self), dtype=bool))
        return target

    def _segments_to_extend(self, folder: Path, compact_above: float) -> tuple[list[dict] | None, str]:
        """The segments a new delta can go on top of (a copy of the list), or None and why a base is due."""
        seg = self._segments
        if seg is None:
            return None, "no earlier checkpoint of this index to build on"
        if seg.folder != folder.resolve():
            return None, f"its earlier segments are in {seg.folder}"
        if seg.grown:
            return None, "rows were added since its last checkpoint"
        gone = [s["file"] for s in seg.files if _size(folder / s["file"]) != s["bytes"]]
        if gone:
            return None, f"segment {gone[0]} is gone or changed"
        base = seg.files[0]["bytes"]
        deltas = sum(s["bytes"] for s in seg.files[1:]) + int(seg.dirty.sum()) * (self._emb.itemsize * self.dim + 16)
        if deltas > compact_above * base:
            return None, f"deltas would reach {deltas / base:.0%} of the base (compaction above {compact_above:.0%})"
        return list(seg.files), ""

    def _file_bytes(self) -> tuple[memoryview, str]:
        """This index as one file of the format :meth:`load` reads, and its checksum."""
        arrays = self._arrays()
        manifest = self.manifest()
        manifest["sha256"] = _checksum(arrays, manifest)
        buf = io.BytesIO()
        np.savez(buf, manifest=np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8), **arrays)
        return buf.getbuffer(), manifest["sha256"]

    def _delta_bytes(self, parent: dict) -> tuple[memoryview, str]:
        """A delta segment of the rows changed since ``parent`` (the last segment), and its checksum."""
        rows = np.flatnonzero(self._segments.dirty)
        arrays = {"positions": rows, "embeddings": self._emb[rows], "versions": self._versions[rows]}
        header = {"format": DELTA_FORMAT, "parent": parent["file"], "parent_sha256": parent["sha256"],
                  "dim": self.dim, "rows": len(self)}
        header["sha256"] = _checksum(arrays, header)
        buf = io.BytesIO()
        np.savez(buf, manifest=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
        return buf.getbuffer(), header["sha256"]

    @classmethod
    def load_incremental(
        cls, path: str | Path, *, corpus_fingerprint: str | None = None, dim: int | None = None
    ) -> "CorpusIndex":
        """Read a manifest written by :meth:`save_incremental`: its base, then its deltas in order.

        Refuses, naming the file and why, a manifest or segment that is missing, truncated, tampered with
        (every checksum is verified), out of order, or built for another corpus or dim. The loaded index
        remembers its segments, so its next :meth:`save_incremental` into the same folder writes a delta.
        """
        path = Path(path)
        remove_stale_temporaries(path)
        _remove_dead_temporaries(path.parent)
        manifest = _read_manifest(path)
        if corpus_fingerprint is not None and manifest["corpus_fingerprint"] != corpus_fingerprint:
            raise IndexFileError(
                f"{path}: built for corpus {manifest['corpus_fingerprint']!r:.20}, not this dataset's "
                f"{corpus_fingerprint!r:.20}"
            )
        if dim is not None and manifest["dim"] != dim:
            raise IndexFileError(f"{path}: embeddings have dim {manifest['dim']}, expected {dim}")
        files = manifest["segments"]
        _, base = _read_segment(path, files[0], FORMAT)
        emb, versions = base["embeddings"], base["versions"]
        for parent, entry in itertools.pairwise(files):
            header, delta = _read_segment(path, entry, DELTA_FORMAT)
            where = path.parent / entry["file"]
            if header["parent"] != parent["file"]:
                raise IndexFileError(f"{where}: a delta on {header['parent']}, but {path} puts it on {parent['file']}")
            pos = delta["positions"]
            if header["rows"] != len(emb) or (len(pos) and (pos.min() < 0 or pos.max() >= len(emb))):
                raise IndexFileError(f"{where}: rows outside the {len(emb)} rows of {files[0]['file']}")
            emb[pos], versions[pos] = delta["embeddings"], delta["versions"]
        index = cls(
            base["doc_ids"].tolist(),
            emb,
            versions,
            factory=manifest["factory"],
            encoder_name=manifest["encoder_name"],
            corpus_fingerprint=manifest["corpus_fingerprint"],
        )
        if (len(index), index.dim) != (manifest["rows"], manifest["dim"]):
            raise IndexFileError(f"{path}: its segments hold {len(index)} x {index.dim}, the manifest says "
                                 f"{manifest['rows']} x {manifest['dim']}")
        index.index_version = manifest["index_version"]
        index._segments = _Segments(path.parent.resolve(), files, np.zeros(len(index), dtype=bool))
        return index

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """Everything but FAISS objects (rebuilt on demand); an index still equal to its file keeps only its path.

        Workers (Ray, multiprocessing) then reopen the file instead of receiving
        a copy of the embedding matrix; an index changed since it was loaded
        pickles its arrays.
        """
        state = self.__dict__ | {"_ann": None, "_ann_synced": False, "_gpu_res": None}
        if self._source is not None:
            for name in _FILE_ARRAYS:
                del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_emb" in state:
            return
        path, checksum = self._source
        try:
            saved = CorpusIndex.load(path)
        except IndexFileError as err:
            raise IndexFileError(f"cannot restore a pickled index from its file: {err}") from None
        if saved._source[1] != checksum:
            raise IndexFileError(
                f"{path}: the file changed since this index was pickled (checksum {checksum[:12]}..., now "
                f"{saved._source[1][:12]}...); pickle the index again, or load the new file"
            )
        for name in _FILE_ARRAYS:
            setattr(self, name, getattr(saved, name))

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


def _read_index_file(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        manifest = json.loads(bytes(z["manifest"]).decode())
        return manifest, {name: z[name] for name in ("doc_ids", "embeddings", "versions")}


def _checksum(arrays: dict[str, np.ndarray], manifest: dict) -> str:
    """sha256 over the manifest (all but its own checksum) and every array's dtype, shape and bytes."""
    fields = {k: v for k, v in manifest.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _top_k(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of each row's ``k`` best entries, by score descending, then position ascending.

    A partial sort alone (``argpartition``) picks and orders tied entries arbitrarily, so the same scores
    could list different documents: every entry tied with the k-th best is a candidate, and the order
    among equal scores is the index position.
    """
    n = block.shape[1]
    kth = np.partition(block, n - k, axis=1)[:, n - k]  # (b,) each row's k-th largest score
    positions = np.empty((len(block), k), dtype=np.int64)
    scores = np.empty((len(block), k), dtype=block.dtype)
    for i, row in enumerate(block):
        candidates = np.flatnonzero(row >= kth[i])
        best = candidates[np.lexsort((candidates, -row[candidates]))[:k]]
        positions[i], scores[i] = best, row[best]
    return positions, scores


@dataclass
class _Segments:
    """The segments (base, then deltas) an index extends, with the rows changed since the last of them."""

    folder: Path  # resolved: where the segments are
    files: list[dict]  # manifest entries {"file", "sha256", "bytes"}
    dirty: np.ndarray  # (rows,) bool: changed since the last segment
    grown: bool = False  # rows were added since: the next save writes a new base

    def note(self, rows: np.ndarray, added: bool) -> None:
        if added:
            self.grown = True
        else:
            self.dirty[rows] = True


def prune_segments(folder: str | Path, keep: Iterable[str | Path]) -> list[Path]:
    """Delete the manifests in ``folder`` not named in ``keep``, then every segment no kept manifest names.

    ``keep`` holds manifest names (``step-000010`` or ``step-000010.json``) or paths; a kept name without a
    manifest is ignored (e.g. a checkpoint saved without an index). Manifests go before segments, so a crash
    mid-prune never leaves a manifest without its segments. If a kept manifest cannot be read, no segment is
    deleted (it cannot say which it needs). Not for a folder that another process is saving into: its new
    segments are not yet named by any manifest. Returns what was deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    _remove_dead_temporaries(folder)
    kept = {_manifest_path(folder, Path(k).name) for k in keep}
    removed = []
    for path in sorted(folder.glob("*.json")):
        if path not in kept:
            try:
                is_manifest = json.loads(path.read_text()).get("format") == MANIFEST_FORMAT
            except (OSError, ValueError, AttributeError):
                is_manifest = False
            if not is_manifest:
                log.warning("prune_segments: %s is not an index manifest, left alone", path)
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    needed = set()
    for path in kept:
        if path.is_file():
            try:
                needed.update(entry["file"] for entry in _read_manifest(path)["segments"])
            except IndexFileError as err:
                log.warning("prune_segments: deleting no segment, a kept manifest is unreadable: %s", err)
                return removed
    for path in sorted(folder.iterdir()):
        if _SEGMENT.fullmatch(path.name) and path.name not in needed:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _manifest_path(folder: str | Path, name: str) -> Path:
    name = name.removesuffix(".json")
    if not name or name.startswith(".") or Path(name).name != name:
        raise ValueError(f"manifest name {name!r}: expected a plain file name")
    return Path(folder) / f"{name}.json"


def _write_segment(folder: Path, kind: str, data: memoryview, checksum: str) -> dict:
    """Write a segment named by its checksum (atomically: an existing one has the same bytes); its manifest entry."""
    name = f"{kind}-{checksum[:32]}.npz"
    with atomic_write(folder / name) as f:
        f.write(data)
    return {"file": name, "sha256": checksum, "bytes": len(data)}


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise IndexFileError(f"{path}: no such index manifest")
    try:
        manifest = json.loads(path.read_text())
        segments = manifest["segments"]
        if not segments or not all(isinstance(s["file"], str) and _SEGMENT.fullmatch(s["file"]) for s in segments):
            raise ValueError(f"segments {segments!r:.80}")
    except Exception as err:  # json, or a manifest of another shape
        raise IndexFileError(f"{path}: unreadable or truncated index manifest ({type(err).__name__}: {err})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise IndexFileError(f"{path}: format {manifest.get('format')!r}, expected a {MANIFEST_FORMAT} manifest")
    if _checksum({}, manifest) != manifest.get("sha256"):
        raise IndexFileError(f"{path}: checksum mismatch, the manifest was modified or corrupted")
    return manifest


def _read_segment(manifest_path: Path, entry: dict, fmt: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A segment's header and arrays, refused (naming the file) unless its checksum is the manifest's."""
    path = manifest_path.parent / entry["file"]
    if not path.is_file():
        raise IndexFileError(f"{path}: segment missing (named by {manifest_path}); deleted or never written")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["manifest"]).decode())
            arrays = {name: z[name] for name in z.files if name != "manifest"}
    except Exception as err:  # numpy, zipfile and json raise many types for a damaged file
        raise IndexFileError(f"{path}: unreadable or truncated segment ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise IndexFileError(f"{path}: format {header.get('format') if isinstance(header, dict) else header!r}, "
                             f"expected a {fmt} segment")
    if not header.get("sha256") == entry["sha256"] == _checksum(arrays, header):
        raise IndexFileError(f"{path}: checksum mismatch, the segment was modified or corrupted")
    return header, arrays


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _remove_dead_temporaries(folder: Path) -> None:
    """What killed saves left in a segment folder: each file's temporaries whose writer is gone."""
    try:
        names = {m[1] for e in os.scandir(folder) if (m := _TEMPORARY.match(e.name))}
    except OSError:
        return
    for name in names:
        remove_stale_temporaries(folder / name)


def _count_at_least(block: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """counts[i, j] = number of entries of block[i] >= thr[i, j]; thr is inf where padded.

    A trained agent scores its relevant documents near the top, so one
    comparison against each row's weakest threshold leaves few candidates, and
    the per-threshold counts are taken over those alone (flat indices: numpy's
    1-D nonzero is an order of magnitude faster than the 2-D one). When most of
    the block are candidates (an untrained agent), one counting pass per
    threshold is cheaper.
    """
    n_rows, n_cols = block.shape
    mask = block >= thr.min(axis=1, keepdims=True)
    flat = np.flatnonzero(mask)
    if len(flat) * thr.shape[1] > block.size:
        return np.stack([np.count_nonzero(block >= thr[:, j : j + 1], axis=1) for j in range(thr.shape[1])], 1)
    rows = flat // n_cols
    ge = block.ravel()[flat][:, None] >= thr[rows]  # (candidates, m)
    return np.stack([np.bincount(rows, ge[:, j], minlength=n_rows) for j in range(thr.shape[1])], 1).astype(np.int64)


def load_or_build_index(dataset, encoder: Encoder, cache_dir: str | Path, *, progress: bool = True) -> CorpusIndex:
    """The cached index of ``dataset`` under ``encoder`` if one is saved, else build and save it.

    The file is named by the corpus fingerprint and the encoder's ``cache_key``
    (what produced its rows: weights, tokenizer, dtype, prompt, truncation; see
    :mod:`searchr3_env.cache_keys`), dim and version, so another corpus or
    another model never reuses a file; a corrupt file is reported and rebuilt.
    An encoder without a ``cache_key`` (or whose key is None, e.g. while it
    trains) cannot say what produced its rows: its index is built, never cached.
    """
    key = getattr(encoder, "cache_key", None)
    if key is None:
        log.info("encoder %r has no cache_key: its corpus index is built, not cached", encoder.name)
        return CorpusIndex.build(dataset, encoder, progress=progress)
    path = Path(cache_dir) / (
        f"{sanitise(dataset.name)}-{dataset.corpus_fingerprint[:16]}-{sanitise(encoder.name)}-{key[:16]}-"
        f"{encoder.dim}d-v{encoder.version}.npz"
    )
    if path.is_file():
        try:
            return CorpusIndex.load(path, corpus_fingerprint=dataset.corpus_fingerprint, dim=encoder.dim)
        except IndexFileError as err:
            log.warning("rebuilding the cached index: %s", err)
    index = CorpusIndex.build(dataset, encoder, progress=progress)
    index.save(path)
    return index

"""The versioned corpus: documents, their encoder and the index of their embeddings, shared by whoever scores them.

A refresh re-encodes rows of the corpus and a full refresh swaps in a whole new
index; every task scoring against the corpus (a training split and its
validation split, the sub-envs of one ``make_vec``) sees both, because they
hold the corpus, not the index. :meth:`Corpus.shared` hands out one corpus per
specification (documents, encoder, index, refresh policy), so the sub-envs a
vector env builds from one spec keep one copy of the rows and texts.

The texts kept for refreshes sit in one UTF-8 buffer with offsets
(:class:`DocumentTexts`): a Python string per document costs about 50 bytes of
header and a list slot on top of its characters.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from .dataset import RetrievalDataset
from .encoders import Encoder, HashingEncoder
from .index import CorpusIndex
from .refresh import RefreshReport, get_policy

log = logging.getLogger(__name__)

IndexLike = CorpusIndex | str | Path | None


class DocumentTexts(Sequence[str]):
    """Document texts as one UTF-8 buffer and row offsets: a read-only sequence of strings, by row."""

    def __init__(self, texts: Sequence[str]):
        encoded = [t.encode("utf-8") for t in texts]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row):
        if isinstance(row, slice):
            return self.take(range(*row.indices(len(self))))
        row = int(row) + (len(self) if row < 0 else 0)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} documents")
        return self.buffer[self.offsets[row] : self.offsets[row + 1]].decode("utf-8")

    def take(self, rows: Sequence[int]) -> list[str]:
        return [self[int(r)] for r in rows]

    @property
    def nbytes(self) -> int:
        return len(self.buffer) + self.offsets.nbytes


def default_document_encoder(dataset: RetrievalDataset) -> HashingEncoder:
    return HashingEncoder().fit(dataset.document_texts())


class Corpus:
    """A collection's documents, the document encoder, and the versioned index of their embeddings.

    Args:
        dataset: the collection (only its documents are kept; queries belong to the tasks).
        encoder: the document encoder (encoder protocol); default a ``HashingEncoder`` fitted to the documents.
        index: a ``CorpusIndex``, a saved index path, or None to encode the documents now.
        refresh: how stale rows are re-encoded: ``"local"`` (default), ``"full"``, ``"frozen"`` or a policy object.
    """

    _shared: "weakref.WeakValueDictionary[tuple, Corpus]" = weakref.WeakValueDictionary()

    def __init__(self, dataset: RetrievalDataset, encoder: Encoder | None = None, index: IndexLike = None,
                 refresh="local", progress: bool = False):
        self.name = dataset.name
        self.fingerprint = dataset.corpus_fingerprint
        self.encoder = encoder if encoder is not None else default_document_encoder(dataset)
        self.index = self._resolve_index(index, dataset, progress)
        self.texts = DocumentTexts(dataset.document_texts(self.index.doc_ids))  # aligned with index rows
        self.refresh = get_policy(refresh)

    @classmethod
    def shared(cls, dataset: RetrievalDataset, encoder: Encoder | None = None, index: IndexLike = None,
               refresh="local", progress: bool = False) -> "Corpus":
        """The live corpus of this specification if there is one (the same documents, encoder, index and policy
        objects), else a new one: what the sub-envs of one vector env share."""
        key = (dataset.corpus_fingerprint, _identity(encoder), _identity(index), _identity(refresh))
        corpus = cls._shared.get(key)
        if corpus is None:
            corpus = cls._shared[key] = cls(dataset, encoder, index, refresh, progress)
        return corpus

    def _resolve_index(self, index: IndexLike, dataset: RetrievalDataset, progress: bool) -> CorpusIndex:
        if index is None:
            return CorpusIndex.build(dataset, self.encoder, progress=progress)
        if not isinstance(index, CorpusIndex):
            index = CorpusIndex.load(index, corpus_fingerprint=self.fingerprint, dim=self.encoder.dim)
        if index.dim != self.encoder.dim:
            raise ValueError(f"index has dim {index.dim} but the document encoder has dim {self.encoder.dim}")
        if index.encoder_name not in ("unknown", self.encoder.name):
            raise ValueError(f"index rows were written by encoder {index.encoder_name!r}, not by {self.encoder.name!r}")
        if index.corpus_fingerprint not in (None, self.fingerprint):
            raise ValueError("index was built for another corpus (fingerprint mismatch)")
        stale = len(index.stale_rows(self.encoder.version))
        if stale:
            log.warning("index is stale: %d of %d rows were written before encoder version %d; the refresh policy "
                        "decides which are re-encoded", stale, len(index), self.encoder.version)
        return index

    @property
    def dim(self) -> int:
        return self.index.dim

    def prepare(self, rel_positions: np.ndarray, queries: np.ndarray) -> RefreshReport:
        """Let the refresh policy re-encode what a batch's rewards depend on, before it is scored."""
        return self.refresh.prepare(self, rel_positions, queries)

    def swap(self, index: CorpusIndex) -> None:
        """Replace the whole index (a full refresh): every task of this corpus scores against it from now on."""
        if index.doc_ids != self.index.doc_ids:
            raise ValueError("a swapped-in index must hold the same documents in the same rows")
        self.index = index

    def save_state(self, folder: str | Path, name: str) -> Path:
        """Checkpoint what rewards depend on beyond the encoder's weights, the rows and their versions, as
        ``folder/<name>.json``: only the rows changed since the last checkpoint in ``folder`` are written (a delta
        segment over an immutable base; :meth:`CorpusIndex.save_incremental`). Rotate with
        :func:`searchr3_env.index.prune_segments`."""
        return self.index.save_incremental(folder, name)

    def load_state(self, path: str | Path) -> None:
        """Restore rows and versions from a :meth:`save_state` manifest, or from a single-file index (``.npz``,
        as runs saved before incremental checkpoints): a resumed run scores as the killed one did."""
        read = CorpusIndex.load if Path(path).suffix == ".npz" else CorpusIndex.load_incremental
        self.swap(read(path, corpus_fingerprint=self.fingerprint, dim=self.dim))

    def memory(self) -> dict[str, int]:
        """Bytes held per part: rows, versions, document ids, the id-to-row dict, texts."""
        return self.index.memory() | {"texts": self.texts.nbytes}

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, documents={len(self.texts)}, encoder={self.encoder.name!r}, {self.index!r})"


def _identity(obj) -> object:
    """What names an argument in a sharing key: a path or a policy name as is, an object by identity."""
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj.resolve())
    return id(obj)  # the shared corpus holds the object, so its id cannot be reused while the entry lives

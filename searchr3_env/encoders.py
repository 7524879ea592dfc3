"""The encoder protocol, and the dependency-free hashing encoder the env uses by default.

An encoder is anything with ``name``, ``dim``, ``version`` and two methods
returning float32, L2-normalised ``(n, dim)`` arrays. ``version`` is an integer
that grows whenever the encoder's weights change: the corpus index records it
per row, and that is how the env knows which cached document embeddings are
stale. The LLM agent, the MiniLM baseline and the hashing encoder all follow it.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int
    version: int

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...


def scale_rows(x: np.ndarray) -> np.ndarray:
    """Each row times the power of two that brings its largest ``|entry|`` into [0.5, 1); zero rows stay zero.

    Only exponents change, so the result is exact and an ordinary row normalises
    to the very same bits as before, but a row around 1e-30 or 1e30 no longer
    underflows or overflows its sum of squares. float16 is widened to float32.
    """
    x = np.asarray(x)
    x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    _, exponent = np.frexp(np.abs(x).max(axis=1, keepdims=True))
    return np.ldexp(x, -exponent)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-normalise to unit length as float32, whatever the rows' scale; all-zero rows stay zero.

    An empty text has no direction. Rows are first brought to a safe scale
    (:func:`scale_rows`), so ``c * x`` normalises like ``x`` for tiny and huge ``c``.
    """
    x = scale_rows(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def check_embeddings(x: np.ndarray, dim: int, what: str = "embeddings") -> np.ndarray:
    """Validate an (n, dim) float array of finite values, returning it as contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what}: expected shape (n, {dim}), got {x.shape} ({x.dtype})")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: expected a float array, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"{what}: row {bad} contains NaN or inf")
    return np.ascontiguousarray(x, dtype=np.float32)


_TOKEN = re.compile(r"[a-z0-9]+")
# Lucene's English stop set, as in the reference BM25 baselines of shared/data.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split()
)


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


class HashingEncoder:
    """BM25 bag of words, feature-hashed to ``dim - 1`` signed buckets, unit-norm without losing BM25's order.

    Why hashing: it needs no vocabulary, no model and no download, so the env
    works anywhere, and a document's vector depends only on its own text plus
    corpus statistics (idf, average length, largest norm) fitted once with
    :meth:`fit`. Documents get BM25 term weights (idf, ``k1``, ``b``), queries
    their log term frequencies, so the inner product is BM25 up to hash collisions.

    The protocol wants unit vectors, and dividing each document by its own norm
    would change BM25's ranking (measured: nDCG@10 on NPL drops from 0.38 to
    0.22). So documents are divided by the corpus's largest norm ``M`` instead
    and the last coordinate takes up the slack, ``sqrt(1 - |w|^2 / M^2)``; queries
    have 0 there. Inner products are BM25 / M: same order, unit vectors (the
    MIPS-to-cosine reduction of Bachrach et al., 2014). Unfitted, every idf is
    1, lengths are not normalised and documents are simply L2-normalised.
    Its weights never change after fitting, so ``version`` stays 0.
    """

    name = "hashing"

    def __init__(self, dim: int = 4096, k1: float = 0.9, b: float = 0.4):
        if dim < 2:
            raise ValueError(f"dim must be at least 2, got {dim}")
        self.dim = dim
        self.k1 = k1
        self.b = b
        self.version = 0
        self.idf: np.ndarray | None = None  # per bucket, set by fit()
        self.avg_len: float | None = None
        self.max_norm: float | None = None
        self._bucket_cache: dict[str, tuple[int, float]] = {}

    def _bucket(self, token: str) -> tuple[int, float]:
        hit = self._bucket_cache.get(token)
        if hit is None:
            h = zlib.crc32(token.encode("utf-8"))
            hit = (h % (self.dim - 1), 1.0 if (h >> 31) & 1 else -1.0)
            self._bucket_cache[token] = hit
        return hit

    def fit(self, documents: Sequence[str]) -> "HashingEncoder":
        """Learn per-bucket idf, the average length and the largest BM25 vector norm; returns self."""
        df = np.zeros(self.dim, dtype=np.float64)
        total_len = 0
        for text in documents:
            tokens = tokenize(text)
            total_len += len(tokens)
            for token in set(tokens):
                df[self._bucket(token)[0]] += 1
        n = max(len(documents), 1)
        self.idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)
        self.idf[-1] = 0.0
        self.avg_len = max(total_len / n, 1.0)
        norms = np.linalg.norm(self._bm25(documents), axis=1)
        self.max_norm = float(norms.max()) if norms.size and norms.max() > 0 else 1.0
        return self

    def _bm25(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            tokens = tokenize(text)
            norm = 1.0 - self.b + self.b * len(tokens) / (self.avg_len or max(len(tokens), 1))
            for token, tf in Counter(tokens).items():
                bucket, sign = self._bucket(token)
                out[row, bucket] += sign * tf * (self.k1 + 1) / (tf + self.k1 * norm)
        if self.idf is not None:
            out *= self.idf
        return out

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        weights = self._bm25(texts)
        if self.max_norm is None:
            return l2_normalise(weights)
        norms = np.linalg.norm(weights, axis=1)
        # A document longer than any seen in fit() cannot be placed exactly: clip it to unit length.
        scale = np.maximum(self.max_norm, norms)
        out = weights / scale[:, None]
        out[:, -1] = np.sqrt(np.clip(1.0 - (norms / scale) ** 2, 0.0, None))
        return out.astype(np.float32, copy=False)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token, tf in Counter(tokenize(text)).items():
                bucket, sign = self._bucket(token)
                out[row, bucket] += sign * (1.0 + math.log(tf))
        return l2_normalise(out)

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self.dim}, fitted={self.idf is not None})"

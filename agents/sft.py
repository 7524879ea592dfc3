"""SFT warm-up of the LLM embedder: losses, one step, the run.

Loss per micro-batch of B training queries, each with one positive document and
H hard negatives mined from a corpus index of the env::

    w_lm * LM cross-entropy on the query's response tokens ("... The embedding is <|embed_token|>")
  + w_kl * KL(model || frozen base) on those same positions
  + w_nce * InfoNCE(query, [all positives of the batch; all hard negatives]) at ``nce_temperature``
  + w_triplet * triplet margin (query, its positive, each of its hard negatives)

Documents are embedded by the model being trained (``train_documents``) or
frozen: rows of the base model's cached corpus index, so only the query side
learns and a step costs a few short query passes (the CPU default).

Reasoning (``reasoning_tokens`` > 0) is self-taught, STaR-style, with the
retrieval loss as the judge (there is no teacher to distil from): per query
the model samples K reasonings, each cut back to its last finished sentence,
and the one (or the empty one) whose embedding gives the lowest InfoNCE is what
the LM loss trains and the contrastive terms embed, so the model learns to
reason where it helps retrieval and to end with the embed token by itself.

A run can start from an earlier SFT checkpoint (``init``); its negatives then
come from that checkpoint's own index, as in ANCE's rounds of re-mined
negatives. Training queries come from :mod:`agents.queries`, the model from
:mod:`agents.policy`, the loop from :mod:`agents.run_loop`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from searchr3_env.dataset import RetrievalDataset
from searchr3_env.encoders import HashingEncoder
from searchr3_env.evaluation import evaluate_agent
from searchr3_env.index import CorpusIndex, load_or_build_index
from searchr3_env.task import RetrievalTask, resolve_dataset

from .checkpoint import load_weights, resolve_checkpoint, resumable_checkpoint
from .config import SFTConfig
from .embedder import LLMEmbedder, reference_logits
from .layout import Layout, read_layout
from .losses import info_nce, kl_to_reference, lm_cross_entropy, triplet_margin
from .policy import build_embedder, build_optimizer, cosine_schedule, load_agent, make_trainable, model_tag
from .queries import TrainQuery, rerank_pool, split_train_queries, training_queries
from .rollouts import sample_rollouts
from .run_loop import Hooks, Trainee, Validation, run

log = logging.getLogger(__name__)
SPT_CALIBRATION_DOCS = 64  # evenly spaced corpus documents that calibrate a freshly SPT-patched model


# ---------------------------------------------------------------------------------------------- data
def base_index(cfg: SFTConfig, dataset: RetrievalDataset, embedder: LLMEmbedder) -> CorpusIndex:
    """The untrained embedder's corpus index, cached on disk (``searchr3 eval`` of the base model reuses it)."""
    return load_or_build_index(dataset, embedder, cfg.cache_dir, progress=cfg.progress)


def mining_index(cfg: SFTConfig, dataset: RetrievalDataset, embedder: LLMEmbedder, doc_index: CorpusIndex | None):
    """(query encoder, corpus index) that mines hard negatives.

    With ``init``, "model" means the init checkpoint itself (its corpus index is
    cached by ``searchr3 eval``): the next round's negatives are the documents the
    trained model still ranks too high, as in ANCE, which the base model's or
    BM25's negatives stopped being once the model learned to separate them.
    """
    if cfg.negatives == "hashing":
        encoder = HashingEncoder().fit(dataset.document_texts())
        return encoder, CorpusIndex.build(dataset, encoder, progress=False)
    if cfg.init:
        queries, documents = load_agent(cfg.init, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir)
        return queries, load_or_build_index(dataset, documents, cfg.cache_dir, progress=cfg.progress)
    return embedder, doc_index if doc_index is not None else base_index(cfg, dataset, embedder)


def sample_batch(queries: list[TrainQuery], cfg: SFTConfig, step: int, micro: int):
    """B distinct queries, one positive each and H hard negatives each, from a (seed, step, micro) generator."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    chosen = [queries[i] for i in rng.choice(len(queries), size=min(cfg.batch_size, len(queries)), replace=False)]
    positives = [q.positives[rng.integers(len(q.positives))] for q in chosen]
    negatives = [[q.negatives[j] for j in rng.choice(len(q.negatives), cfg.hard_negatives, replace=False)]
                 for q in chosen]
    return chosen, positives, negatives


# ---------------------------------------------------------------------------------------------- losses
def response_positions(starts: Sequence[int], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions whose next token is a response token (cols + 1 are the targets)."""
    rows, cols = [], []
    for i, (start, length) in enumerate(zip(starts, lengths.tolist())):
        rows += [i] * (length - start)
        cols += range(start - 1, length - 1)
    return torch.tensor(rows, device=lengths.device), torch.tensor(cols, device=lengths.device)


def finished_thought(tokens: list[int], tokenizer, embed_id: int) -> list[int]:
    """A sampled reasoning cut back to its last finished sentence (all of it if the model emitted the embed token).

    A reasoning the budget cut off mid-sentence would teach the model to stop
    mid-thought; a reasoning with no finished sentence becomes empty.
    """
    if tokens and tokens[-1] == embed_id:
        return tokens
    for end in range(len(tokens), 0, -1):
        piece = tokenizer.decode(tokens[end - 1 : end])
        if "\n" in piece or piece.rstrip().endswith((".", "!", "?")):
            return tokens[:end]
    return []


def choose_reasoning(embedder: LLMEmbedder, cfg: SFTConfig, texts: Sequence[str], documents: torch.Tensor,
                     exclude: torch.Tensor, seed: int) -> tuple[list[list[int]], dict]:
    """Per query, the best-retrieving of K sampled reasonings and the empty one (see the module docstring).

    ``documents`` (C, d) and ``exclude`` (B, C) are the batch's candidates, positive
    i of query i first. Returns the chosen reasonings and their statistics.
    """
    k = cfg.reasoning_samples
    torch.manual_seed(seed)  # the samples of step t, micro-batch m: a resumed run draws the same
    rollouts = sample_rollouts(embedder, list(range(len(texts))), texts, k, cfg.reasoning_tokens,
                               cfg.sample_temperature)
    tokenizer = embedder.tokenizer
    options = [[[]] + [finished_thought(r, tokenizer, embedder.embed_id) for r in rollouts.reasoning[i * k : (i + 1) * k]]
               for i in range(len(texts))]  # (B, 1 + K): option 0 is no reasoning
    flat_texts = [t for t in texts for _ in range(k + 1)]
    with torch.no_grad():
        emb = embedder.forward(embedder.query_sequences(flat_texts, [r for row in options for r in row])).embeddings
        own = torch.arange(len(texts), device=emb.device).repeat_interleave(k + 1)
        loss = info_nce(emb, documents, own, cfg.nce_temperature, exclude[own.to(exclude.device)], reduction="none")
    best = loss.view(len(texts), k + 1).argmin(1).tolist()
    chosen = [row[b] for row, b in zip(options, best)]
    stats = {"reasoning_len": float(np.mean([len(r) for r in chosen])),
             "reasoning_kept": float(np.mean([b > 0 for b in best])),
             "embed_emitted": float(rollouts.emitted.mean())}
    return chosen, {key: torch.tensor(value) for key, value in stats.items()}


def batch_losses(embedder: LLMEmbedder, reference, cfg: SFTConfig, dataset: RetrievalDataset, batch,
                 frozen_documents: CorpusIndex | None, reasoning_seed: int = 0) -> dict:
    """Every loss term of one micro-batch (tensors), plus ``loss``, their weighted sum.

    ``frozen_documents``: the index whose rows are the document embeddings, or
    None to embed documents with the model being trained. With
    ``cfg.reasoning_tokens`` the queries carry their chosen reasoning (seeded by
    ``reasoning_seed``) and its statistics join the terms.
    """
    chosen, positives, negatives = batch
    texts = [q.text for q in chosen]
    neg_ids = [d for row in negatives for d in row]
    cand_ids = [d for d, _ in positives] + neg_ids  # (B + B*H) candidates: positives first
    if frozen_documents is None:
        doc_texts = [text for _, text in positives] + dataset.document_texts(neg_ids)
        d_emb = embedder.forward(embedder.document_sequences(doc_texts)).embeddings
    else:
        doc_rows = frozen_documents.embeddings[frozen_documents.positions(cand_ids)]
        d_emb = torch.from_numpy(doc_rows).to(embedder.device)
    b, h = len(chosen), cfg.hard_negatives

    # Other documents judged relevant to query i are not its negatives.
    exclude = torch.tensor([[j != i and c in q.relevant for j, c in enumerate(cand_ids)] for i, q in enumerate(chosen)],
                           device=d_emb.device)
    reasoning, stats = None, {}
    if cfg.reasoning_tokens:
        reasoning, stats = choose_reasoning(embedder, cfg, texts, d_emb.detach(), exclude, reasoning_seed)
    q_fwd = embedder.forward(embedder.query_sequences(texts, reasoning))
    nce = info_nce(q_fwd.embeddings, d_emb, torch.arange(b, device=d_emb.device), cfg.nce_temperature, exclude)
    triplet = triplet_margin(q_fwd.embeddings, d_emb[:b], d_emb[b:].view(b, h, -1), cfg.margin)

    # The LM loss covers the whole response: the chosen reasoning (if any), then "The embedding is <|embed_token|>".
    rows, cols = response_positions(embedder.query_response_starts(texts), q_fwd.lengths)
    head = embedder.model.get_output_embeddings()
    logits = head(q_fwd.hidden[rows, cols])  # (N response tokens, V)
    lm = lm_cross_entropy(logits, q_fwd.input_ids[rows, cols + 1])
    ref_logits = reference_logits(embedder, reference, q_fwd.input_ids, q_fwd.attention_mask, rows, cols)
    kl = kl_to_reference(logits, ref_logits, unknown=embedder.embed_id)  # the base model never saw the embed token
    total = cfg.w_lm * lm + cfg.w_kl * kl + cfg.w_nce * nce + cfg.w_triplet * triplet
    return {"loss": total, "loss_lm": lm, "loss_kl": kl, "loss_nce": nce, "loss_triplet": triplet, **stats}


# ---------------------------------------------------------------------------------------------- the run
ADAPTER_LAYOUT = ("model", "lora", "lora_rank", "lora_alpha", "lora_layers", "train_embed_token", "spt")


# ---------------------------------------------------------------------------------------------- the run
def init_checkpoint(cfg: SFTConfig) -> Path | None:
    """The ``init`` checkpoint, checked to have this run's layout (else its weights cannot load)."""
    if not cfg.init:
        return None
    checkpoint = resolve_checkpoint(cfg.init)
    there, here = read_layout(checkpoint).to_dict(), Layout.of_sft(cfg).to_dict()
    differ = {k: (there[k], here[k]) for k in here if k not in ("max_doc_tokens", "max_query_tokens", "lowercase")
              and there[k] != here[k]}
    if differ:
        raise ValueError(f"--init {cfg.init}: its model/adapter settings differ from this run's "
                         f"({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in differ.items())})")
    return checkpoint


@dataclass
class SFTState:
    """What an SFT step reads and changes."""

    cfg: SFTConfig
    embedder: LLMEmbedder
    reference: torch.nn.Module | None
    queries: list[TrainQuery]
    train_split: RetrievalDataset
    frozen: CorpusIndex | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def sft_step(s: SFTState, step: int) -> dict:
    """One optimiser step over ``grad_accum`` micro-batches; returns its losses, lr, gradient norm and time."""
    cfg, start = s.cfg, time.perf_counter()
    s.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        batch = sample_batch(s.queries, cfg, step, micro)
        reasoning_seed = int(np.random.default_rng([cfg.seed, step, micro, 3]).integers(2**62))
        terms = batch_losses(s.embedder, s.reference, cfg, s.train_split, batch, s.frozen, reasoning_seed)
        (terms["loss"] / cfg.grad_accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm).item()
    s.optimizer.step()
    lr = s.scheduler.get_last_lr()[0]
    s.scheduler.step()
    s.embedder.bump_version()
    return {**sums, "lr": lr, "grad_norm": grad_norm, "step_s": time.perf_counter() - start}


def validation(cfg: SFTConfig, full: RetrievalDataset, train_split: RetrievalDataset, val_ids: list[str],
               embedder: LLMEmbedder, frozen: CorpusIndex | None, miner):
    """(task, None) scoring held-out train queries by full retrieval over the frozen index, or (None, pool) for a
    rerank of a candidate pool when documents train; (None, None) without validation queries."""
    if not val_ids:
        return None, None
    if frozen is not None:  # full retrieval over the frozen index costs only the query passes
        # refresh="frozen": the rows are the base model's and stay valid whatever the query side's version.
        return RetrievalTask(full.subset(f"{full.name}-val", val_ids), embedder, frozen, split="all", top_k=100,
                             refresh="frozen"), None
    return None, rerank_pool(train_split, val_ids, miner, cfg.eval_pool)


def evaluate(embedder: LLMEmbedder, val_task: RetrievalTask | None, val_pool: RetrievalDataset | None):
    """The held-out train queries: full retrieval (frozen documents) or a rerank of their pool; None without any."""
    if val_task is None and val_pool is None:
        return None
    key = "eval_val_ndcg@10"
    if val_task is None:
        index = CorpusIndex.build(val_pool, embedder, progress=False)
        val_task, key = RetrievalTask(val_pool, embedder, index, split="all", top_k=len(index)), "eval_val_rerank_ndcg@10"
    return Validation(key, evaluate_agent(embedder, val_task, progress=False), val_task.dataset, val_task.top_k)


def train(cfg: SFTConfig) -> Path:
    """Run (or resume) SFT; returns the final checkpoint folder."""
    resume_from = resumable_checkpoint(cfg.output_dir, cfg)
    init = init_checkpoint(cfg)
    torch.manual_seed(cfg.seed)

    embedder = build_embedder(cfg)
    full = resolve_dataset(cfg.data)
    train_split = full.split("train")
    train_ids, val_ids = split_train_queries(train_split, cfg.val_queries, cfg.seed)
    frozen = None if cfg.train_documents else base_index(cfg, full, embedder)
    miner = mining_index(cfg, full, embedder, frozen)
    queries = training_queries(train_split, train_ids, miner, min_pairs=cfg.min_pairs, mine_depth=cfg.mine_depth,
                               seed=cfg.seed)
    val_task, val_pool = validation(cfg, full, train_split, val_ids, embedder, frozen, miner)
    del miner  # a hashing index of a large corpus holds hundreds of MB
    calibration_docs = full.doc_ids[:: max(1, len(full.doc_ids) // SPT_CALIBRATION_DOCS)][:SPT_CALIBRATION_DOCS]
    calibrate_on = full.document_texts(calibration_docs) if cfg.spt and init is None else ()
    layout = Layout.of_sft(cfg)
    reference = make_trainable(embedder, layout, gradient_checkpointing=cfg.gradient_checkpointing,
                               calibration_texts=calibrate_on, progress=cfg.progress)
    if init is not None and resume_from is None:
        load_weights(init, embedder.model)  # the KL reference stays the base model
    embedder.name = f"{embedder.name}-training"
    embedder.reasoning_tokens = cfg.reasoning_tokens  # validation reasons (greedily) as the model is trained to

    optimizer = build_optimizer(embedder.model, cfg.lr, cfg.weight_decay, cfg.embed_token_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, cfg.max_steps))
    state = SFTState(cfg, embedder, reference, queries, train_split, frozen, optimizer, scheduler)
    if resume_from is None:
        log.info("SFT %s on %s: %d trainable parameters; %d train / %d validation queries",
                 cfg.model, full.name, sum(p.numel() for p in state.params), len(train_ids), len(val_ids))
    hooks = Hooks(step=partial(sft_step, state), evaluate=partial(evaluate, embedder, val_task, val_pool),
                  postfix=("loss", "loss_nce"))
    trainee = Trainee(embedder.model, optimizer, scheduler, embedder, layout)
    return run(cfg, trainee, hooks, resume_from, "sft", f"SFT {model_tag(cfg.model)} on {full.name}")

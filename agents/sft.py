"""SFT warm-up of the LLM embedder: read top to bottom, CleanRL-style.

Loss per micro-batch of B training queries, each with one positive document and
H hard negatives mined from a corpus index of the env::

    w_lm * LM cross-entropy on the query's response tokens ("... The embedding is <|embed_token|>")
  + w_kl * KL(model || frozen base) on those same positions, over the base vocabulary
  + w_nce * InfoNCE(query, [all positives of the batch; all hard negatives]) at ``temperature``
  + w_triplet * triplet margin (query, its positive, each of its hard negatives)

Documents are either embedded by the model being trained (``train_documents``,
the full method; every step re-encodes B * (1 + H) documents), or frozen: their
embeddings are rows of the base model's cached corpus index, and only the query
side learns (an asymmetric dual encoder, the env's ``FrozenDocuments`` policy).
Frozen documents make a step cost a few short query passes instead of dozens of
document passes, and let the trained encoder reuse the base model's corpus
index at evaluation time: the CPU default.

Training pairs come from the train split's qrels (the test split is never
seen); held-out train queries give a validation nDCG@10 during training. When
qrels are scarce (fewer than ``min_pairs`` pairs), pseudo-queries from the corpus
fill up: a title retrieves its body, or a sentence its document. The log says
which.

Reasoning (``reasoning_tokens`` > 0) is self-taught, STaR-style, with the
retrieval loss as the judge, because there is no larger teacher model to
distil it from here: per batch query the current model samples K reasonings,
each is cut back to its last finished sentence, and the one (or the empty
reasoning) whose embedding gives the lowest InfoNCE against the batch's
candidates becomes the response the LM loss trains on and the embedding the
contrastive terms train. The aim is a model that writes reasoning where it
helps retrieval and ends it with the embed token by itself, which GRPO's format
reward needs: a model that never emits the token gives it nothing to separate.
(On Cranfield, run S in benchmarks/RESULTS_llm.md: the model ends every sample
with the embed token from step 16, but its reasonings shrink to a few words.)

A run can start from an earlier SFT checkpoint (``init``) instead of the base
model. Its negatives then come from that checkpoint's own corpus index: once a
model has learned to push BM25's or the base model's negatives away, batches of
them are too easy (InfoNCE near 0), and the documents it still ranks too high
are the ones left to learn from (ANCE's rounds of re-mined negatives).

Every random choice of step ``t`` comes from a generator seeded by ``(seed, t,
micro-batch)``, so a run resumed from a checkpoint draws exactly the batches the
uninterrupted run would have drawn, and its losses are identical.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from searchr3_env.atomic import atomic_write
from searchr3_env.cache_keys import folder_digest
from searchr3_env.dataset import RetrievalDataset
from searchr3_env.encoders import HashingEncoder
from searchr3_env.evaluation import evaluate_agent
from searchr3_env.index import CorpusIndex, load_or_build_index
from searchr3_env.task import RetrievalTask, resolve_dataset

from .checkpoint import (
    CONFIG,
    STATE,
    checkpoint_id,
    latest_checkpoint,
    load_training_state,
    load_weights,
    read_json,
    resolve_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    weights_digest,
)
from .config import SMOLLM2, SFTConfig
from .embedder import LLMEmbedder, reference_logits
from .losses import info_nce, kl_to_reference, lm_cross_entropy, triplet_margin
from .metrics_log import MetricsLog
from .models import load_causal_lm, resolve_model_dir
from .rollouts import sample_rollouts

log = logging.getLogger(__name__)
SPT_CALIBRATION_DOCS = 64  # evenly spaced corpus documents that calibrate a freshly SPT-patched model
# SPT as `--spt` uses it: sparse attention at s = 4, the FFN left dense. Measured on SmolLM2 (benchmarks/RESULTS.md,
# SPT): fine-tuned so, it is within 1.8% of dense fine-tuning (its weights within 0.4%). A routed FFN costs either
# quality (2 of 4 blocks: held-out loss +88% before fine-tuning) or speed (48 of 64: +7%, but 6.7x the dense FFN's
# CPU time, each token being gathered once per active block); SPTConfig offers both for a caller who chooses.
SPT_SETTING = dict(sparsity=4, routed_ffn=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainQuery:
    """A training query: its text, the documents it should retrieve, and mined hard negatives."""

    text: str
    positives: tuple[tuple[str, str], ...]  # (doc id, text the query should retrieve)
    relevant: frozenset[str]  # every doc id that must never serve as its negative
    negatives: tuple[str, ...]  # mined doc ids, hardest first
    source: str  # "qrels" or "pseudo"


# ---------------------------------------------------------------------------------------------- model
def model_tag(spec: str) -> str:
    return SMOLLM2 if spec == SMOLLM2 else re.sub(r"[^A-Za-z0-9_.]+", "_", Path(spec).name)


def base_encoder_name(cfg: SFTConfig) -> str:
    """Name of the untrained model's embeddings (shared by runs, so its corpus index is cached once)."""
    return f"llm-{model_tag(cfg.model)}-d{cfg.max_doc_tokens}{'-lc' if cfg.lowercase else ''}"


def build_embedder(cfg: SFTConfig) -> LLMEmbedder:
    """The base model with the embed token, as an embedder named for the *untrained* weights (its files' digest)."""
    path = resolve_model_dir(cfg.model, Path(cfg.cache_dir))
    model, tokenizer = load_causal_lm(path, dtype=cfg.dtype, device=cfg.device)
    return LLMEmbedder(model, tokenizer, name=base_encoder_name(cfg), max_doc_tokens=cfg.max_doc_tokens,
                       max_query_tokens=cfg.max_query_tokens, lowercase=cfg.lowercase, weights_id=folder_digest(path))


def make_trainable(embedder: LLMEmbedder, cfg: SFTConfig, calibration_texts: Sequence[str] = ()):
    """Wrap the model in LoRA adapters (or unfreeze it), SPT-patch it if asked; returns the frozen KL reference.

    SPT is patched after LoRA so its routers and codebooks train too; the KL
    reference is then the dense base model (a copy taken before patching), so
    the KL term also pulls the sparse model towards the dense one. A freshly
    patched model has random routers: `calibration_texts` (document prompts) fit
    them and the PQ codebooks to the pretrained model first (`spt_kernels.calibrate`).
    """
    model = embedder.model
    reference = copy.deepcopy(model).requires_grad_(False) if not cfg.lora or cfg.spt else None
    if not cfg.lora:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        n_layers = model.config.num_hidden_layers
        layers = list(range(n_layers - cfg.lora_layers, n_layers)) if cfg.lora_layers else None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS), layers_to_transform=layers,
                          trainable_token_indices=[embedder.embed_id] if cfg.train_embed_token else None)
        embedder.model = get_peft_model(model, lora)
    if cfg.spt:
        from spt_kernels import SPTConfig, calibrate, patch_model
        from spt_kernels.patching import is_patched

        if is_patched(embedder.model):  # a loaded SPT checkpoint (GRPO after SPT SFT): routers are already trained
            train_mode(embedder, cfg.gradient_checkpointing)
            return reference
        patch_model(embedder.model, SPTConfig(**SPT_SETTING))
        if calibration_texts:
            sequences, size = embedder.document_sequences(calibration_texts), embedder.batch_size
            padded = (embedder.pad(sequences[i : i + size]) for i in range(0, len(sequences), size))
            batches = ({"input_ids": ids, "attention_mask": mask} for ids, mask, _ in padded)
            calibrate(embedder.model, batches, progress=cfg.progress)
    train_mode(embedder, cfg.gradient_checkpointing)
    return reference  # None: the same model with its adapters disabled


def train_mode(embedder: LLMEmbedder, gradient_checkpointing: bool) -> None:
    """Training mode: SPT moves its codebooks and Hugging Face checkpoints layers only while ``model.training``.

    The supported models have no dropout, so nothing else changes; evaluation
    (``inference_mode``) and generation (no gradient) skip both.
    """
    if gradient_checkpointing:
        embedder.model.activation_checkpointing_enable()  # non-reentrant: works with frozen inputs (LoRA)
    embedder.model.train()


def build_optimizer(model, lr: float, weight_decay: float, embed_token_lr_scale: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the embed token's row (LoRA's trainable token) at ``lr * scale``.

    Adam moves a parameter at most about ``lr`` per step whatever its gradient,
    and the row starts at the mean row, some 14 nats below being predicted
    after "The embedding is". At the adapters' rate 100 steps cannot close that
    (measured: p 0.001 after 30 steps even at w_lm 1), so the model would never
    end a reasoning by itself and GRPO's format reward would have nothing to
    separate. One row at a higher rate is the usual treatment of a new token
    (textual inversion trains embeddings at ~10x a LoRA's rate).
    """
    token_rows, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (token_rows if "trainable_tokens_delta" in name else rest).append(param)
    groups = [{"params": rest}] + ([{"params": token_rows, "lr": lr * embed_token_lr_scale}] if token_rows else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def load_agent(path: str | Path, *, reasoning_tokens: int = 0, device: str | None = None, dtype: str | None = None,
               batch_size: int = 16, cache_dir: str | Path | None = None) -> tuple[LLMEmbedder, LLMEmbedder]:
    """(query embedder, document encoder) of an SFT checkpoint or a run folder's latest checkpoint.

    The trained embedder's name carries a digest of its weights and its version
    the step, so its corpus index is cached per checkpoint. A run with frozen
    documents pairs it with the untrained base model as document encoder, whose
    corpus index is shared with the base model's evaluation.
    """
    checkpoint = resolve_checkpoint(path)
    saved = read_json(checkpoint, CONFIG)
    cfg = SFTConfig(**{**saved, "device": device or saved["device"], "dtype": dtype or saved["dtype"],
                       "cache_dir": str(cache_dir or saved["cache_dir"])})
    embedder = build_embedder(cfg)
    base = embedder.weights_id
    if cfg.lora or cfg.spt:  # the same adapter and SPT layout as in training, so the saved names match
        make_trainable(embedder, cfg)
    load_weights(checkpoint, embedder.model)
    embedder.model.requires_grad_(False).eval()
    embedder.name = f"{base_encoder_name(cfg)}-{weights_digest(checkpoint)}"
    embedder.version = read_json(checkpoint, STATE)["version"]
    embedder.weights_id = checkpoint_id(checkpoint, base)
    embedder.reasoning_tokens = reasoning_tokens
    embedder.batch_size = batch_size
    if cfg.train_documents:
        return embedder, embedder
    documents = build_embedder(cfg)
    documents.batch_size = batch_size
    return embedder, documents


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


def pseudo_queries(dataset: RetrievalDataset, n: int, rng: np.random.Generator,
                   titles: bool = True) -> list[tuple[str, str, str]]:
    """Up to n (query, doc id, positive text): title -> body where a document has both (and ``titles``), else an
    excerpt of the body (:func:`body_excerpt`) -> the whole document."""
    out = []
    for doc_id in rng.permutation(dataset.doc_ids):
        if len(out) >= n:
            break
        doc = dataset.corpus[doc_id]
        if titles and doc.title and doc.text:
            out.append((doc.title, doc_id, doc.text))
        elif (excerpt := body_excerpt(doc.text, rng)) is not None:
            out.append((excerpt, doc_id, doc.as_text()))
    return out


def body_excerpt(text: str, rng: np.random.Generator) -> str | None:
    """A proper part of a document's body: one of its sentences of >= 5 words (the Inverse Cloze Task's
    pseudo-query), or, where the body is a single sentence or unpunctuated (NPL), a random span of 5 words
    to half the body (a Contriever-style crop). Never the whole body, which would teach the model to match a
    text with itself. None for a body under 10 words."""
    whole = text.strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", whole) if len(s.split()) >= 5 and s != whole]
    if sentences:
        return sentences[rng.integers(len(sentences))]
    words = whole.split()
    if len(words) < 10:
        return None
    length = int(rng.integers(5, len(words) // 2 + 1))
    start = int(rng.integers(len(words) - length + 1))
    return " ".join(words[start : start + length])


def training_queries(cfg: SFTConfig, train: RetrievalDataset, query_ids: Sequence[str], miner) -> list[TrainQuery]:
    """Train-split queries with their positives and mined negatives, plus pseudo-queries if qrels are scarce."""
    encoder, index = miner
    specs = [(train.queries[q], [(d, train.corpus[d].as_text()) for d in train.relevant(q)],
              set(train.qrels.get(q, {})), "qrels") for q in query_ids]
    n_pairs = sum(len(p) for _, p, _, _ in specs)
    n_pseudo = max(0, cfg.min_pairs - n_pairs)
    for text, doc_id, positive in pseudo_queries(train, n_pseudo, np.random.default_rng([cfg.seed, 1])):
        specs.append((text, [(doc_id, positive)], {doc_id}, "pseudo"))
    log.info("training pairs: %d from train-split qrels (%d queries) + %d corpus pseudo-queries%s",
             n_pairs, len(query_ids), len(specs) - len(query_ids),
             "" if n_pseudo == 0 else f" (qrels scarce: fewer than min_pairs={cfg.min_pairs})")
    _, top = index.search(encoder.encode_queries([s[0] for s in specs]), cfg.mine_depth + 64)
    out = []
    for (text, positives, relevant, source), row in zip(specs, top):
        negatives = [index.doc_ids[p] for p in row if p >= 0 and index.doc_ids[p] not in relevant][: cfg.mine_depth]
        out.append(TrainQuery(text, tuple(positives), frozenset(relevant), tuple(negatives), source))
    return out


def rerank_pool(train: RetrievalDataset, query_ids: Sequence[str], miner, pool_size: int) -> RetrievalDataset:
    """Held-out train queries over a candidate pool, for validation when documents are trained.

    The pool is each query's top ``eval_pool`` under the mining index plus its
    judged documents, so one eval costs a few hundred document encodings rather
    than the whole corpus. Its nDCG@10 is a reranking score (higher than full
    retrieval), for learning curves only; the real numbers come from ``searchr3 eval``.
    """
    encoder, index = miner
    _, top = index.search(encoder.encode_queries([train.queries[q] for q in query_ids]), pool_size)
    pool = {index.doc_ids[p] for row in top for p in row if p >= 0}
    pool |= {d for q in query_ids for d in train.qrels.get(q, {})}
    corpus = {d: train.corpus[d] for d in train.doc_ids if d in pool}
    queries = {q: train.queries[q] for q in query_ids}
    return RetrievalDataset(f"{train.name}-val", corpus, queries, {q: dict(train.qrels[q]) for q in query_ids})


def split_train_queries(train: RetrievalDataset, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """(training query ids, validation query ids): a seeded draw of n_val judged train queries."""
    judged = train.judged_query_ids
    if n_val >= len(judged):
        raise ValueError(f"val_queries={n_val} leaves no training queries ({len(judged)} judged train queries)")
    val = set(np.random.default_rng([seed, 2]).choice(judged, size=n_val, replace=False).tolist()) if n_val else set()
    return [q for q in judged if q not in val], [q for q in judged if q in val]


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
                               cfg.reasoning_temperature)
    tokenizer = embedder.tokenizer
    options = [[[]] + [finished_thought(r, tokenizer, embedder.embed_id) for r in rollouts.reasoning[i * k : (i + 1) * k]]
               for i in range(len(texts))]  # (B, 1 + K): option 0 is no reasoning
    flat_texts = [t for t in texts for _ in range(k + 1)]
    with torch.no_grad():
        emb = embedder.forward(embedder.query_sequences(flat_texts, [r for row in options for r in row])).embeddings
        own = torch.arange(len(texts), device=emb.device).repeat_interleave(k + 1)
        loss = info_nce(emb, documents, own, cfg.temperature, exclude[own.to(exclude.device)], reduction="none")
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
    nce = info_nce(q_fwd.embeddings, d_emb, torch.arange(b, device=d_emb.device), cfg.temperature, exclude)
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


def cosine_schedule(cfg: SFTConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ---------------------------------------------------------------------------------------------- the run
ADAPTER_LAYOUT = ("model", "lora", "lora_rank", "lora_alpha", "lora_layers", "train_embed_token", "spt")


def init_checkpoint(cfg: SFTConfig) -> Path | None:
    """The ``init`` checkpoint, checked to have this run's model and adapter layout (else its weights cannot load)."""
    if not cfg.init:
        return None
    checkpoint = resolve_checkpoint(cfg.init)
    saved = read_json(checkpoint, CONFIG)
    differ = {k: (saved.get(k), getattr(cfg, k)) for k in ADAPTER_LAYOUT if saved.get(k) != getattr(cfg, k)}
    if differ:
        raise ValueError(f"--init {cfg.init}: its model/adapter settings differ from this run's "
                         f"({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in differ.items())})")
    return checkpoint


def train(cfg: SFTConfig) -> Path:
    """Run (or resume) SFT; returns the final checkpoint folder."""
    run_dir = Path(cfg.output_dir)
    resume_from = resumable_checkpoint(run_dir, cfg)
    init = init_checkpoint(cfg)
    torch.manual_seed(cfg.seed)

    embedder = build_embedder(cfg)
    full = resolve_dataset(cfg.data)
    train_split = full.split("train")
    train_ids, val_ids = split_train_queries(train_split, cfg.val_queries, cfg.seed)
    frozen = None if cfg.train_documents else base_index(cfg, full, embedder)
    miner = mining_index(cfg, full, embedder, frozen)
    queries = training_queries(cfg, train_split, train_ids, miner)
    val_task, val_pool = None, None
    if val_ids and frozen is not None:  # full retrieval over the frozen index costs only the query passes
        val_data = RetrievalDataset(f"{full.name}-val", full.corpus, {q: full.queries[q] for q in val_ids},
                                    {q: dict(full.qrels[q]) for q in val_ids})
        # refresh="frozen": the rows are the base model's and stay valid whatever the query side's version.
        val_task = RetrievalTask(val_data, embedder, frozen, split="all", top_k=100, refresh="frozen")
    elif val_ids:
        val_pool = rerank_pool(train_split, val_ids, miner, cfg.eval_pool)
    del miner  # a hashing index of a large corpus holds hundreds of MB
    calibration_docs = full.doc_ids[:: max(1, len(full.doc_ids) // SPT_CALIBRATION_DOCS)][:SPT_CALIBRATION_DOCS]
    calibrate_on = full.document_texts(calibration_docs) if cfg.spt and init is None else ()
    reference = make_trainable(embedder, cfg, calibrate_on)
    if init is not None and resume_from is None:
        load_weights(init, embedder.model)  # the KL reference stays the base model
    embedder.name = f"{base_encoder_name(cfg)}-training"

    optimizer = build_optimizer(embedder.model, cfg.lr, cfg.weight_decay, cfg.embed_token_lr_scale)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg))
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    step = 0
    if resume_from is not None:
        step = load_training_state(resume_from, embedder.model, optimizer, scheduler)["step"]
        embedder.version = step
        metrics.truncate_after(step)
        log.info("resumed %s at step %d", resume_from, step)
    else:
        metrics.truncate_after(-1)
        log.info("SFT %s on %s: %d trainable parameters; %d train / %d validation queries",
                 cfg.model, full.name, sum(p.numel() for p in params), len(train_ids), len(val_ids))
    with atomic_write(run_dir / "config.json", "w") as out:
        out.write(json.dumps(asdict(cfg), indent=2))

    def evaluate() -> None:
        """nDCG@10 of the held-out train queries: full retrieval (frozen documents) or a pool rerank."""
        if val_task is not None:
            task, key = val_task, "eval_val_ndcg@10"
        elif val_pool is not None:
            index = CorpusIndex.build(val_pool, embedder, progress=False)
            task, key = RetrievalTask(val_pool, embedder, index, split="all", top_k=len(index)), "eval_val_rerank_ndcg@10"
        else:
            return
        ndcg10 = evaluate_agent(embedder, task, progress=False).metrics.mean["ndcg@10"]
        metrics.write(step, **{key: ndcg10})
        log.info("step %d: validation %s %.4f", step, key, ndcg10)

    embedder.reasoning_tokens = cfg.reasoning_tokens  # validation reasons (greedily) as the model is trained to
    if step == 0:
        evaluate()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", unit="step", disable=not cfg.progress)
    while step < cfg.max_steps:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = sample_batch(queries, cfg, step, micro)
            reasoning_seed = int(np.random.default_rng([cfg.seed, step, micro, 3]).integers(2**62))
            terms = batch_losses(embedder, reference, cfg, train_split, batch, frozen, reasoning_seed)
            (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        embedder.bump_version()
        step += 1
        metrics.write(step, **sums, lr=lr, grad_norm=grad_norm, step_s=time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", nce=f"{sums['loss_nce']:.3f}")
        last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            evaluate()
        if step % cfg.checkpoint_every == 0 or last:
            save_checkpoint(run_dir, step, embedder.model, optimizer, scheduler, asdict(cfg),
                            {"version": embedder.version})
    bar.close()
    metrics.plot(run_dir / "metrics.png", title=f"SFT {model_tag(cfg.model)} on {full.name}")
    return latest_checkpoint(run_dir)

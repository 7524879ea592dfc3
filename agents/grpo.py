"""GRPO of the LLM embedder against ``SearchR3-v0``: losses, one step, the run.

One step draws Q training queries and samples G rollouts of each (up to
``reasoning_tokens`` of reasoning, then ``<|embed_token|>``, see
:mod:`agents.rollouts`). The Q*G rollout embeddings are the actions of one
batched step of the vector env, pinned group by group to the drawn queries.
Each rollout's reward is

    r = env reward (full-depth nDCG of the query's relevant documents by default)
      + w_format * format reward (1/2 for emitting the embed token, 1/2 for stopping within budget)

and its advantage A is r normalised within its group (minus the group mean,
over the group std): only how a rollout compares with the other rollouts of
the *same* query counts, so easy and hard queries weigh alike. The loss is

    w_pg  * -mean over sampled tokens of min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
  + w_kl  * KL(policy || reference) on the sampled tokens' next-token distributions
  + w_nce * InfoNCE(rollout embedding, [its query's best relevant document; the env's top-ranked
            non-relevant documents of every query in the step]) at ``nce_temperature``

* ``ratio`` = pi(token) / pi_old(token) with both at the sampling temperature, pi_old
  the policy that sampled. Tokens are averaged over the whole batch (not per
  sequence first), so a long reasoning is not worth less per token than a short
  one. ``updates_per_batch`` > 1 reuses a batch of rollouts for several optimiser
  steps; the clip then keeps the policy near the one that sampled.
* The KL keeps the reasoning near the *SFT checkpoint* (the reference): GRPO
  merges the SFT adapters into the weights and trains fresh LoRA adapters on
  top, so the reference is the same model with its adapters off (with
  ``lora=False``, a frozen copy).
* The policy gradient alone reaches the embedding only through which tokens
  get sampled; the InfoNCE term trains the embedding itself (the hidden state at
  the embed token) on the very rollouts the env just scored, so reasoning and
  embedding are optimised together. With trained documents the candidates are
  embedded by the policy too (the gradient reaches both sides, as in SFT);
  with frozen documents they are the index rows.

Queries. Rollouts draw from the judged train-split queries (less the held-out
``val_queries``). A collection with few of them can add ``pseudo_queries``:
excerpts of a document's body whose only relevant document is that document
(the Inverse Cloze Task's pairs). Titles are not used: SFT trains title -> body,
so titles are too easy for the rollouts of a group to differ in reward. The
log splits the env reward into ``reward_env_judged`` and ``reward_env_pseudo``.

Documents. If the SFT run trained documents (``train_documents``), the policy is
also the env's document encoder: after every optimiser step it bumps its
version, and the env's ``LocalRefresh`` re-encodes, before scoring, only the
stale rows that decide the step's rewards (each query's top ``refresh_pool``
plus its relevant documents, and any row older than ``max_staleness``
versions). The log's ``docs_reencoded`` says how many. If SFT kept documents
frozen, the index is the base model's and never changes. Rollouts are scored by
the env's task (:meth:`RetrievalTask.score`), which returns index rows, ranks and
the refresh cost directly.

Every random choice of step t comes from generators seeded by (seed, t), and
with trained documents the env index (whose stale rows shape the rewards) is
saved with each checkpoint, so a resumed run repeats the uninterrupted run's
rewards and losses exactly.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from searchr3_env.evaluation import evaluate_agent
from searchr3_env.corpus import Corpus
from searchr3_env.index import load_or_build_index, prune_segments
from searchr3_env.refresh import FrozenDocuments, LocalRefresh
from searchr3_env.task import BatchScore, RetrievalTask, resolve_dataset

from .checkpoint import read_json, resumable_checkpoint, STATE
from .config import GRPOConfig
from .embedder import LLMEmbedder, reference_logits
from .losses import info_nce, kl_to_reference
from .policy import build_optimizer, cosine_schedule, policy_from_sft
from .queries import query_collection, split_train_queries
from .rollouts import Rollouts, group_advantages, sample_rollouts
from .run_loop import Hooks, Trainee, Validation, run

log = logging.getLogger(__name__)
PANELS = {"reward": ("reward",), "held-out nDCG@10": ("eval_val_ndcg@10",), "KL to SFT": ("loss_kl",),
          "reasoning tokens": ("reasoning_len",)}


# ---------------------------------------------------------------------------------------------- losses
def contrastive_targets(scored: BatchScore, hard_negatives: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(candidate index rows (C,), positive column (n,), exclude (n, C)) for InfoNCE on n scored rollouts.

    Each rollout's positive is its query's highest-graded relevant document; the
    negatives are every query's top-ranked non-relevant documents in the env's
    top-k. A candidate relevant to a rollout's query is never its negative.
    """
    positives, negatives, relevant = [], [], []
    for rel, grades, top in zip(scored.relevant_positions, scored.grades, scored.top_positions):
        rel, grades = rel[grades > 0].tolist(), grades[grades > 0]
        positives.append(rel[int(np.argmax(grades))])
        relevant.append(set(rel))
        negatives += [p for p in top.tolist() if p >= 0 and p not in relevant[-1]][:hard_negatives]
    candidates = list(dict.fromkeys(positives + negatives))  # unique, positives first
    column = {d: j for j, d in enumerate(candidates)}
    positive = torch.tensor([column[p] for p in positives])
    exclude = torch.tensor([[c in rel and c != p for c in candidates] for rel, p in zip(relevant, positives)])
    return candidates, positive, exclude


def document_embeddings(policy: LLMEmbedder, task: RetrievalTask, rows: list[int], trained: bool) -> torch.Tensor:
    """(C, d) candidate documents at index ``rows``: embedded by the policy (differentiable) when documents are
    trained, else the frozen index rows. Trained documents must get the gradient too, or the query side would
    chase document embeddings that the shared weights move without regard to the loss."""
    if trained:
        return policy.forward(policy.document_sequences([task.doc_texts[r] for r in rows])).embeddings
    return torch.from_numpy(task.index.embeddings[rows]).to(policy.device)


def grpo_losses(policy: LLMEmbedder, cfg: GRPOConfig, rollouts: Rollouts, fwd, advantages: torch.Tensor,
                old_logp: torch.Tensor | None, ref_logits: torch.Tensor, documents: torch.Tensor,
                positive: torch.Tensor, exclude: torch.Tensor) -> dict:
    """Every loss term of one update (tensors), plus ``loss`` and the sampled tokens' log-probs ``logp``."""
    rows, cols, tokens = rollouts.token_positions(fwd.hidden.device)
    logits = policy.model.get_output_embeddings()(fwd.hidden[rows, cols])  # (N sampled tokens, V)
    logp = F.log_softmax(logits.float() / cfg.sample_temperature, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.device)[rows]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
    has_tokens = len(tokens) > 0
    pg = -surrogate.mean() if has_tokens else fwd.embeddings.sum() * 0.0
    kl = kl_to_reference(logits, ref_logits) if has_tokens else pg * 0.0
    device = fwd.embeddings.device
    nce = info_nce(fwd.embeddings, documents, positive.to(device), cfg.nce_temperature, exclude.to(device))
    clipped = ((ratio - 1).abs() > cfg.clip_eps).float().mean() if has_tokens else pg.detach() * 0.0
    total = cfg.w_pg * pg + cfg.w_kl * kl + cfg.w_nce * nce
    return {"loss": total, "loss_pg": pg, "loss_kl": kl, "loss_nce": nce, "clip_frac": clipped, "logp": logp}


# ---------------------------------------------------------------------------------------------- the run
def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def index_state(run_dir: Path, step: int) -> Path:
    """The env's rows at checkpoint ``step``: a manifest of incremental segments, or a single file from a run
    saved before them."""
    manifest = Path(run_dir) / "index" / f"step-{step:06d}.json"
    return manifest if manifest.is_file() else manifest.with_suffix(".npz")


@dataclass
class GRPOState:
    """What a GRPO step reads and changes."""

    cfg: GRPOConfig
    policy: LLMEmbedder
    reference: torch.nn.Module | None
    task: RetrievalTask  # the rollout queries over the env's index; its refresh policy keeps rows fresh
    train_ids: list[str]
    pseudo_ids: set[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trains_documents: bool

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def sample_step(s: GRPOState, step: int) -> Rollouts:
    """The step's Q queries and G sampled rollouts of each, from generators seeded by (seed, step)."""
    rng = np.random.default_rng([s.cfg.seed, step])
    query_ids = [s.train_ids[i] for i in rng.choice(len(s.train_ids), s.cfg.queries_per_step, replace=False)]
    torch.manual_seed(int(rng.integers(2**62)))  # the sampled reasoning of step t, resumable
    texts = [s.task.query_text(q) for q in query_ids]
    return sample_rollouts(s.policy, query_ids, texts, s.cfg.group_size, s.cfg.reasoning_tokens,
                           s.cfg.sample_temperature)


def grpo_step(s: GRPOState, step: int) -> dict:
    """Sample, score with the env's task, and take ``updates_per_batch`` optimiser steps; returns the step's record."""
    cfg, start = s.cfg, time.perf_counter()
    rollouts = sample_step(s, step)
    generate_s = time.perf_counter() - start
    record: dict[str, float] = {}
    for update in range(cfg.updates_per_batch):
        s.optimizer.zero_grad(set_to_none=True)
        fwd = s.policy.forward(rollouts.sequences)
        if update == 0:  # score the rollouts once, with the policy that sampled them
            env_start = time.perf_counter()
            actions = s.task.check_actions(fwd.embeddings.detach().cpu().numpy(), rollouts.query_ids)
            scored = s.task.score(rollouts.query_ids, actions)
            candidates, positive, exclude = contrastive_targets(scored, cfg.hard_negatives)
            env_s = time.perf_counter() - env_start
            reward = scored.rewards + cfg.w_format * rollouts.format_reward
            advantages = torch.from_numpy(group_advantages(reward, cfg.group_size)).float()
            rows, cols, _ = rollouts.token_positions(fwd.hidden.device)
            ref_logits = reference_logits(s.policy, s.reference, fwd.input_ids, fwd.attention_mask, rows, cols)
            old_logp = None
        docs = document_embeddings(s.policy, s.task, candidates, s.trains_documents)
        terms = grpo_losses(s.policy, cfg, rollouts, fwd, advantages, old_logp, ref_logits, docs, positive, exclude)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm).item()
        s.optimizer.step()
        s.policy.bump_version()
        if update == 0:
            old_logp = terms["logp"].detach()
        for k, v in terms.items():
            if k != "logp":
                record[k] = record.get(k, 0.0) + v.item() / cfg.updates_per_batch
    lr = s.scheduler.get_last_lr()[0]
    s.scheduler.step()
    step_s = time.perf_counter() - start
    record.update(
        reward=float(reward.mean()), reward_env=float(scored.rewards.mean()),
        reward_format=float(rollouts.format_reward.mean()), train_ndcg10=float(np.mean(scored.ndcg10)),
        reasoning_len=float(rollouts.reasoning_lengths.mean()), embed_emitted=float(rollouts.emitted.mean()),
        docs_reencoded=int(scored.refresh.docs_reencoded), encoder_version=s.policy.version,
        lr=lr, grad_norm=grad_norm, generate_s=generate_s, env_s=env_s,
        update_s=step_s - generate_s - env_s, step_s=step_s, peak_mem_mb=peak_memory_mb(),
    )
    return record | reward_by_source(s.pseudo_ids, rollouts.query_ids, scored.rewards)


def reward_by_source(pseudo_ids: set[str], query_ids: list[str], env_reward: np.ndarray) -> dict:
    """The env reward split between judged queries and pseudo-queries (nothing when there are no pseudo-queries)."""
    if not pseudo_ids:
        return {}
    pseudo = np.array([q in pseudo_ids for q in query_ids])
    split = {"pseudo_share": float(pseudo.mean())}
    for key, rows in (("reward_env_judged", ~pseudo), ("reward_env_pseudo", pseudo)):
        if rows.any():
            split[key] = float(env_reward[rows].mean())
    return split


def held_out(policy: LLMEmbedder, val_task: RetrievalTask | None) -> Validation | None:
    if val_task is None:
        return None
    return Validation("eval_val_ndcg@10", evaluate_agent(policy, val_task, progress=False), val_task.dataset,
                      val_task.top_k)


def save_trained_index(corpus: Corpus, run_dir: Path, step: int) -> None:
    """With trained documents the env's rows are part of the run's state: rewards depend on its stale rows. Only the
    rows refreshed since the last checkpoint are written."""
    corpus.save_state(Path(run_dir) / "index", f"step-{step:06d}")


def keep_index_files_of_kept_checkpoints(run_dir: Path, checkpoint: Path) -> None:
    """After the checkpoint rotation: drop the env states no kept checkpoint needs, never a segment one does."""
    kept = {p.name for p in checkpoint.parent.glob("step-*")}
    prune_segments(Path(run_dir) / "index", kept)
    for old in (Path(run_dir) / "index").glob("step-*.npz"):  # single files of a run begun before segments
        if old.stem not in kept:
            old.unlink()


def train(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO; returns the final checkpoint folder."""
    run_dir = Path(cfg.output_dir)
    resume_from = resumable_checkpoint(run_dir, cfg)
    torch.manual_seed(cfg.seed)

    policy, documents, reference, sft_cfg, layout = policy_from_sft(cfg)
    policy.reasoning_tokens = cfg.reasoning_tokens  # held-out evals reason greedily with the same budget
    full = resolve_dataset(cfg.data)
    train_split = full.split("train")
    judged_ids, val_ids = split_train_queries(train_split, cfg.val_queries, cfg.seed)
    rollout_data = query_collection(train_split, judged_ids, full.name, cfg.pseudo_queries, cfg.seed)
    train_ids = rollout_data.judged_query_ids
    pseudo_ids = set(train_ids[len(judged_ids):])
    trains_documents = documents is policy
    staleness = cfg.max_staleness if cfg.max_staleness >= 0 else None
    refresh = LocalRefresh(cfg.refresh_pool, staleness) if trains_documents else FrozenDocuments()
    index = load_or_build_index(full, documents, cfg.cache_dir or sft_cfg.cache_dir, progress=cfg.progress)
    corpus = Corpus(full, documents, index, refresh)  # the rollouts' and the held-out queries' documents
    if resume_from is not None and trains_documents:  # the env's rows are part of the state: rewards read them
        corpus.load_state(index_state(run_dir, read_json(resume_from, STATE)["step"]))
    task = RetrievalTask(rollout_data, split="all", reward=cfg.reward, top_k=cfg.hard_negatives + 10, corpus=corpus)
    val_task = None
    if val_ids:
        val_task = RetrievalTask(query_collection(train_split, val_ids, f"{full.name}-val"), split="all", top_k=100,
                                 corpus=corpus)
    optimizer = build_optimizer(policy.model, cfg.lr, cfg.weight_decay, sft_cfg.embed_token_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, cfg.max_steps))
    state = GRPOState(cfg, policy, reference, task, train_ids, pseudo_ids, optimizer, scheduler, trains_documents)
    if resume_from is None:
        log.info("GRPO from %s on %s: %d trainable parameters; %d train queries (%d judged + %d pseudo-queries) / "
                 "%d validation queries; documents %s", cfg.init, full.name, sum(p.numel() for p in state.params),
                 len(train_ids), len(judged_ids), len(pseudo_ids), len(val_ids),
                 "trained (local refresh)" if trains_documents else "frozen")
    hooks = Hooks(step=partial(grpo_step, state), evaluate=partial(held_out, policy, val_task),
                  before_checkpoint=partial(save_trained_index, corpus, run_dir) if trains_documents else lambda step: None,
                  after_checkpoint=partial(keep_index_files_of_kept_checkpoints, run_dir),
                  postfix=("reward", "loss_kl"), panels=PANELS)
    trainee = Trainee(policy.model, optimizer, scheduler, policy, layout)
    return run(cfg, trainee, hooks, resume_from, "grpo", f"GRPO on {full.name} from {Path(cfg.init).name}")

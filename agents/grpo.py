"""GRPO of the LLM embedder against ``SearchR3-v0``: read top to bottom, CleanRL-style.

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
``val_queries``). A collection with few of them (CACM keeps 12) can add
``pseudo_queries`` corpus pseudo-queries: an excerpt of a document's body (a
sentence, or a span of unpunctuated text), whose only relevant document is that
document (the Inverse Cloze Task's pairs, with the excerpt kept in the indexed
text). Titles are not used: SFT trains title -> body, so titles are too easy for
the rollouts of a group to differ in reward (CACM, SFT run S's recipe: the
source document ranks first for 91% of titles but 48% of body sentences). The
log splits the env reward into ``reward_env_judged`` and ``reward_env_pseudo``.

Documents. If the SFT run trained documents (``train_documents``), the policy is
also the env's document encoder: after every optimiser step it bumps its
version, and the env's ``LocalRefresh`` re-encodes, before scoring, only the
stale rows that decide the step's rewards (each query's top ``refresh_pool``
plus its relevant documents, and any row older than ``max_staleness``
versions). The log's ``docs_reencoded`` says how many. If SFT kept documents
frozen (its CPU default), the index is the base model's and never changes.

Every random choice of step t comes from generators seeded by (seed, t), and
with trained documents the env index (whose stale rows shape the rewards) is
saved with each checkpoint, so a resumed run repeats the uninterrupted run's
rewards and losses exactly.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from searchr3_env.atomic import atomic_write
from searchr3_env.dataset import RetrievalDataset
from searchr3_env.evaluation import evaluate_agent
from searchr3_env.index import CorpusIndex, load_or_build_index
from searchr3_env.refresh import FrozenDocuments, LocalRefresh
from searchr3_env.task import RetrievalTask, resolve_dataset
from searchr3_env.vector_env import RetrievalVectorEnv

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
from .config import GRPOConfig, SFTConfig
from .embedder import LLMEmbedder, reference_logits
from .losses import info_nce, kl_to_reference
from .metrics_log import MetricsLog
from .rollouts import Rollouts, group_advantages, sample_rollouts
from .sft import (
    build_optimizer,
    cosine_schedule,
    load_agent,
    make_trainable,
    pseudo_queries,
    split_train_queries,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- model
def build_policy(cfg: GRPOConfig) -> tuple[LLMEmbedder, LLMEmbedder, torch.nn.Module | None, SFTConfig]:
    """(policy, document encoder, reference or None, the SFT config) from the SFT checkpoint ``cfg.init``.

    The SFT weights are merged (if LoRA) and fresh adapters go on top, so the
    reference is the policy with adapters off. The document encoder is the
    policy itself when SFT trained documents, else the untrained base model.
    """
    checkpoint = resolve_checkpoint(cfg.init)
    sft_cfg = SFTConfig(**read_json(checkpoint, CONFIG))
    policy, documents = load_agent(checkpoint, device=cfg.device or None, dtype=cfg.dtype or None,
                                   cache_dir=cfg.cache_dir or None, batch_size=max(16, cfg.group_size))
    if sft_cfg.lora:
        policy.model = policy.model.merge_and_unload()
    adapter = replace(sft_cfg, lora=cfg.lora, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_layers=cfg.lora_layers, gradient_checkpointing=cfg.gradient_checkpointing)
    reference = make_trainable(policy, adapter)
    policy.reasoning_tokens = cfg.reasoning_tokens  # held-out evals reason greedily with the same budget
    return policy, documents, reference, sft_cfg


def load_grpo_agent(path: str | Path, *, batch_size: int = 16) -> tuple[LLMEmbedder, LLMEmbedder]:
    """(query agent, document encoder) of a GRPO checkpoint or run folder, reasoning greedily."""
    checkpoint = resolve_checkpoint(path)
    cfg = GRPOConfig(**read_json(checkpoint, CONFIG))
    policy, documents, _, _ = build_policy(cfg)
    sft_id = policy.weights_id
    load_weights(checkpoint, policy.model)
    policy.model.requires_grad_(False).eval()
    policy.name = f"{policy.name}-grpo-{weights_digest(checkpoint)}"
    policy.version = read_json(checkpoint, STATE)["version"]
    policy.weights_id = checkpoint_id(checkpoint, sft_id)
    policy.batch_size = batch_size
    return policy, documents


# ---------------------------------------------------------------------------------------------- queries
def query_collection(data: RetrievalDataset, query_ids: list[str], name: str, n_pseudo: int = 0,
                     seed: int = 0) -> RetrievalDataset:
    """``data``'s corpus with only the queries ``query_ids``, plus ``n_pseudo`` body-excerpt pseudo-queries
    (ids ``pseudo-<doc id>``, each relevant to its own document only)."""
    queries = {q: data.queries[q] for q in query_ids}
    qrels = {q: dict(data.qrels[q]) for q in query_ids}
    for text, doc_id, _ in pseudo_queries(data, n_pseudo, np.random.default_rng([seed, 3]), titles=False):
        query_id = f"pseudo-{doc_id}"
        if query_id in data.queries:
            raise ValueError(f"{data.name}: a query is already called {query_id!r}; cannot name a pseudo-query so")
        queries[query_id], qrels[query_id] = text, {doc_id: 1}
    made = len(queries) - len(query_ids)
    if made < n_pseudo:
        log.warning("%s: only %d documents have a body to excerpt; %d pseudo-queries, not %d",
                    data.name, made, made, n_pseudo)
    return RetrievalDataset(name, data.corpus, queries, qrels)


# ---------------------------------------------------------------------------------------------- losses
def contrastive_targets(final_info: dict, hard_negatives: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(candidate doc ids (C,), positive column (n,), exclude (n, C)) for InfoNCE on n scored rollouts.

    Each rollout's positive is its query's highest-graded relevant document; the
    negatives are every query's top-ranked non-relevant documents in the env's
    top-k. A candidate relevant to a rollout's query is never its negative.
    """
    positives, negatives, relevant = [], [], []
    for rel_ids, grades, top in zip(final_info["relevant_ids"], final_info["grades"], final_info["top_k_ids"]):
        positives.append(rel_ids[int(np.argmax(grades))])
        relevant.append(set(rel_ids))
        negatives += [d for d in top if d not in relevant[-1]][:hard_negatives]
    candidates = list(dict.fromkeys(positives + negatives))  # unique, positives first
    column = {d: j for j, d in enumerate(candidates)}
    positive = torch.tensor([column[p] for p in positives])
    exclude = torch.tensor([[c in rel and c != p for c in candidates] for rel, p in zip(relevant, positives)])
    return candidates, positive, exclude


def document_embeddings(policy: LLMEmbedder, task: RetrievalTask, doc_ids: list[str], trained: bool) -> torch.Tensor:
    """(C, d) candidate documents: embedded by the policy (differentiable) when documents are trained, else
    the frozen index rows. Trained documents must get the gradient too, or the query side would chase
    document embeddings that the shared weights move without regard to the loss."""
    if trained:
        return policy.forward(policy.document_sequences(task.dataset.document_texts(doc_ids))).embeddings
    return torch.from_numpy(task.index.embeddings[task.index.positions(doc_ids)]).to(policy.device)


def grpo_losses(policy: LLMEmbedder, cfg: GRPOConfig, rollouts: Rollouts, fwd, advantages: torch.Tensor,
                old_logp: torch.Tensor | None, ref_logits: torch.Tensor, documents: torch.Tensor,
                positive: torch.Tensor, exclude: torch.Tensor) -> dict:
    """Every loss term of one update (tensors), plus ``loss`` and the sampled tokens' log-probs ``logp``."""
    rows, cols, tokens = rollouts.token_positions(fwd.hidden.device)
    logits = policy.model.get_output_embeddings()(fwd.hidden[rows, cols])  # (N sampled tokens, V)
    logp = F.log_softmax(logits.float() / cfg.temperature, dim=-1).gather(1, tokens[:, None]).squeeze(1)
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


def index_file(run_dir: Path, step: int) -> Path:
    return run_dir / "index" / f"step-{step:06d}.npz"


def train(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO; returns the final checkpoint folder."""
    run_dir = Path(cfg.output_dir)
    resume_from = resumable_checkpoint(run_dir, cfg)
    torch.manual_seed(cfg.seed)

    policy, documents, reference, sft_cfg = build_policy(cfg)
    cache_dir = cfg.cache_dir or sft_cfg.cache_dir
    full = resolve_dataset(cfg.data)
    train_split = full.split("train")
    judged_ids, val_ids = split_train_queries(train_split, cfg.val_queries, cfg.seed)
    rollout_data = query_collection(train_split, judged_ids, full.name, cfg.pseudo_queries, cfg.seed)
    train_ids = rollout_data.judged_query_ids
    pseudo_ids = set(train_ids[len(judged_ids):])
    trains_documents = documents is policy
    staleness = cfg.max_staleness if cfg.max_staleness >= 0 else None
    refresh = LocalRefresh(cfg.refresh_pool, staleness) if trains_documents else FrozenDocuments()
    if resume_from is not None and trains_documents:
        index = CorpusIndex.load(index_file(run_dir, read_json(resume_from, STATE)["step"]))
    else:
        index = load_or_build_index(full, documents, cache_dir, progress=cfg.progress)
    task = RetrievalTask(rollout_data, documents, index, reward=cfg.reward, split="all",
                         top_k=cfg.hard_negatives + 10, refresh=refresh)
    env = RetrievalVectorEnv(num_envs=cfg.queries_per_step * cfg.group_size, task=task)
    val_task = None
    if val_ids:
        val_data = query_collection(train_split, val_ids, f"{full.name}-val")
        val_task = RetrievalTask(val_data, documents, index, split="all", top_k=100, refresh=refresh)

    optimizer = build_optimizer(policy.model, cfg.lr, cfg.weight_decay, sft_cfg.embed_token_lr_scale)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg))
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    step = 0
    if resume_from is not None:
        state = load_training_state(resume_from, policy.model, optimizer, scheduler)
        step, policy.version = state["step"], state["version"]
        metrics.truncate_after(step)
        log.info("resumed %s at step %d", resume_from, step)
    else:
        metrics.truncate_after(-1)
        log.info("GRPO from %s on %s: %d trainable parameters; %d train queries (%d judged + %d pseudo-queries) / "
                 "%d validation queries; documents %s", cfg.init, full.name, sum(p.numel() for p in params),
                 len(train_ids), len(judged_ids), len(pseudo_ids), len(val_ids),
                 "trained (local refresh)" if trains_documents else "frozen")
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "config.json", "w") as out:
        out.write(json.dumps(asdict(cfg), indent=2))

    def evaluate() -> None:
        if val_task is not None:
            ndcg10 = evaluate_agent(policy, val_task, progress=False).metrics.mean["ndcg@10"]
            metrics.write(step, **{"eval_val_ndcg@10": ndcg10})
            log.info("step %d: held-out nDCG@10 %.4f", step, ndcg10)

    if step == 0:
        evaluate()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="grpo", unit="step", disable=not cfg.progress)
    while step < cfg.max_steps:
        start = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, step])
        query_ids = [train_ids[i] for i in rng.choice(len(train_ids), cfg.queries_per_step, replace=False)]
        torch.manual_seed(int(rng.integers(2**62)))  # the sampled reasoning of step t, resumable
        texts = [rollout_data.queries[q] for q in query_ids]
        rollouts = sample_rollouts(policy, query_ids, texts, cfg.group_size, cfg.reasoning_tokens, cfg.temperature)
        generate_s = time.perf_counter() - start

        record: dict[str, float] = {}
        env_s = 0.0
        for update in range(cfg.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            fwd = policy.forward(rollouts.sequences)
            if update == 0:  # score the rollouts once, with the policy that sampled them
                env_start = time.perf_counter()
                env.reset(seed=cfg.seed, options={"query_ids": rollouts.query_ids})
                _, env_reward, _, _, info = env.step(fwd.embeddings.detach().cpu().numpy())
                final = info["final_info"]
                candidates, positive, exclude = contrastive_targets(final, cfg.hard_negatives)
                env_s = time.perf_counter() - env_start
                reward = env_reward + cfg.w_format * rollouts.format_reward
                advantages = torch.from_numpy(group_advantages(reward, cfg.group_size)).float()
                rows, cols, _ = rollouts.token_positions(fwd.hidden.device)
                ref_logits = reference_logits(policy, reference, fwd.input_ids, fwd.attention_mask, rows, cols)
                old_logp = None
            docs = document_embeddings(policy, task, candidates, trains_documents)
            terms = grpo_losses(policy, cfg, rollouts, fwd, advantages, old_logp, ref_logits, docs, positive, exclude)
            terms["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            optimizer.step()
            policy.bump_version()
            if update == 0:
                old_logp = terms["logp"].detach()
            for k, v in terms.items():
                if k != "logp":
                    record[k] = record.get(k, 0.0) + v.item() / cfg.updates_per_batch
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        step_s = time.perf_counter() - start
        record.update(
            reward=float(reward.mean()), reward_env=float(env_reward.mean()),
            reward_format=float(rollouts.format_reward.mean()), train_ndcg10=float(np.mean(final["ndcg@10"])),
            reasoning_len=float(rollouts.reasoning_lengths.mean()), embed_emitted=float(rollouts.emitted.mean()),
            docs_reencoded=int(final["docs_reencoded"][0]), encoder_version=policy.version,
            lr=lr, grad_norm=grad_norm, generate_s=generate_s, env_s=env_s,
            update_s=step_s - generate_s - env_s, step_s=step_s, peak_mem_mb=peak_memory_mb(),
        )
        if pseudo_ids:
            pseudo = np.array([q in pseudo_ids for q in rollouts.query_ids])
            record["pseudo_share"] = float(pseudo.mean())
            for key, rows in (("reward_env_judged", ~pseudo), ("reward_env_pseudo", pseudo)):
                if rows.any():
                    record[key] = float(env_reward[rows].mean())
        metrics.write(step, **record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['loss_kl']:.4f}")
        last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            evaluate()
        if step % cfg.checkpoint_every == 0 or last:
            if trains_documents:  # the env's index is part of the state: rewards depend on its stale rows
                task.index.save(index_file(run_dir, step))
            checkpoint = save_checkpoint(run_dir, step, policy.model, optimizer, scheduler, asdict(cfg),
                                         {"version": policy.version})
            kept = {p.name for p in checkpoint.parent.glob("step-*")}
            for old in (run_dir / "index").glob("step-*.npz"):
                if old.stem not in kept:
                    old.unlink()
    bar.close()
    plot(metrics, run_dir / "metrics.png", title=f"GRPO on {full.name} from {Path(cfg.init).name}")
    return latest_checkpoint(run_dir)


def plot(metrics: MetricsLog, png: Path, title: str) -> Path:
    """Four panels over steps: reward, held-out nDCG@10, KL to the reference, reasoning length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from searchr3_env.atomic import atomic_write

    records = metrics.read()
    rewards = ("reward", "reward_env", "reward_format", "reward_env_judged", "reward_env_pseudo")
    panels = (("reward", rewards), ("held-out nDCG@10", ("eval_val_ndcg@10",)), ("KL to SFT", ("loss_kl",)),
              ("reasoning tokens", ("reasoning_len",)))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(png) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return png

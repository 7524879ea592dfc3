"""Refresh fidelity in a real GRPO run (issue 19): LocalRefresh against a full re-encode, and the env's share of a step.

``refresh_fidelity.py`` measures the refresh policies under *simulated* drift.
This script measures them in a real run: SmolLM2 trained by GRPO on a BEIR
collection with trained documents, the env keeping its index fresh with
``LocalRefresh``. What it runs (every stage resumes where a killed run stopped):

1. SFT with ``train_documents`` (``agents.sft.train``), unless the run folder
   holds its last checkpoint already.
2. GRPO from it, built from ``agents.grpo``'s public pieces (``policy_from_sft``,
   ``GRPOState``, ``grpo_step``, ``agents.run_loop.run``) as ``agents.grpo.train``
   builds them, with two differences that change no number: the starting index
   is a full encode of the corpus by the starting policy made here (so it is
   also step 0's ground truth), and the env's task and ``LocalRefresh`` are
   instrumented. The refresh records, per batch, which rows it re-encodes
   (the batch's judged relevant documents, which every step must refresh; the
   rows of a rollout's top-``pool``; rows the staleness bound adds) and how long
   the encoding takes; the task's ``score`` is timed.
3. At every ``compare_every``-th step, inside the env's scoring (the rollouts are
   sampled and embedded, the optimiser step has not happened), the corpus is
   re-encoded in full by the current policy, and the step's rollout embeddings
   are scored against it with the env's own ``RetrievalTask.score``: the ground
   truth. :func:`compare` then scores the same embeddings under other refresh
   settings, each replayed on a copy of the index as it stood before this step's
   refresh, the rows it re-encodes looked up in the full re-encode (so the
   counterfactuals cost no LLM passes): one-step counterfactuals from the run's
   own index, not whole runs under those settings. A fixed set of probe train
   queries, embedded greedily by the current policy, is scored the same way.
   The comparison's time is taken out of the step's timings.

Step ``t`` in the records is the number of optimiser steps before the batch was
scored: the policy is at version ``v0 + t`` (``metrics.jsonl`` logs it as t + 1).

Outputs under ``--out``: ``steps.jsonl`` (one record per step: time split and
rows re-encoded; a resumed step's later record wins), ``comparisons.jsonl`` (one
record per compare step, batch and setting; a step already compared is not
compared again), ``full/step-NNNNNN.npz`` (the full re-encodes), ``summary.md``;
the figure goes to ``--figure``; ``--results-md`` gets the summary between its
``grpo-refresh`` markers.

Run (on 2 shared CPU cores: about 1 h to step 20, 1.5 h to step 30; a full re-encode is 4-10 min)::

    .venv/bin/python benchmarks/grpo_refresh_fidelity.py --data ../shared/data/cranfield \
        --out runs/grpo-refresh-fidelity --results-md benchmarks/results/refresh.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from agents.checkpoint import STATE, latest_checkpoint, read_json, resumable_checkpoint
from agents.config import GRPOConfig, SFTConfig
from agents.grpo import GRPOState, grpo_step
from agents.policy import build_optimizer, cosine_schedule, policy_from_sft
from agents.queries import query_collection, split_train_queries
from agents.run_loop import Hooks, Trainee, run
from agents.sft import train as train_sft
from searchr3_env.atomic import atomic_write
from searchr3_env.corpus import Corpus
from searchr3_env.dataset import RetrievalDataset
from searchr3_env.index import CorpusIndex
from searchr3_env.refresh import FrozenDocuments, LocalRefresh, encode_locally
from searchr3_env.task import BatchScore, RetrievalTask, resolve_dataset

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("grpo_refresh_fidelity")
MARKERS = ("<!-- grpo-refresh begin -->", "<!-- grpo-refresh end -->")


# ---------------------------------------------------------------------------------------------- the refresh, measured
class MeasuredLocalRefresh(LocalRefresh):
    """``LocalRefresh`` that records each refresh round: rows by reason, time to choose them, time to encode them.

    A row is counted as *relevant* if it is a judged relevant document of a query
    in the batch (these are refreshed every step whatever else happens), as *pool*
    if it is in some query's top-``pool`` of the index as it stands, and as
    *staleness* otherwise (the ``max_staleness`` bound added it). What it
    re-encodes is exactly what ``LocalRefresh`` re-encodes.
    """

    def __init__(self, pool: int, max_staleness: int | None):
        super().__init__(pool, max_staleness, encode=self._timed_encode)
        self.rounds: list[dict] = []  # of the current batch; the caller clears it
        self.classify_s = 0.0  # time spent classifying rows (measurement overhead, not the env's)

    def rows_to_refresh(self, corpus, rel_positions: np.ndarray, queries: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        rows = super().rows_to_refresh(corpus, rel_positions, queries)
        select_s = time.perf_counter() - start
        relevant = np.isin(rows, rel_positions[rel_positions >= 0])
        top = corpus.index.search(queries, self.pool)[1].ravel() if self.pool else np.empty(0, dtype=np.int64)
        pool = ~relevant & np.isin(rows, top)
        self.rounds.append({"rows": len(rows), "relevant": int(relevant.sum()), "pool": int(pool.sum()),
                            "staleness": int(len(rows) - relevant.sum() - pool.sum()), "select_s": select_s,
                            "encode_s": 0.0})
        self.classify_s += time.perf_counter() - start - select_s
        return rows

    def _timed_encode(self, encoder, texts: Sequence[str]) -> np.ndarray:
        start = time.perf_counter()
        out = encode_locally(encoder, texts)
        self.rounds[-1]["encode_s"] += time.perf_counter() - start
        return out


class PoolOnlyRefresh(LocalRefresh):
    """``LocalRefresh`` that leaves the judged relevant documents out of the pool (they refresh only when they rank
    in some rollout's top-``pool``): the counterfactual 'refresh the relevant documents less often'."""

    def rows_to_refresh(self, corpus, rel_positions: np.ndarray, queries: np.ndarray) -> np.ndarray:
        return super().rows_to_refresh(corpus, np.full_like(rel_positions, -1), queries)


def settings(pool: int, max_staleness: int | None) -> dict[str, Callable]:
    """The refresh settings :func:`compare` replays: name -> factory(encode) -> policy. The run's own comes first."""
    run_name = f"LocalRefresh(pool={pool}, max_staleness={max_staleness}) [run]"
    out = {run_name: lambda enc: LocalRefresh(pool, max_staleness, encode=enc)}
    if max_staleness is not None:
        out[f"LocalRefresh(pool={pool}, max_staleness=None)"] = lambda enc: LocalRefresh(pool, None, encode=enc)
    for small in sorted({min(3, pool), 0} - {pool}, reverse=True):
        out[f"LocalRefresh(pool={small}, max_staleness=None)"] = partial(
            lambda p, enc: LocalRefresh(p, None, encode=enc), small)
    out[f"pool={pool} only, relevant documents not refreshed"] = lambda enc: PoolOnlyRefresh(pool, None, encode=enc)
    out["no refresh this step"] = lambda enc: FrozenDocuments()
    return out


# ---------------------------------------------------------------------------------------------- the comparison
def copy_index(index: CorpusIndex, embeddings: np.ndarray | None = None, versions=None) -> CorpusIndex:
    """An independent copy of ``index`` (optionally with other rows and versions): what a counterfactual mutates."""
    return CorpusIndex(index.doc_ids, index.embeddings if embeddings is None else embeddings,
                       index.versions if versions is None else versions, factory=index.factory,
                       encoder_name=index.encoder_name, corpus_fingerprint=index.corpus_fingerprint)


def agreement(scored: BatchScore, truth: BatchScore) -> dict:
    """How a refreshed index's scores of a batch agree with the ground truth's (same embeddings, same queries)."""
    valid = truth.grades > 0
    ranks, true_ranks = scored.ranks[valid], truth.ranks[valid]
    diff = scored.rewards - truth.rewards
    wrong = ranks != true_ranks
    same = not wrong.any()
    top = [len(set(a[:10].tolist()) & set(b[:10].tolist())) / min(10, len(b)) for a, b in
           zip(scored.top_positions, truth.top_positions)]
    return {
        "pairs": int(valid.sum()), "queries": len(diff),
        "reward_mae": float(np.abs(diff).mean()), "reward_bias": float(diff.mean()),
        "reward_max_err": float(np.abs(diff).max()), "exact_rewards": float((diff == 0).mean()),
        "exact_ranks": float(1 - wrong.mean()),
        "optimistic": float((ranks[wrong] < true_ranks[wrong]).mean()) if wrong.any() else None,
        "spearman": 1.0 if same else float(spearmanr(ranks, true_ranks)[0]),
        "kendall": 1.0 if same else float(kendalltau(ranks, true_ranks)[0]),
        "top10_overlap": float(np.mean(top)), "truth_reward": float(truth.rewards.mean()),
        "ranks": ranks.tolist(), "truth_ranks": true_ranks.tolist(),
        "rewards": scored.rewards.tolist(), "truth_rewards": truth.rewards.tolist(),
    }


def compare(dataset: RetrievalDataset, encoder, reward: str, query_ids: list[str], embeddings: np.ndarray,
            before: CorpusIndex, full: np.ndarray, doc_texts: Sequence[str], *,
            refreshes: dict[str, Callable] | None = None, snapshots: dict[str, np.ndarray] | None = None,
            run_scored: BatchScore | None = None) -> dict[str, dict]:
    """Agreement with the ground truth of the run's scores and of each setting's, for one batch.

    Args:
        dataset: the collection the queries come from (split "all" of it is scored).
        encoder: the current policy (only its ``name`` and ``version`` are read).
        query_ids, embeddings: the batch, as the env scored it.
        before: the env's index before this batch's refresh (copied, never changed).
        full: (n_docs, dim) the corpus fully re-encoded by the current policy: the ground truth's rows.
        doc_texts: the document texts aligned with the index rows.
        refreshes: name -> factory(encode) -> refresh policy, each replayed on a copy of ``before`` with the rows
            it re-encodes looked up in ``full``.
        snapshots: name -> (n_docs, dim) whole-corpus rows (e.g. an older full re-encode), scored as they are.
        run_scored: the env's own scores of the batch, compared as "run".
    Returns: name -> :func:`agreement` plus ``rows`` (documents that setting re-encoded for this batch).
    """
    row_of = {text: i for i, text in enumerate(doc_texts)}  # duplicate texts have identical rows

    def lookup(_encoder, texts: Sequence[str]) -> np.ndarray:
        return full[[row_of[t] for t in texts]]

    def scores(index: CorpusIndex, refresh) -> BatchScore:
        corpus = Corpus(dataset, encoder, index, refresh)  # its own, never shared: the replay mutates its rows
        return RetrievalTask(dataset, reward=reward, split="all", top_k=10, corpus=corpus).score(list(query_ids),
                                                                                                   embeddings)

    version = np.full(len(before), encoder.version)
    truth = scores(copy_index(before, full, version), FrozenDocuments())
    out = {}
    if run_scored is not None:
        out["run"] = agreement(run_scored, truth) | {"rows": int(run_scored.refresh.docs_reencoded)}
    for name, make in (refreshes or {}).items():
        scored = scores(copy_index(before), make(lookup))
        out[name] = agreement(scored, truth) | {"rows": int(scored.refresh.docs_reencoded)}
    for name, rows in (snapshots or {}).items():
        out[name] = agreement(scores(copy_index(before, rows, version), FrozenDocuments()), truth) | {"rows": 0}
    return out


# ---------------------------------------------------------------------------------------------- records
def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line a kill cut short
            continue
    return out


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def latest_by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records}


def save_rows(path: Path, rows: np.ndarray, version: int) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, embeddings=rows, version=np.int64(version))
    with atomic_write(path) as f:
        f.write(buf.getbuffer())


def load_rows(path: Path) -> np.ndarray:
    with np.load(path) as z:
        return z["embeddings"]


# ---------------------------------------------------------------------------------------------- the GRPO run, measured
class MeasuredTask:
    """The env's task as GRPO sees it: everything passes through, ``score`` goes to the measurement."""

    def __init__(self, task: RetrievalTask, score: Callable):
        self._task, self._score = task, score

    def __getattr__(self, name):
        return getattr(self._task, name)

    def score(self, query_ids, embeddings) -> BatchScore:
        return self._score(query_ids, embeddings)


@dataclass
class Measurement:
    """Times each GRPO step's parts and, at compare steps, checks the env's scores against a full re-encode."""

    out: Path
    state: GRPOState
    task: RetrievalTask  # the real one, whose index the run refreshes
    refresh: MeasuredLocalRefresh
    compare_every: int
    probe_ids: list[str]
    step: int = -1
    overhead_s: float = 0.0
    batch: dict = field(default_factory=dict)

    @property
    def policy(self):
        return self.state.policy

    def compared(self) -> set[int]:
        return {r["step"] for r in read_jsonl(self.out / "comparisons.jsonl") if r.get("complete")}

    def grpo_step(self, step: int) -> dict:
        self.step, self.overhead_s, self.batch = step, 0.0, {}
        record = grpo_step(self.state, step)
        rounds = self.batch.get("rounds", [])
        rows = {k: sum(r[k] for r in rounds) for k in ("rows", "relevant", "pool", "staleness")}
        encode_s = sum(r["encode_s"] for r in rounds)
        select_s = sum(r["select_s"] for r in rounds)
        env_s = record["env_s"] - self.overhead_s
        share = {k: rows[k] / rows["rows"] if rows["rows"] else 0.0 for k in ("relevant", "pool", "staleness")}
        timing = {
            "step": step, "version": self.batch.get("version"), "generate_s": record["generate_s"], "env_s": env_s,
            "scoring_s": env_s - encode_s - select_s, "select_s": select_s, "reencode_s": encode_s,
            # encoding time split by rows (documents are truncated to the same length, so a row costs about the same)
            "reencode_relevant_s": encode_s * share["relevant"], "reencode_pool_s": encode_s * share["pool"],
            "reencode_staleness_s": encode_s * share["staleness"], "update_s": record["update_s"],
            "step_s": record["step_s"] - self.overhead_s, "env_share": env_s / (record["step_s"] - self.overhead_s),
            "rows": rows["rows"], "rows_relevant": rows["relevant"], "rows_pool": rows["pool"],
            "rows_staleness": rows["staleness"], "refresh_rounds": sum(1 for r in rounds if r["rows"]),
            "docs_reencoded": record["docs_reencoded"], "comparison_s": self.overhead_s,
            **{k: record[k] for k in ("reward", "reward_env", "loss", "loss_kl", "loss_nce", "peak_mem_mb")},
        }
        append_jsonl(self.out / "steps.jsonl", timing)
        log.info("step %d: %.1f s (generate %.1f, env %.1f = scoring %.2f + re-encode %.1f [%d rows: %d relevant, "
                 "%d pool, %d staleness], update %.1f); env share %.1f%%; reward %.3f; peak %.0f MB",
                 step, timing["step_s"], timing["generate_s"], env_s, timing["scoring_s"] + select_s, encode_s,
                 rows["rows"], rows["relevant"], rows["pool"], rows["staleness"], timing["update_s"],
                 100 * timing["env_share"], record["reward"], record["peak_mem_mb"])
        return record

    def score(self, query_ids: list[str], embeddings: np.ndarray) -> BatchScore:
        start = time.perf_counter()
        compare_now = self.step % self.compare_every == 0 and self.step not in self.compared()
        before = copy_index(self.task.index) if compare_now else None
        self.refresh.rounds, self.refresh.classify_s = [], 0.0
        scoring_start = time.perf_counter()
        scored = self.task.score(query_ids, embeddings)
        score_s = time.perf_counter() - scoring_start
        self.batch = {"rounds": self.refresh.rounds, "version": self.policy.version}
        if compare_now:
            rng = torch.get_rng_state()
            self.compare_step(list(query_ids), embeddings, before, scored)
            torch.set_rng_state(rng)
        self.overhead_s = time.perf_counter() - start - score_s + self.refresh.classify_s
        return scored

    def full_encode(self, step: int) -> tuple[np.ndarray, float]:
        path = self.out / "full" / f"step-{step:06d}.npz"
        if step == 0 and path.is_file():  # the starting index, built by this policy: a full encode already
            return load_rows(path), 0.0
        start = time.perf_counter()
        rows = encode_locally(self.policy, self.task.doc_texts)
        seconds = time.perf_counter() - start
        save_rows(path, rows, self.policy.version)
        return rows, seconds

    def compare_step(self, query_ids: list[str], embeddings: np.ndarray, before: CorpusIndex,
                     scored: BatchScore) -> None:
        step, version, cfg = self.step, self.policy.version, self.state.cfg
        log.info("step %d: full re-encode of %d documents by the policy at version %d", step, len(before), version)
        full, full_s = self.full_encode(step)
        fresh = self.task.index.versions == version  # rows this step's refresh re-encoded
        row_diff = float(np.abs(self.task.index.embeddings[fresh] - full[fresh]).max()) if fresh.any() else 0.0
        snapshots = {}
        for age, name in ((step, "no refresh since step 0"),
                          (self.compare_every, f"FullRefresh(every={self.compare_every}) at its stalest "
                                               f"({self.compare_every} versions old)")):
            old = self.out / "full" / f"step-{step - age:06d}.npz"
            if age and step >= age and old.is_file():
                snapshots[name] = load_rows(old)
        staleness = cfg.max_staleness if cfg.max_staleness >= 0 else None
        refreshes = settings(cfg.refresh_pool, staleness)
        dataset = self.task.dataset
        common = {"refreshes": refreshes, "snapshots": snapshots}
        batches = {"rollouts": compare(dataset, self.policy, cfg.reward, query_ids, embeddings, before, full,
                                       self.task.doc_texts, run_scored=scored, **common)}
        probe_s = 0.0
        if self.probe_ids:
            start = time.perf_counter()
            greedy = self.policy.with_options(reasoning_tokens=cfg.reasoning_tokens)
            probe = greedy.encode_queries([self.task.query_text(q) for q in self.probe_ids])
            probe_s = time.perf_counter() - start
            batches["probe"] = compare(dataset, self.policy, cfg.reward, self.probe_ids, probe, before, full,
                                       self.task.doc_texts, **common)
        stale = before.versions < version
        meta = {"step": step, "version": version, "full_encode_s": full_s, "probe_embed_s": probe_s,
                "stale_rows_before": int(stale.sum()), "mean_row_age_before": float((version - before.versions).mean()),
                "refreshed_row_max_abs_diff": row_diff}
        for batch, results in batches.items():
            for name, res in results.items():
                append_jsonl(self.out / "comparisons.jsonl", {**meta, "batch": batch, "setting": name, **res})
        append_jsonl(self.out / "comparisons.jsonl", {**meta, "complete": True})
        run = batches["rollouts"]["run"]
        log.info("step %d: run vs full re-encode: reward MAE %.4f, exact ranks %.3f, top-10 overlap %.3f "
                 "(full encode %.0f s; refreshed rows differ from it by <= %.1e)", step, run["reward_mae"],
                 run["exact_ranks"], run["top10_overlap"], full_s, row_diff)


def sft_config(args) -> SFTConfig:
    return SFTConfig(data=args.data, model=args.model, output_dir=str(args.out / "sft"), seed=args.seed,
                     max_steps=args.sft_steps, batch_size=args.sft_batch, hard_negatives=args.sft_hard_negatives,
                     mine_depth=args.sft_mine_depth, negatives="hashing", val_queries=0, lr=args.sft_lr,
                     warmup_steps=min(2, args.sft_steps - 1), train_documents=True,
                     max_doc_tokens=args.max_doc_tokens, checkpoint_every=args.sft_steps, progress=False,
                     gradient_checkpointing=args.gradient_checkpointing, cache_dir=args.cache_dir)


def grpo_config(args) -> GRPOConfig:
    return GRPOConfig(data=args.data, init=str(args.out / "sft"), output_dir=str(args.out / "grpo"), seed=args.seed,
                      queries_per_step=args.queries_per_step, group_size=args.group_size,
                      reasoning_tokens=args.reasoning_tokens, refresh_pool=args.refresh_pool,
                      max_staleness=args.max_staleness, max_steps=args.steps, val_queries=0,
                      checkpoint_every=args.checkpoint_every, progress=False,
                      gradient_checkpointing=args.gradient_checkpointing, cache_dir=args.cache_dir)


def run_sft(args) -> None:
    cfg = sft_config(args)
    done = latest_checkpoint(cfg.output_dir)
    if done is not None and read_json(done, STATE)["step"] >= cfg.max_steps:
        log.info("SFT: %s is complete", done)
        return
    start = time.perf_counter()
    train_sft(cfg)
    log.info("SFT: %d steps in %.0f s", cfg.max_steps, time.perf_counter() - start)


def index_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "index" / f"step-{step:06d}.npz"


def save_index(corpus: Corpus, run_dir: Path, step: int) -> None:
    """The env's rows are part of the run's state (rewards read its stale rows): saved with every checkpoint."""
    corpus.index.save(index_file(run_dir, step))


def keep_index_files(run_dir: Path, checkpoint: Path) -> None:
    kept = {p.name for p in checkpoint.parent.glob("step-*")}
    for old in (Path(run_dir) / "index").glob("step-*.npz"):
        if old.stem not in kept:
            old.unlink()


def run_grpo(args) -> None:
    """GRPO as ``agents.grpo.train`` runs it, with the measured task and refresh and a freshly built start index."""
    cfg = grpo_config(args)
    run_dir = Path(cfg.output_dir)
    resume_from = resumable_checkpoint(run_dir, cfg)
    torch.manual_seed(cfg.seed)
    policy, documents, reference, sft_cfg, layout = policy_from_sft(cfg)
    if documents is not policy:
        raise ValueError(f"{cfg.init} kept documents frozen: this benchmark needs an SFT run with train_documents")
    policy.reasoning_tokens = cfg.reasoning_tokens
    full = resolve_dataset(cfg.data)
    train_split = full.split("train")
    judged_ids, _ = split_train_queries(train_split, cfg.val_queries, cfg.seed)
    rollout_data = query_collection(train_split, judged_ids, full.name, cfg.pseudo_queries, cfg.seed)
    start_rows = args.out / "full" / "step-000000.npz"
    if resume_from is not None:
        index = CorpusIndex.load(index_file(run_dir, read_json(resume_from, STATE)["step"]))
    elif start_rows.is_file():
        index = CorpusIndex(full.doc_ids, load_rows(start_rows), policy.version, encoder_name=policy.name,
                            corpus_fingerprint=full.corpus_fingerprint)
    else:
        start = time.perf_counter()
        index = CorpusIndex.build(full, policy, progress=False)
        log.info("start index: %d documents encoded in %.0f s", len(index), time.perf_counter() - start)
        save_rows(start_rows, index.embeddings, policy.version)
        append_jsonl(args.out / "full_encodes.jsonl", {"step": 0, "seconds": time.perf_counter() - start})
    staleness = cfg.max_staleness if cfg.max_staleness >= 0 else None
    refresh = MeasuredLocalRefresh(cfg.refresh_pool, staleness)
    corpus = Corpus(full, policy, index, refresh)
    task = RetrievalTask(rollout_data, split="all", reward=cfg.reward, top_k=cfg.hard_negatives + 10, corpus=corpus)
    optimizer = build_optimizer(policy.model, cfg.lr, cfg.weight_decay, sft_cfg.embed_token_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, cfg.max_steps))
    probe_rng = np.random.default_rng([cfg.seed, 19])
    probe_ids = sorted(probe_rng.choice(judged_ids, size=min(args.probe_queries, len(judged_ids)), replace=False))
    measurement = Measurement(args.out, None, task, refresh, args.compare_every, [str(q) for q in probe_ids])
    state = GRPOState(cfg, policy, reference, MeasuredTask(task, measurement.score), judged_ids, set(), optimizer,
                      scheduler, True)
    measurement.state = state
    hooks = Hooks(step=measurement.grpo_step, before_checkpoint=partial(save_index, corpus, run_dir),
                  after_checkpoint=partial(keep_index_files, run_dir), postfix=("reward", "loss_kl"))
    trainee = Trainee(policy.model, optimizer, scheduler, policy, layout)
    run(cfg, trainee, hooks, resume_from, "grpo", f"GRPO on {full.name} (refresh fidelity)")


# ---------------------------------------------------------------------------------------------- the summary
def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pooled(records: list[dict]) -> dict:
    """Agreement pooled over several compare steps' records of one setting."""
    ranks = np.concatenate([r["ranks"] for r in records]) if records else np.empty(0)
    truth = np.concatenate([r["truth_ranks"] for r in records]) if records else np.empty(0)
    rewards = np.concatenate([r["rewards"] for r in records])
    truth_rewards = np.concatenate([r["truth_rewards"] for r in records])
    diff = rewards - truth_rewards
    wrong = ranks != truth
    same = not wrong.any()
    return {"reward_mae": float(np.abs(diff).mean()), "reward_bias": float(diff.mean()),
            "exact_ranks": float(1 - wrong.mean()),
            "optimistic": float((ranks[wrong] < truth[wrong]).mean()) if wrong.any() else None,
            "spearman": 1.0 if same else float(spearmanr(ranks, truth)[0]),
            "top10_overlap": float(np.mean([r["top10_overlap"] for r in records])),
            "rows": float(np.mean([r["rows"] for r in records]))}


def summarise(out: Path, args) -> str:
    steps = latest_by_step(read_jsonl(out / "steps.jsonl"))
    comps = [r for r in read_jsonl(out / "comparisons.jsonl") if "setting" in r]
    complete = sorted({r["step"] for r in read_jsonl(out / "comparisons.jsonl") if r.get("complete")})
    comps = [r for r in comps if r["step"] in complete]
    by = {(r["step"], r["batch"], r["setting"]): r for r in comps}  # a re-run's later record wins
    steps_list = [steps[s] for s in sorted(steps)]
    if not steps_list:
        return "(no steps yet)\n"
    n_docs = len(load_rows(out / "full" / "step-000000.npz"))
    lines = [
        f"Setting: GRPO from a {args.sft_steps}-step SFT run with trained documents, {args.queries_per_step} queries "
        f"× {args.group_size} rollouts × {args.reasoning_tokens} reasoning tokens per step, "
        f"`LocalRefresh(pool={args.refresh_pool}, max_staleness={args.max_staleness if args.max_staleness >= 0 else None})`,"
        f" documents truncated to {args.max_doc_tokens} tokens, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, GRPO's defaults otherwise (lr 1e-4 with cosine decay over "
        f"{args.steps} steps, 8 hard negatives). Corpus: {n_docs} documents. Ground truth at steps "
        f"{', '.join(map(str, complete))}: the whole corpus re-encoded by the policy that scored the step's rollouts.",
        "",
        f"### Fidelity of the run's rewards at the compare steps (the step's {args.queries_per_step * args.group_size} "
        "rollouts)",
        "",
        "| step | stale rows before the step | rows re-encoded (relevant / pool / staleness) | mean reward (truth) | "
        "reward MAE | bias | exact rewards | exact ranks | rank Spearman | Kendall | top-10 overlap | probe MAE | "
        "probe exact ranks | full re-encode s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    run_name = next((k[2] for k in by if k[2].endswith("[run]")), None)
    for s in complete:
        r = by.get((s, "rollouts", "run"))
        if r is None:
            continue
        t = steps.get(s, {})
        p = by.get((s, "probe", run_name), {})
        lines.append(
            f"| {s} | {r['stale_rows_before']} | {t.get('rows', '-')} ({t.get('rows_relevant', '-')} / "
            f"{t.get('rows_pool', '-')} / {t.get('rows_staleness', '-')}) | {r['truth_reward']:.4f} | "
            f"{r['reward_mae']:.4f} | {r['reward_bias']:+.4f} | {r['exact_rewards']:.3f} | {r['exact_ranks']:.3f} | "
            f"{r['spearman']:.4f} | {r['kendall']:.4f} | {r['top10_overlap']:.3f} | {fmt(p.get('reward_mae'), 4)} | "
            f"{fmt(p.get('exact_ranks'))} | {r['full_encode_s']:.0f} |")
    diffs = [by[k]["refreshed_row_max_abs_diff"] for k in by if k[1] == "rollouts" and k[2] == "run"]
    lines += ["", f"Rows the run re-encoded at a compare step differ from the full re-encode's by at most "
                  f"{max(diffs):.1e} (batch composition in float32); probe: {args.probe_queries} fixed "
                  f"train queries embedded greedily by the current policy and scored through the run's setting "
                  f"replayed on the index before the step (a one-step counterfactual).", ""]

    lines += ["### Time split of a step (seconds, mean over the steps; the comparison's own time excluded)", "",
              "| steps | step | generation | env scoring (rank + choose rows) | env re-encode: relevant | "
              "pool | staleness bound | update | env share | rows re-encoded (relevant / pool / staleness) | "
              "s per row |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    bound = args.max_staleness if args.max_staleness >= 0 else None

    def window(name, chosen):
        if not chosen:
            return
        m = lambda k: float(np.mean([c[k] for c in chosen]))
        rows = sum(c["rows"] for c in chosen)
        spr = sum(c["reencode_s"] for c in chosen) / rows if rows else float("nan")
        lines.append(
            f"| {name} | {m('step_s'):.1f} | {m('generate_s'):.1f} | {m('scoring_s') + m('select_s'):.2f} | "
            f"{m('reencode_relevant_s'):.1f} | {m('reencode_pool_s'):.1f} | {m('reencode_staleness_s'):.1f} | "
            f"{m('update_s'):.1f} | **{100 * m('env_s') / m('step_s'):.1f} %** | {m('rows'):.0f} "
            f"({m('rows_relevant'):.0f} / {m('rows_pool'):.0f} / {m('rows_staleness'):.0f}) | {spr:.3f} |")

    later = [c for c in steps_list if c["step"] > 0]
    if bound is not None:
        window(f"1–{bound} (before the staleness bound can act)", [c for c in later if c["step"] <= bound])
        window(f"{bound + 1}–{later[-1]['step']}" if later and later[-1]["step"] > bound else "-",
               [c for c in later if c["step"] > bound])
    window(f"all 1–{later[-1]['step']}" if later else "-", later)
    for c in steps_list:
        if c["step"] in complete:
            window(f"{c['step']} (compare step)", [c])
    lines.append("")

    # counterfactual settings, pooled over the compare steps after step 0
    lines += ["### What each refresh setting would cost and give (one-step counterfactuals at the compare steps "
              f"{', '.join(str(s) for s in complete if s > 0)}, rollouts)", "",
              "| setting | rows re-encoded / step | projected env s | projected env share | reward MAE | bias | "
              "exact ranks | optimistic share of wrong ranks | rank Spearman | top-10 overlap | probe MAE | "
              "probe exact ranks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    counter = [s for s in complete if s > 0]
    names = list(dict.fromkeys(k[2] for k in by if k[1] == "rollouts" and k[0] in counter and k[2] != "run"))
    if counter and later:
        rows_total = sum(c["rows"] for c in later)
        spr = sum(c["reencode_s"] for c in later) / rows_total if rows_total else 0.0
        fixed = float(np.mean([c["generate_s"] + c["update_s"] for c in later]))
        scoring = float(np.mean([c["scoring_s"] + c["select_s"] for c in later]))
        for name in names:
            recs = [by[(s, "rollouts", name)] for s in counter if (s, "rollouts", name) in by]
            p = pooled(recs)
            probe_recs = [by[(s, "probe", name)] for s in counter if (s, "probe", name) in by]
            q = pooled(probe_recs) if probe_recs else {}
            rows = p["rows"]
            m = re.match(r"FullRefresh\(every=(\d+)\)", name)
            if m:
                rows = n_docs / int(m.group(1))  # amortised: the whole corpus every N steps
            elif name.startswith("no refresh since"):
                rows = 0.0
            env = scoring + rows * spr
            lines.append(f"| {name} | {rows:.0f} | {env:.1f} | {100 * env / (env + fixed):.1f} % | "
                         f"{p['reward_mae']:.4f} | {p['reward_bias']:+.4f} | {p['exact_ranks']:.3f} | "
                         f"{fmt(p['optimistic'], 2)} | {p['spearman']:.4f} | {p['top10_overlap']:.3f} | "
                         f"{fmt(q.get('reward_mae'), 4)} | {fmt(q.get('exact_ranks'))} |")
        lines += ["", f"Projection: env s = mean scoring and row choice ({scoring:.2f} s) + rows × the run's "
                      f"measured {spr:.3f} s per re-encoded row; share = env / (env + mean generation + update "
                      f"= {fixed:.1f} s). FullRefresh rows are amortised (corpus / N per step) and its fidelity is "
                      f"at its stalest point, just before the next re-encode."]
    return "\n".join(lines) + "\n"


def plot(out: Path, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for _, s in sorted(latest_by_step(read_jsonl(out / "steps.jsonl")).items())]
    comps = [r for r in read_jsonl(out / "comparisons.jsonl") if r.get("batch") == "rollouts"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    x = [s["step"] for s in steps]
    parts = [("generate_s", "generation"), ("update_s", "update"), ("scoring_s", "env scoring"),
             ("reencode_relevant_s", "re-encode: relevant"), ("reencode_pool_s", "re-encode: pool"),
             ("reencode_staleness_s", "re-encode: staleness bound")]
    bottom = np.zeros(len(x))
    for key, label in parts:
        vals = np.array([s[key] + (s["select_s"] if key == "scoring_s" else 0.0) for s in steps])
        axes[0].bar(x, vals, bottom=bottom, label=label)
        bottom += vals
    axes[0].set(xlabel="step", ylabel="seconds", title="time per step")
    axes[0].legend(fontsize=7)
    bottom = np.zeros(len(x))
    for key, label in (("rows_relevant", "relevant"), ("rows_pool", "pool"), ("rows_staleness", "staleness bound")):
        vals = np.array([s[key] for s in steps], dtype=float)
        axes[1].bar(x, vals, bottom=bottom, label=label)
        bottom += vals
    axes[1].set(xlabel="step", ylabel="documents", title="documents re-encoded per step")
    axes[1].legend(fontsize=7)
    settings_seen = list(dict.fromkeys(r["setting"] for r in comps))
    compare_steps = sorted({r["step"] for r in comps if r["step"] > 0})  # step 0 is exact by construction
    width = 0.8 / max(1, len(compare_steps))
    for j, step in enumerate(compare_steps):
        mae = {r["setting"]: r["reward_mae"] for r in comps if r["step"] == step}
        ys = np.arange(len(settings_seen)) + j * width
        axes[2].barh(ys, [mae.get(name, np.nan) for name in settings_seen], height=width, label=f"step {step}")
    axes[2].set_yticks(np.arange(len(settings_seen)) + 0.4 - width / 2, settings_seen, fontsize=6)
    axes[2].invert_yaxis()
    axes[2].set(xlabel="reward MAE vs full re-encode (rollouts)", xscale="log", title="fidelity by refresh setting")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def write_results(results_md: Path, body: str) -> None:
    """Replace the text between the markers of ``results_md`` (appended with them if absent)."""
    text = results_md.read_text() if results_md.is_file() else ""
    block = f"{MARKERS[0]}\n{body}{MARKERS[1]}"
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + block + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_write(results_md, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cranfield"), help="BEIR folder")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face folder")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "grpo-refresh-fidelity", help="run folder (resumes)")
    p.add_argument("--figure", type=Path, default=REPO / "benchmarks" / "results" / "refresh_grpo.png")
    p.add_argument("--results-md", type=Path, default=None, help="write the summary between this file's markers")
    p.add_argument("--summary-only", action="store_true", help="only rewrite the summary, figure and results from "
                                                                "the records (a running run is not disturbed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cache-dir", default=str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                              / "searchr3"), help="model copy and indexes")
    p.add_argument("--max-doc-tokens", type=int, default=48)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    g = p.add_argument_group("SFT (trained documents)")
    g.add_argument("--sft-steps", type=int, default=12)
    g.add_argument("--sft-batch", type=int, default=4)
    g.add_argument("--sft-hard-negatives", type=int, default=2)
    g.add_argument("--sft-mine-depth", type=int, default=30)
    g.add_argument("--sft-lr", type=float, default=1e-3)
    g = p.add_argument_group("GRPO")
    g.add_argument("--steps", type=int, default=31, help="GRPO steps (31: steps 0..30, so step 30 is compared)")
    g.add_argument("--queries-per-step", type=int, default=4)
    g.add_argument("--group-size", type=int, default=8)
    g.add_argument("--reasoning-tokens", type=int, default=8)
    g.add_argument("--refresh-pool", type=int, default=10)
    g.add_argument("--max-staleness", type=int, default=8, help="-1: no bound")
    g.add_argument("--checkpoint-every", type=int, default=5)
    g = p.add_argument_group("comparison")
    g.add_argument("--compare-every", type=int, default=10, help="full re-encode and compare at steps 0, N, 2N ...")
    g.add_argument("--probe-queries", type=int, default=16, help="fixed train queries also compared (0: none)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "full").mkdir(exist_ok=True)
    if not args.summary_only:
        with atomic_write(args.out / "args.json", "w") as f:
            json.dump({k: str(v) for k, v in vars(args).items()}, f, indent=2)
    start = time.perf_counter()
    if not args.summary_only:
        run_sft(args)
        run_grpo(args)
        log.info("SFT + GRPO: %.0f s in this process", time.perf_counter() - start)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout
    body = summarise(args.out, args)
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch threads "
              f"{args.threads}; commit {commit.strip() or '?'}; {time.strftime('%Y-%m-%d %H:%M')}.\n\n")
    with atomic_write(args.out / "summary.md", "w") as f:
        f.write(header + body)
    plot(args.out, args.figure)
    if args.results_md is not None:
        write_results(args.results_md, header + body)
    print(header + body)
    return body


def configure_logging() -> None:
    """The script's own log (not done by ``main``, which tests call in a process whose logging they own)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout,
                        force=True)
    for name in ("searchr3_env.task", "searchr3_env.corpus"):  # "index is stale" is the point here
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    configure_logging()
    main()

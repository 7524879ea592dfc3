"""Refresh policies against the ground truth under simulated RL drift (issue #3's benchmark).

Why a simulation: in Search-R3 the policy that writes query embeddings also
writes the document embeddings, so every optimiser step leaves the cached index
stale. The question is how close each refresh policy's rewards stay to the
exact ones (a full re-encode at every version) and what that costs in document
encodings, on a real >= 10k-document collection.

The simulation:

* Features: all-MiniLM-L6-v2 embeddings of the NPL collection (11,429 docs),
  read from the env's index cache (``load_or_build_index``), and of its queries.
* Encoder: a linear projection 384 -> 128 on top of those features, orthogonal
  at version 0, output L2-normalised; queries and documents share it (one tower,
  as in Search-R3). ``encode_documents`` looks each text's feature up, projects
  it and counts it: that count is the cost every policy is charged.
* Drift: version v+1 = version v after a few AdamW steps of an InfoNCE loss over
  the train split's (query, relevant document) pairs with random corpus
  negatives. The whole weight trajectory is computed once, seeded, before any
  policy runs, so every policy sees exactly the same encoder at every version.
* Steps: at step t the encoder is at version t; a batch of B train queries
  (drawn once with a seeded RNG, the same for every policy) is embedded by it and
  scored through ``RetrievalTask.score`` with the policy under test; then the
  encoder moves to version t+1, as an RL agent's would after its optimiser step.
* Ground truth: the same queries and query embeddings scored against a full
  fresh re-encode of the corpus at every version (computed once, shared).
* Scenarios: one per ``--lr``. By default a steady drift (lr 1e-4: the train
  reward rises over the whole run) and a fast one (lr 1e-2: one version
  moves a document's embedding by ~0.13 in cosine and the train reward saturates
  within ~200 steps), the stress test.

The projection is computed in float64 and rounded to float32, so a document's
embedding does not depend on which batch it was encoded in: a policy that
re-encodes a row gets bit-for-bit the row the ground truth has, and any reward
difference is staleness, not rounding.

Run: ``.venv/bin/python benchmarks/refresh_fidelity.py [--steps 1000] [--data ../shared/data/npl] [--out benchmarks/results]``
(about 7 minutes per scenario on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from searchr3_env import CorpusIndex, RetrievalDataset, RetrievalTask, load_beir, load_or_build_index
from searchr3_env.refresh import FrozenDocuments, FullRefresh, LocalRefresh, encode_locally

REPO = Path(__file__).resolve().parent.parent
GOAL_FEWER = 20  # LocalRefresh must need >= 20x fewer encodings than FullRefresh(every=1)
GOAL_SPEARMAN = 0.95
GOAL_MAE = 0.02


class DriftingProjection:
    """Fixed features times a weight matrix that changes with ``version``: the simulated RL encoder.

    Counts every document encoding in ``encoded``; that is the cost a real
    (LLM) document tower would pay, so it is what the policies are compared on.
    """

    name = "minilm-drift"

    def __init__(self, doc_texts, doc_features, query_texts, query_features, weights):
        self._doc_rows = {t: i for i, t in enumerate(doc_texts)}
        self._query_rows = {t: i for i, t in enumerate(query_texts)}
        self._doc_features = np.asarray(doc_features, dtype=np.float64)
        self._query_features = np.asarray(query_features, dtype=np.float64)
        self.weights = weights  # (versions + 1, in_dim, dim) float32, shared between copies
        self.dim = weights.shape[2]
        self.version = 0
        self.encoded = 0

    def _project(self, features: np.ndarray) -> np.ndarray:
        out = features @ self.weights[self.version].astype(np.float64)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_documents(self, texts):
        self.encoded += len(texts)
        return self._project(self._doc_features[[self._doc_rows[t] for t in texts]])

    def encode_queries(self, texts):
        return self._project(self._query_features[[self._query_rows[t] for t in texts]])


def train_trajectory(
    doc_features: np.ndarray,
    query_features: np.ndarray,
    relevant: np.ndarray,
    *,
    versions: int,
    dim: int,
    lr: float,
    steps_per_version: int = 2,
    pairs_per_step: int = 32,
    negatives: int = 256,
    temperature: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Weights of versions 0..versions: an orthogonal projection, then AdamW steps of InfoNCE.

    ``relevant`` is a (n_queries, n_docs) bool matrix of the training judgements.
    Each step takes a random set of (query, relevant doc) pairs; the candidates
    are the pairs' documents plus random corpus documents, and a query's other
    relevant documents among them are masked out (they are not negatives).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    docs = torch.from_numpy(np.array(doc_features, dtype=np.float32))  # a copy: the cached index is read-only
    queries = torch.from_numpy(np.array(query_features, dtype=np.float32))
    pairs = np.argwhere(relevant)  # (n_pairs, 2): query row, doc row
    weight = torch.nn.init.orthogonal_(torch.empty(docs.shape[1], dim)).requires_grad_()
    optimiser = torch.optim.AdamW([weight], lr=lr, weight_decay=0.01)
    out = np.empty((versions + 1, docs.shape[1], dim), dtype=np.float32)
    out[0] = weight.detach().numpy()
    for v in tqdm(range(1, versions + 1), desc="encoder trajectory", disable=not progress, leave=False):
        for _ in range(steps_per_version):
            q, d = pairs[rng.choice(len(pairs), size=min(pairs_per_step, len(pairs)), replace=False)].T
            candidates = np.concatenate([d, rng.choice(len(docs), size=min(negatives, len(docs)), replace=False)])
            q_emb = torch.nn.functional.normalize(queries[q] @ weight, dim=1)
            c_emb = torch.nn.functional.normalize(docs[candidates] @ weight, dim=1)
            logits = q_emb @ c_emb.T / temperature
            target = torch.arange(len(q))
            false_negative = torch.from_numpy(relevant[q][:, candidates])
            false_negative[target, target] = False
            loss = torch.nn.functional.cross_entropy(logits.masked_fill(false_negative, -torch.inf), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        out[v] = weight.detach().numpy()
    return out


@dataclass
class Scores:
    """What one pass over the steps produced (the ground truth or a policy)."""

    rewards: np.ndarray  # (steps, B)
    ranks: np.ndarray  # (steps, B, m), 0 = padding
    encodings: int
    seconds: float
    never_reencoded: float  # share of index rows still written by version 0 after the last step


def make_task(dataset: RetrievalDataset, encoder: DriftingProjection, embeddings: np.ndarray, policy) -> RetrievalTask:
    """A train-split task over an index of ``embeddings`` written by the encoder's current version."""
    index = CorpusIndex(dataset.doc_ids, embeddings, encoder.version, encoder_name=encoder.name)
    return RetrievalTask(dataset, encoder=encoder, index=index, split="train", refresh=policy)


def run_steps(task: RetrievalTask, batches: np.ndarray, query_emb: np.ndarray, bar, every_step=None) -> Scores:
    """Score ``batches[t]`` at encoder version t for every step t; ``every_step(t)`` runs before scoring."""
    steps, batch = batches.shape
    rewards = np.empty((steps, batch))
    ranks = np.empty((steps, batch, task.rel_positions.shape[1]), dtype=np.int64)
    encoder = task.encoder
    encoder.encoded = 0
    start = time.perf_counter()
    for t in range(steps):
        encoder.version = t
        if every_step is not None:
            every_step(t)
        scored = task.score([task.query_ids[i] for i in batches[t]], query_emb[t])
        rewards[t], ranks[t] = scored.rewards, scored.ranks
        bar.update()
    seconds = time.perf_counter() - start
    return Scores(rewards, ranks, encoder.encoded, seconds, float((task.index.versions == 0).mean()))


def ground_truth(dataset, encoder, batches, bar) -> tuple[Scores, np.ndarray]:
    """Exact scores (a full fresh re-encode at every version) and the query embeddings every policy reuses."""
    task = make_task(dataset, encoder, encode_locally(encoder, dataset.document_texts()), FrozenDocuments())
    texts = [[task.query_text(task.query_ids[i]) for i in row] for row in batches]
    query_emb = np.empty((*batches.shape, encoder.dim), dtype=np.float32)
    all_rows = np.arange(len(task.index))

    def re_encode(t):
        if t:
            task.index.update(all_rows, encode_locally(encoder, task.doc_texts), t)
        query_emb[t] = encoder.encode_queries(texts[t])

    # The queries must exist before run_steps scores them, so compute them in the hook too.
    truth = run_steps(task, batches, query_emb, bar, every_step=re_encode)
    return truth, query_emb


def fidelity(policy: Scores, truth: Scores) -> dict[str, float]:
    """Reward error and rank agreement of one policy against the ground truth.

    ``mae_early`` is the error over the first 10% of steps, where the encoder
    learns fastest and so drifts fastest; a long run's average can hide it.
    ``optimistic`` is the share of wrong ranks that are better than the truth:
    the signature of stale rows that should outrank a relevant document but
    are scored too low to be noticed.
    """
    err = policy.rewards - truth.rewards
    valid = truth.ranks > 0
    mine, exact = policy.ranks[valid], truth.ranks[valid]
    wrong = mine != exact
    rho = spearmanr(mine, exact).statistic
    return {
        "mae": float(np.abs(err).mean()),
        "mae_early": float(np.abs(err[: max(1, len(err) // 10)]).mean()),
        "bias": float(err.mean()),
        "max_err": float(np.abs(err).max()),
        "spearman": float(rho),
        "exact_steps": float((err == 0).all(axis=1).mean()),
        "exact_ranks": float(1 - wrong.mean()),
        "optimistic": float((mine[wrong] < exact[wrong]).mean()) if wrong.any() else float("nan"),
        "never_reencoded": policy.never_reencoded,
    }


def summarise(results: dict[str, Scores], truth: Scores) -> dict[str, dict]:
    """One table row per policy: its cost and its fidelity."""
    return {label: {"encodings": r.encodings, "seconds": r.seconds, **fidelity(r, truth)}
            for label, r in results.items()}


def drift_summary(dataset, encoder: DriftingProjection, versions) -> list[dict[str, float]]:
    """Fresh-index statistics of all train queries at each of ``versions``, compared with version 0.

    This is the evidence that the simulated drift matters: how far rewards,
    ranks, top-10 lists and document embeddings move from the first version.
    """
    rows, first = [], None
    for v in versions:
        encoder.version = v
        task = make_task(dataset, encoder, encode_locally(encoder, dataset.document_texts()), FrozenDocuments())
        scored = task.score(task.query_ids, encoder.encode_queries([task.query_text(i) for i in task.query_ids]))
        emb = task.index.embeddings
        first = first or (scored, emb)
        valid = scored.grades > 0
        overlap = [len(set(a) & set(b)) / task.top_k for a, b in zip(first[0].top_positions, scored.top_positions)]
        rows.append({
            "version": v,
            "reward": float(scored.rewards.mean()),
            "ndcg10": float(scored.ndcg10.mean()),
            "median_rank": float(np.median(scored.ranks[valid])),
            "rank_spearman": float(spearmanr(first[0].ranks[valid], scored.ranks[valid]).statistic),
            "top10_overlap": float(np.mean(overlap)),
            "doc_cosine": float((first[1] * emb).sum(axis=1).mean()),
        })
    encoder.version = 0
    return rows


def policies() -> list[tuple[str, object]]:
    """Every policy measured, with its table label (fresh objects: policies keep state)."""
    out = [("FrozenDocuments", FrozenDocuments())]
    out += [(f"FullRefresh(every={n})", FullRefresh(every=n)) for n in (1, 5, 20, 50, 100, 200)]
    for staleness in (None, 50):
        out += [
            (f"LocalRefresh(pool={c}, max_staleness={staleness})", LocalRefresh(pool=c, max_staleness=staleness))
            for c in (16, 32, 64, 128)
        ]
    out.append(("LocalRefresh(pool=100, max_staleness=8) [env default]", LocalRefresh()))
    return out


def machine() -> str:
    """CPU model and core count, from lscpu and nproc."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")]
        model = names[0] if names else "?"
        cores = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        model, cores = platform.processor() or platform.machine(), "?"
    return f"{model}, nproc = {cores} ({platform.system()} {platform.machine()}, Python {platform.python_version()})"


def load_features(data: Path, cache_dir: Path):
    """(dataset, MiniLM document features aligned with its doc ids, every query text, their MiniLM features)."""
    from searchr3_env import MiniLMEncoder

    dataset = load_beir(data)
    minilm = MiniLMEncoder()
    index = load_or_build_index(dataset, minilm, cache_dir)  # another process may have built it: reused
    if index.doc_ids != dataset.doc_ids:
        raise RuntimeError("cached MiniLM index rows are not in corpus order")
    query_texts = list(dict.fromkeys(dataset.queries.values()))
    return dataset, index.embeddings, query_texts, minilm.encode_queries(query_texts)


@contextmanager
def one_thread():
    """Run BLAS, FAISS and torch on one thread each.

    Every product here is small (a few queries against the corpus, a 32-pair
    InfoNCE batch); on two cores shared with other jobs a second thread does not
    help them, and a spinning OpenMP/OpenBLAS pool slows a 4-query FAISS search
    from ~0.05 ms to ~20 ms, which would swamp what the policies cost.
    """
    faiss_threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(faiss_threads)
        torch.set_num_threads(torch_threads)


def simulate(dataset, doc_features, query_texts, query_features, *, steps, batch, dim, lr, seed, policy_list,
             progress=True):
    """Run the ground truth and every policy; returns (truth, {label: Scores}, drift summary rows)."""
    with one_thread():
        train = dataset.split("train")
        train_ids = train.judged_query_ids
        doc_pos = {d: i for i, d in enumerate(dataset.doc_ids)}
        query_rows = {t: i for i, t in enumerate(query_texts)}
        relevant = np.zeros((len(train_ids), len(doc_pos)), dtype=bool)
        for i, q in enumerate(train_ids):
            relevant[i, [doc_pos[d] for d in train.relevant(q)]] = True
        train_features = np.asarray(query_features)[[query_rows[train.queries[q]] for q in train_ids]]
        weights = train_trajectory(doc_features, train_features, relevant, versions=steps, dim=dim, lr=lr, seed=seed,
                                   progress=progress)

        def encoder():
            return DriftingProjection(dataset.document_texts(), doc_features, query_texts, query_features, weights)

        drift = drift_summary(dataset, encoder(), sorted({0, 1, min(10, steps), min(100, steps), steps}))
        batches = np.random.default_rng(seed).integers(len(train_ids), size=(steps, batch))
        results = {}
        with tqdm(total=steps * (1 + len(policy_list)), desc="ground truth", disable=not progress) as bar:
            truth, query_emb = ground_truth(dataset, encoder(), batches, bar)
            initial = encode_locally(encoder(), dataset.document_texts())  # version 0, not charged to any policy
            for label, policy in policy_list:
                bar.set_description(label)
                results[label] = run_steps(make_task(dataset, encoder(), initial, policy), batches, query_emb, bar)
        return truth, results, drift


def full_refresh_at(budget: float, rows: dict[str, dict], key: str) -> float:
    """A FullRefresh(every=N) metric at ``budget`` encodings, interpolated in log(budget) between measured N.

    FullRefresh only comes in whole-corpus steps, so "FullRefresh at the same
    budget" as a LocalRefresh configuration is read off the line through its
    measured points (clamped at the ends).
    """
    points = sorted(
        (r["encodings"], r[key]) for label, r in rows.items() if label.startswith("FullRefresh") and r["encodings"]
    )
    xs, ys = zip(*points)
    return float(np.interp(np.log(budget), np.log(xs), ys))


def goal_lines(rows: dict[str, dict]) -> list[str]:
    """Pass/fail of issue #3's goals for every LocalRefresh configuration, as a markdown table."""
    full1 = rows["FullRefresh(every=1)"]["encodings"]
    full_budgets = [r["encodings"] for label, r in rows.items() if label.startswith("FullRefresh") and r["encodings"]]
    lines = [
        f"| LocalRefresh config | >= {GOAL_FEWER}x fewer encodings than Full(1) | rank Spearman >= {GOAL_SPEARMAN} "
        f"| MAE <= {GOAL_MAE} | all three | FullRefresh at the same budget: Spearman / MAE "
        f"| LocalRefresh better on both | (not a goal) MAE early <= {GOAL_MAE} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        if not label.startswith("LocalRefresh"):
            continue
        budget = max(r["encodings"], 1)
        checks = [full1 / budget >= GOAL_FEWER, r["spearman"] >= GOAL_SPEARMAN, r["mae"] <= GOAL_MAE]
        mark = ["pass" if c else "**fail**" for c in checks]
        rho, mae = (full_refresh_at(budget, rows, key) for key in ("spearman", "mae"))
        inside = min(full_budgets) <= budget <= max(full_budgets)
        beats = r["spearman"] > rho and r["mae"] < mae
        lines.append(
            f"| {label} | {full1 / budget:.1f}x: {mark[0]} | {r['spearman']:.4f}: {mark[1]} "
            f"| {r['mae']:.4f}: {mark[2]} | {'pass' if all(checks) else '**fail**'} "
            f"| {rho:.4f} / {mae:.4f}{'' if inside else ' (outside the measured range)'} "
            f"| {'yes' if beats else '**no**'} "
            f"| {r['mae_early']:.4f}: {'yes' if r['mae_early'] <= GOAL_MAE else 'no'} |"
        )
    return lines


def reading(rows: dict[str, dict]) -> list[str]:
    """A few sentences computed from the rows: what passed, where LocalRefresh errs, and which way."""
    full1 = rows["FullRefresh(every=1)"]["encodings"]
    local = {k: r for k, r in rows.items() if k.startswith("LocalRefresh")}
    full = {k: r for k, r in rows.items() if k.startswith("FullRefresh") and r["encodings"] < full1}
    passed = [k for k, r in local.items() if full1 / max(r["encodings"], 1) >= GOAL_FEWER
              and r["spearman"] >= GOAL_SPEARMAN and r["mae"] <= GOAL_MAE]
    beats = [k for k, r in local.items() if r["spearman"] > full_refresh_at(max(r["encodings"], 1), rows, "spearman")
             and r["mae"] < full_refresh_at(max(r["encodings"], 1), rows, "mae")]
    early_ok = [k for k, r in local.items() if r["mae_early"] <= GOAL_MAE]
    early_beats = [k for k, r in local.items()
                   if r["mae_early"] < full_refresh_at(max(r["encodings"], 1), rows, "mae_early")]
    worst_early = max(local, key=lambda k: local[k]["mae_early"])

    def spread(group, key, fmt=".2f"):
        values = [r[key] for r in group.values() if not np.isnan(r[key])]
        return f"{min(values):{fmt}} to {max(values):{fmt}}"

    return [
        f"Reading: {len(passed)} of {len(local)} LocalRefresh configurations meet all three goals over the run and "
        f"{len(beats)} of {len(local)} beat FullRefresh at the same budget on both Spearman and MAE. FrozenDocuments' "
        f"MAE is {rows['FrozenDocuments']['mae']:.4f}: the drift matters. Over the first 10% of steps, where the "
        f"encoder changes fastest, {len(early_ok)} of {len(local)} LocalRefresh configurations keep MAE <= "
        f"{GOAL_MAE} (worst: {worst_early}, {local[worst_early]['mae_early']:.4f}), and {len(early_beats)} of "
        f"{len(local)} have a lower early MAE than FullRefresh at the same budget. LocalRefresh's wrong ranks are "
        f"optimistic in {spread(local, 'optimistic')} of cases (FullRefresh(every>1): {spread(full, 'optimistic')}); "
        f"its reward bias is {spread(local, 'bias', '+.4f')} (FullRefresh(every>1): {spread(full, 'bias', '+.4f')}). "
        "Why optimistic: LocalRefresh picks the rows to re-encode by their "
        "*stale* scores, so a stale row whose fresh score would beat a relevant document, but whose stale score "
        "does not, is neither in the pool nor among the rows `max_staleness` refreshes, and the relevant document "
        "is ranked too high.",
        "",
    ]


@dataclass
class Scenario:
    """One drift setting's results: per-policy rows, the drift summary and the ground truth."""

    lr: float
    rows: dict[str, dict]
    drift: list[dict[str, float]]
    truth: Scores


def scenario_section(sc: Scenario, args) -> list[str]:
    """Markdown for one scenario: how much the encoder drifts, the fidelity table, the goals."""
    per_k = 1000 / args.steps
    full1 = sc.rows["FullRefresh(every=1)"]
    full1_exact = full1["exact_steps"] == 1.0 and full1["exact_ranks"] == 1.0

    def fewer(r):
        return f"{full1['encodings'] / r['encodings']:.1f}" if r["encodings"] else "-"

    def share(x):
        return "-" if np.isnan(x) else f"{x:.2f}"

    return [
        f"## Scenario lr = {sc.lr:g}",
        "",
        "### How much the encoder drifts",
        "",
        "Fresh index, all train queries, each version compared with version 0:",
        "",
        "| version | mean reward (nDCG) | mean nDCG@10 | median rank of a relevant doc | rank Spearman vs v0 "
        "| top-10 overlap vs v0 | mean doc cosine vs v0 |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {d['version']} | {d['reward']:.4f} | {d['ndcg10']:.4f} | {d['median_rank']:.0f} "
            f"| {d['rank_spearman']:.3f} | {d['top10_overlap']:.2f} | {d['doc_cosine']:.3f} |"
            for d in sc.drift
        ),
        "",
        f"Mean ground-truth reward over the steps: {sc.truth.rewards.mean():.4f} (first 10% of steps: "
        f"{sc.truth.rewards[: max(1, args.steps // 10)].mean():.4f}).",
        "",
        "### Fidelity against the ground truth",
        "",
        "| policy | encodings / 1k steps | x fewer than Full(1) | wall s / 1k steps | MAE | MAE early | bias "
        "| max err | rank Spearman | exact steps | exact ranks | optimistic | never re-encoded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {r['encodings'] * per_k:,.0f} | {fewer(r)} | {r['seconds'] * per_k:.1f} | {r['mae']:.4f} "
            f"| {r['mae_early']:.4f} | {r['bias']:+.4f} | {r['max_err']:.3f} | {r['spearman']:.4f} "
            f"| {r['exact_steps']:.3f} | {r['exact_ranks']:.3f} | {share(r['optimistic'])} "
            f"| {r['never_reencoded']:.2f} |"
            for label, r in sc.rows.items()
        ),
        "",
        f"Check: FullRefresh(every=1) equals the ground truth at every step: {'yes' if full1_exact else '**NO**'}.",
        "",
        "### Goals",
        "",
        *goal_lines(sc.rows),
        "",
        *reading(sc.rows),
    ]


def write_markdown(path: Path, scenarios: list[Scenario], args, command: str, total_seconds: float) -> None:
    """The results page: the set-up, the column legend, then one section per scenario."""
    truth = scenarios[0].truth
    lines = [
        "# Refresh policies under simulated RL drift (issue #3)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; whole run {total_seconds / 60:.1f} min "
        "(the CPUs are shared with other jobs, so wall times are indicative).",
        "",
        "Simulation (module docstring of `benchmarks/refresh_fidelity.py`): MiniLM features of "
        f"`{args.data.name}` projected to {args.dim} dims by a linear layer; each version is 2 AdamW steps of "
        f"InfoNCE on the train split's judgements. {args.steps:,} steps of {args.batch} train queries each, "
        "encoder version t at step t. Ground truth: a full fresh re-encode at every version, scored with the "
        "same queries and query embeddings. Reward: the env's default (full-depth nDCG). Ranks: the "
        "pessimistic ranks of every relevant document of the scored queries, pooled over all steps "
        f"({int((truth.ranks > 0).sum()):,} pairs). The version-0 index is built once, before step 0, and "
        "charged to no policy.",
        "",
        "Columns: encodings and wall time per 1,000 steps (wall time: all `task.score` calls, refreshes "
        "included; the simulated encoder is a cheap projection, so encodings, not seconds, are the cost that "
        "carries over to an LLM document tower). MAE / bias: mean absolute / signed reward error (policy - "
        "truth); MAE early: over the first 10% of steps, where the encoder changes fastest. Exact steps: share "
        f"of steps whose {args.batch} rewards all equal the truth's bit for bit; exact ranks: share of "
        "relevant-document ranks equal to the truth's; optimistic: share of the wrong ranks that are better "
        "than the truth's; never re-encoded: share of the corpus still at version 0 after the last step. "
        "\"FullRefresh at the same budget\" interpolates the measured FullRefresh(every=N) points in "
        "log(encodings).",
        "",
    ]
    for sc in scenarios:
        lines += scenario_section(sc, args)
    path.write_text("\n".join(lines))


def plot(path: Path, scenarios: list[Scenario], steps: int, title: str) -> None:
    """Per scenario, 1 - rank Spearman and MAE against encodings per 1,000 steps, all on log axes.

    Both panels show a disagreement (lower is better) on a symlog axis: the
    policies worth choosing between differ in the third decimal, while
    FrozenDocuments (0 encodings, a dashed line) sits far away; exact policies
    (FullRefresh(every=1)) land on 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_k = 1000 / steps
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 4.8 * len(scenarios) + 0.8), squeeze=False)
    groups = {  # legend label: (substring of the policy label, colour, marker, label offset)
        "FullRefresh(every=N)": ("FullRefresh", "tab:blue", "s", (4, 5)),
        "LocalRefresh(pool=C, max_staleness=None)": ("max_staleness=None", "tab:orange", "o", (4, 5)),
        "LocalRefresh(pool=C, max_staleness=50)": ("max_staleness=50", "tab:green", "^", (4, -11)),
        "LocalRefresh(pool=100, max_staleness=8), the env default": ("env default", "tab:purple", "*", (4, 5)),
    }
    for row, sc in zip(axes, scenarios):
        panels = (
            (row[0], lambda r: 1 - r["spearman"], "1 - rank Spearman vs truth", 1 - GOAL_SPEARMAN, 1e-4),
            (row[1], lambda r: r["mae"], "mean |reward error| vs truth", GOAL_MAE, 1e-4),
        )
        for ax, value, heading, goal, linthresh in panels:
            for name, (match, color, marker, offset) in groups.items():
                members = sorted(
                    (r["encodings"] * per_k, value(r), label)
                    for label, r in sc.rows.items()
                    if match in label and r["encodings"]
                )
                if not members:
                    continue
                xs, ys, labels = zip(*members)
                ax.plot(xs, ys, marker=marker, color=color, label=name, markersize=11 if marker == "*" else 6)
                if len(members) > 1:
                    for x, y, label in zip(xs, ys, labels):
                        tag = label.split("(")[1].split(",")[0].rstrip(")")  # "every=5" / "pool=16"
                        ax.annotate(tag, (x, y), textcoords="offset points", xytext=offset, fontsize=7, color=color)
            ax.axhline(value(sc.rows["FrozenDocuments"]), color="tab:red", linestyle="--",
                       label="FrozenDocuments (0 encodings)")
            ax.axhline(goal, color="grey", linestyle=":", label="goal (Spearman 0.95 / MAE 0.02)")
            ax.set_xscale("log")
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.set_ylim(0, 2 * max(value(r) for r in sc.rows.values()))  # headroom above FrozenDocuments
            ax.set_xlabel("document encodings per 1,000 steps (log scale)")
            ax.set_title(f"drift lr {sc.lr:g}: {heading} (symlog; lower is better)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07 / len(scenarios), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from agents.config import user_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="env steps (= encoder versions) per policy")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "npl", help="BEIR folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for refresh.md and the plot")
    parser.add_argument("--batch", type=int, default=4, help="train queries scored per step")
    parser.add_argument("--dim", type=int, default=128, help="output dim of the drifting projection")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-2],
                        help="AdamW learning rate of the drift, one scenario each (default: steady and fast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=user_cache_dir(), help="MiniLM index cache")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    dataset, doc_features, query_texts, query_features = load_features(args.data, args.cache_dir)
    scenarios = []
    for lr in args.lr:
        truth, results, drift = simulate(
            dataset, doc_features, query_texts, query_features, steps=args.steps, batch=args.batch, dim=args.dim,
            lr=lr, seed=args.seed, policy_list=policies(), progress=not args.no_progress,
        )
        scenarios.append(Scenario(lr, summarise(results, truth), drift, truth))
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", *sys.argv])
    write_markdown(args.out / "refresh.md", scenarios, args, command, time.perf_counter() - start)
    title = f"Refresh policies on {dataset.name} ({len(dataset.corpus):,} docs), {args.steps:,} steps of drift"
    plot(args.out / "refresh_fidelity.png", scenarios, args.steps, title)
    print((args.out / "refresh.md").read_text())


if __name__ == "__main__":
    main()

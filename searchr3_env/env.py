"""``RetrievalEnv``: one query per episode, the action is its embedding, the reward its ranking."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from .task import RetrievalTask

RENDER_MODES = ("ansi",)


class UnsupportedRenderMode(ValueError, TypeError):
    """A render mode the env does not have.

    Also a ``TypeError`` because Stable-Baselines3's ``make_vec_env`` asks for
    ``render_mode="rgb_array"`` and retries without it only on ``TypeError``.
    """


def check_reset_options(options: dict[str, Any] | None, allowed: tuple[str, ...], env: str) -> dict[str, Any]:
    """``options`` (``{}`` for None), refusing keys ``env`` would otherwise silently ignore."""
    options = options or {}
    if "query_ids" in options and "query_ids" not in allowed:
        raise ValueError(
            f"{env} runs one query per episode and cannot take options['query_ids']; pin one query with "
            "options={'query_id': qid}, or pin one per env in the vector env: "
            "gymnasium.make_vec('SearchR3-v0', num_envs=N) and reset(options={'query_ids': [...]})"
        )
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{env}.reset: unknown option(s) {unknown}; the options are {list(allowed)}")
    return options


class RetrievalEnv(gym.Env):
    """Search as a one-step decision: read a query, answer with its embedding.

    ## Description
    Search-R3 trains an LLM to reason about a query and then emit an embedding
    for it. This environment is the retrieval half of that loop: it holds a
    document collection with human (or synthetic) relevance judgements and a
    versioned FAISS index of document embeddings, shows the agent a query, and
    rewards the embedding the agent returns by where the query's relevant
    documents land when the whole corpus is ranked by inner product.

    ## Action Space
    ``Box(-1, 1, (dim,), float32)``: the query embedding, where ``dim`` is the
    index's dimension (4096 with the default hashing document encoder). Only the
    direction counts: vectors of any finite non-zero scale (1e-30 as well as
    1e30, float32 or float64) are normalised before scoring and rank alike; a
    wrong shape or a non-float dtype, NaN/inf, or an exactly zero vector raises
    ``ValueError`` naming the query.

    ## Observation Space
    ``Text``: the query string, exactly as in the collection (no truncation). Its
    ``max_length`` is the longest query of the collection and its ``charset`` is
    every character the collection's queries use. Gymnasium's ``AsyncVectorEnv``
    needs ``shared_memory=False`` for it (its shared memory cannot carry Text);
    without it construction fails and says so.

    ## Rewards
    A named function of the relevant documents' exact ranks over the full corpus
    (rank = number of documents scoring >= the document, so ties count against
    the agent), using the graded judgements: ``ndcg`` (full-depth nDCG, the
    default, in [0, 1]), ``reciprocal_rank``, ``neg_log_rank`` or ``recall@K``;
    or any callable ``(ranks, grades) -> rewards`` over ``(n, m)`` arrays.

    ## Starting State
    ``reset`` draws a query uniformly from the judged queries of the chosen split
    with the env's seeded RNG (same seed, same queries, same rewards), or pins one
    with ``options={"query_id": qid}`` (GRPO groups, evaluation sweeps). Any
    other option raises ``ValueError``; to pin one query per env, use the vector
    env (``gymnasium.make_vec("SearchR3-v0", num_envs=N)``, ``options={"query_ids": [...]}``).

    ## Episode End
    The episode terminates after one step. ``info`` then holds ``query_id``,
    ``relevant_ids`` with their ``ranks`` and ``grades``, ``top_k_ids`` and
    ``top_k_scores``, ``ndcg@10``, and what keeping the index fresh cost:
    ``docs_reencoded``, ``encoder_version``, ``oldest_row_version`` (stalest row
    among the top-k and relevant documents), ``index_version`` and
    ``snapshot_id``. Stepping again without ``reset`` raises ``RuntimeError``.

    ## Arguments
    - ``dataset``: a ``RetrievalDataset``, a BEIR folder path, or ``"synthetic"``
      (default: the built-in synthetic collection).
    - ``encoder``: the document encoder (follows the encoder protocol); default a
      ``HashingEncoder`` fitted to the corpus.
    - ``index``: a ``CorpusIndex`` or a saved index path; default: built by
      encoding the corpus with ``encoder``. The env pickles (Ray,
      multiprocessing); an index loaded from a file travels as its path.
    - ``reward``: see Rewards (default ``"ndcg"``).
    - ``split``: ``"train"`` (default), ``"test"`` or ``"all"``: the deterministic
      query split by hashed query id.
    - ``top_k``: how many top document ids ``info`` reports (default 10).
    - ``refresh``: how stale document rows are re-encoded when the document
      encoder's ``version`` grows: ``"local"`` (default, ``LocalRefresh()``),
      ``"full"``, ``"frozen"``, or a policy object from ``searchr3_env.refresh``.
      With an encoder whose weights never change (the default) nothing is ever
      re-encoded.
    - ``corpus``: a ``searchr3_env.corpus.Corpus`` to score against (then
      ``encoder``, ``index`` and ``refresh`` are the corpus's own). Without it,
      envs made from the same arguments (the sub-envs of one ``make_vec``)
      share one corpus, so a refresh or a full swap reaches all of them.
    - ``render_mode``: ``None`` or ``"ansi"`` (a text summary of the last step);
      any other raises ``UnsupportedRenderMode``, both a ``ValueError`` and a
      ``TypeError`` (so Stable-Baselines3's ``make_vec_env`` falls back to none).

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 1}

    def __init__(self, render_mode: str | None = None, task: RetrievalTask | None = None, **task_kwargs: Any):
        """``task_kwargs`` are ``RetrievalTask``'s (see Arguments); ``task`` shares an existing one."""
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise UnsupportedRenderMode(f"render_mode must be None or one of {list(RENDER_MODES)}, got {render_mode!r}")
        self.render_mode = render_mode
        self.task = task or RetrievalTask(**task_kwargs)
        self.observation_space = self.task.observation_space
        self.action_space = self.task.action_space
        self._query_id: str | None = None
        self._last_info: dict[str, Any] | None = None

    @property
    def index(self):
        return self.task.index

    @property
    def dataset(self):
        return self.task.dataset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = check_reset_options(options, ("query_id",), "RetrievalEnv")
        if options.get("query_id") is not None:
            self._query_id = self.task.check_query_id(options["query_id"])
        else:
            ids = self.task.query_ids
            self._query_id = ids[int(self.np_random.integers(len(ids)))]
        self._last_info = None
        return self.task.query_text(self._query_id), {"query_id": self._query_id}

    def step(self, action):
        if self._query_id is None:
            raise RuntimeError("call reset() before step(): the episode has ended or not started")
        embedding = self.task.check_actions(action, [self._query_id], batched=False)
        scored = self.task.score([self._query_id], embedding)
        info = self.task.info_row(self._query_id, scored, 0)
        obs = self.task.query_text(self._query_id)
        self._query_id, self._last_info = None, info
        return obs, float(scored.rewards[0]), True, False, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        if self._last_info is None:
            return f"query {self._query_id}: {self.task.query_text(self._query_id)!r}" if self._query_id else ""
        info = self._last_info
        ranks = ", ".join(f"{d}@{r}" for d, r in zip(info["relevant_ids"], info["ranks"]))
        return f"query {info['query_id']}: nDCG@10={info['ndcg@10']:.3f}; relevant ranks: {ranks}"

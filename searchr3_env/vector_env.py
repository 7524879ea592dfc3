"""Native batched ``RetrievalVectorEnv``: ``num_envs`` queries scored with one matrix product.

``gymnasium.make_vec("SearchR3-v0", num_envs=N)`` returns it. Episodes last one
step, so it resets in the *same* step (``AutoresetMode.SAME_STEP``): every call
to ``step`` scores all N embeddings and returns the next N queries, and the
scored episode's observation and info are in ``info["final_obs"]`` and
``info["final_info"]``. No step is wasted on a reset, which matters for GRPO,
where every step is a group of rollouts. Gymnasium's own ``SyncVectorEnv`` and
``AsyncVectorEnv`` work on ``RetrievalEnv`` too; async needs
``vector_kwargs={"shared_memory": False}`` (Gymnasium cannot pass Text through
shared memory) and says so at construction without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .env import UnsupportedRenderMode, check_reset_options
from .task import RetrievalTask


class RetrievalVectorEnv(VectorEnv):
    """``num_envs`` independent one-query episodes sharing one index (see ``RetrievalEnv``).

    ``reset(options={"query_id": q})`` pins every env to query ``q`` (a GRPO
    group); ``options={"query_ids": [...]}`` pins each env separately.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, task: RetrievalTask | None = None, **task_kwargs: Any):
        """``task_kwargs`` are ``RetrievalTask``'s (as for ``RetrievalEnv``); ``task`` shares an existing one."""
        if task_kwargs.pop("render_mode", None) is not None:
            raise UnsupportedRenderMode("RetrievalVectorEnv does not render: pass render_mode=None")
        task_kwargs.pop("max_episode_steps", None)  # passed by make_vec; episodes are one step anyway
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.task = task or RetrievalTask(**task_kwargs)
        self.single_observation_space = self.task.observation_space
        self.single_action_space = self.task.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._query_ids: list[str] | None = None

    @property
    def index(self):
        return self.task.index

    def _draw(self, n: int) -> list[str]:
        ids = self.task.query_ids
        return [ids[i] for i in self.np_random.integers(len(ids), size=n)]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = check_reset_options(options, ("query_id", "query_ids"), "RetrievalVectorEnv")
        if options.get("query_ids") is not None:
            pinned = list(options["query_ids"])
            if len(pinned) != self.num_envs:
                raise ValueError(f"options['query_ids'] has {len(pinned)} ids for {self.num_envs} envs")
            self._query_ids = [self.task.check_query_id(q) for q in pinned]
        elif options.get("query_id") is not None:
            self._query_ids = [self.task.check_query_id(options["query_id"])] * self.num_envs
        else:
            self._query_ids = self._draw(self.num_envs)
        return self._observations(self._query_ids), {"query_id": np.array(self._query_ids, dtype=object)}

    def _observations(self, query_ids: list[str]) -> tuple[str, ...]:
        return tuple(self.task.query_text(q) for q in query_ids)

    def step(self, actions):
        if self._query_ids is None:
            raise RuntimeError("call reset() before step()")
        embeddings = self.task.check_actions(actions, self._query_ids)
        scored_ids = self._query_ids
        scored = self.task.score(scored_ids, embeddings)
        final_obs = self._observations(self._query_ids)
        self._query_ids = self._draw(self.num_envs)
        infos: dict[str, Any] = {}
        for i, q in enumerate(final_obs):  # Gymnasium's own batching of per-env info dicts
            row = {"final_obs": q, "final_info": self.task.info_row(scored_ids[i], scored, i)}
            infos = self._add_info(infos, row | {"query_id": self._query_ids[i]}, i)
        n = self.num_envs
        return (
            self._observations(self._query_ids),
            scored.rewards.astype(np.float64),
            np.ones(n, dtype=bool),
            np.zeros(n, dtype=bool),
            infos,
        )

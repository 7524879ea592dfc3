"""``ResidualEmbedding``: the env in the form vector-observation RL libraries (Stable-Baselines3) expect."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .encoders import Encoder


class ResidualEmbedding(gym.Wrapper):
    """Query text in, embedding out, for policies that read and write vectors.

    Libraries such as Stable-Baselines3 build their policies from Box
    observations and cannot take ``SearchR3-v0``'s Text ones, and a policy that
    has to write a whole embedding from scratch starts near the random-vector
    floor. This wrapper fixes both with one frozen encoder ``enc``: the policy
    sees ``enc(query)`` and answers with a correction to it, so at zero action it
    already retrieves as well as the encoder does and learns from there.

    ## Observation Space
    ``Box(-1, 1, (enc.dim,), float32)``: ``enc.encode_queries([query])[0]``, a
    unit vector (zero for a query with no indexable word).

    ## Action Space
    ``Box(-1, 1, (dim,), float32)``, the env's embedding dimension: a residual
    ``a``. The env is stepped with ``normalise(enc(query) + residual_scale * a)``;
    ``a = 0`` is the encoder's own embedding. ``a`` with unit-variance entries
    (a fresh Gaussian policy's noise) has length about ``sqrt(dim)``, so the
    default ``residual_scale = 1 / sqrt(dim)`` lets it move the embedding by about
    the embedding's own length: far enough to explore, not so far that the
    starting policy loses what the encoder retrieves.

    Rewards, termination and ``info`` are the env's, unchanged.

    ## Arguments
    - ``env``: a ``SearchR3-v0`` env (any wrappers around it).
    - ``residual_scale``: ``s`` in the formula above, > 0 (default ``1 / sqrt(dim)``).
    - ``encoder``: follows the encoder protocol and has the env's dimension, so
      that its query vectors live in the space the documents are indexed in;
      default the env's own document encoder. It must be frozen (its
      ``version`` never grows): a policy cannot learn from observations that
      drift under it, so a grown version raises ``RuntimeError`` at ``reset``.
    """

    def __init__(self, env: gym.Env, residual_scale: float | None = None, encoder: Encoder | None = None):
        super().__init__(env)
        self.encoder = encoder if encoder is not None else env.unwrapped.task.encoder
        dim = env.action_space.shape[0]
        if self.encoder.dim != dim:
            raise ValueError(f"encoder has dim {self.encoder.dim} but the env's embeddings have dim {dim}")
        self.residual_scale = float(residual_scale if residual_scale is not None else dim**-0.5)
        if not self.residual_scale > 0:
            raise ValueError(f"residual_scale must be > 0, got {residual_scale}")
        self._encoder_version = self.encoder.version
        self.observation_space = spaces.Box(-1.0, 1.0, (dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (dim,), np.float32)
        self._query: str | None = None
        self._query_vector: np.ndarray | None = None

    def _observe(self, query: str) -> np.ndarray:
        """The query's vector; an episode's step shows the query of its reset, encoded once."""
        if query != self._query:
            self._query, self._query_vector = query, self.encoder.encode_queries([query])[0]
        return self._query_vector

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if self.encoder.version != self._encoder_version:
            raise RuntimeError(
                f"the wrapper's encoder changed (version {self._encoder_version} -> {self.encoder.version}); "
                "it must be frozen"
            )
        query, info = self.env.reset(seed=seed, options=options)
        return self._observe(query), info

    def step(self, action):
        if self._query_vector is None:
            raise RuntimeError("call reset() before step()")
        residual = np.asarray(action, dtype=np.float32)
        if residual.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape}, got {residual.shape}")
        embedding = self._query_vector + self.residual_scale * residual
        embedding /= max(float(np.linalg.norm(embedding)), np.finfo(np.float32).tiny)
        query, reward, terminated, truncated, info = self.env.step(embedding)
        return self._observe(query), reward, terminated, truncated, info

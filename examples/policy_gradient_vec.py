"""A minimal policy-gradient agent over ``gymnasium.make_vec("SearchR3-v0")``.

What any library that drives a ``gymnasium.vector.VectorEnv`` does, in one
readable file: a Gaussian policy whose mean is a linear map of the query's
bag-of-words features (the observation is text; the features are the agent's
own business), REINFORCE with a group baseline as in GRPO (each step pins
``group`` envs to the same query via ``reset(options={"query_ids": ...})``,
and each rollout's advantage is its reward minus its group's mean, which
removes the query's own difficulty from the signal), Adam. The env normalises
each sampled action to unit length and rewards it with full-depth nDCG of the
query's relevant documents. The map starts random, so the agent starts near
the random-vector floor and has to learn which embedding directions find the
relevant documents.

    python examples/policy_gradient_vec.py --steps 150
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import gymnasium
import numpy as np
import torch

import searchr3_env
from searchr3_env import HashingEncoder


@dataclass
class Args:
    steps: int = 150  # vector-env steps (one policy update each)
    num_envs: int = 64  # rollouts scored per step
    group: int = 8  # rollouts per query (num_envs // group queries per step)
    dim: int = 256  # embedding size: the hashing document encoder's and the query features'
    sigma: float = 0.05  # exploration noise of the Gaussian policy (before the env normalises)
    lr: float = 0.02  # Adam learning rate of the linear map
    seed: int = 0


def make_env(args: Args, seed: int):
    """The vector env and the featuriser the policy reads queries with."""
    dataset = searchr3_env.make_synthetic()
    encoder = HashingEncoder(dim=args.dim).fit(dataset.document_texts())
    env = gymnasium.make_vec("SearchR3-v0", num_envs=args.num_envs, dataset=dataset, encoder=encoder)
    env.reset(seed=seed)
    return env, encoder


def policy_mean(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features @ weight, dim=1)


def sample_actions(features: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    with torch.no_grad():
        mean = policy_mean(features, weight)
        return mean + sigma * torch.randn_like(mean)


def reinforce_loss(features, actions, rewards: np.ndarray, weight, sigma: float, group: int) -> torch.Tensor:
    """-E[advantage * log pi(action | query)]; rollouts come in consecutive groups of one query."""
    grouped = rewards.reshape(-1, group)
    advantage = torch.from_numpy((grouped - grouped.mean(axis=1, keepdims=True)).ravel()).float()
    log_prob = -((actions - policy_mean(features, weight)) ** 2).sum(dim=1) / (2 * sigma**2)
    return -(advantage * log_prob).mean()


def pin_groups(env, rng: np.random.Generator, group: int) -> tuple[str, ...]:
    """Reset every env, ``group`` consecutive envs to the same random training query."""
    query_ids = env.task.query_ids
    picks = rng.choice(len(query_ids), size=env.num_envs // group, replace=False)
    return env.reset(options={"query_ids": [query_ids[i] for i in picks for _ in range(group)]})[0]


def train(args: Args) -> list[float]:
    """Mean reward of each step's batch, in order."""
    torch.manual_seed(args.seed)
    env, encoder = make_env(args, args.seed)
    weight = torch.nn.Parameter(torch.randn(args.dim, args.dim) / args.dim**0.5)
    optimizer = torch.optim.Adam([weight], lr=args.lr)
    rng = np.random.default_rng(args.seed)
    history = []
    for _ in range(args.steps):
        obs = pin_groups(env, rng, args.group)
        features = torch.from_numpy(encoder.encode_queries(list(obs)))  # (n, dim)
        actions = sample_actions(features, weight, args.sigma)
        _, rewards, _, _, _ = env.step(actions.numpy())
        loss = reinforce_loss(features, actions, rewards, weight, args.sigma, args.group)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(rewards.mean()))
    env.close()
    return history


def parse_args(defaults: Args) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return type(defaults)(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()})


def report(history: list[float]) -> str:
    k = max(1, len(history) // 10)
    return f"mean reward: first {k} steps {np.mean(history[:k]):.3f} -> last {k} steps {np.mean(history[-k:]):.3f}"


if __name__ == "__main__":
    print(report(train(parse_args(Args()))))

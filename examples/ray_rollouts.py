"""Rollouts across machines: Ray actors each drive their own ``SearchR3-v0`` vector env.

The learner keeps the policy (the linear Gaussian policy of
``policy_gradient_vec.py``), broadcasts its weights every step, and each
``RolloutWorker`` actor samples actions for its own batch of queries and
returns (features, actions, rewards) for groups of rollouts of the same query;
the learner takes one group-baseline REINFORCE step on the union. Locally Ray uses this machine's CPUs; on a cluster
(``ray start --head`` / ``ray start --address=...``) run it with
``RAY_ADDRESS=auto`` and the actors spread over the nodes.

    python examples/ray_rollouts.py --workers 2 --steps 40
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
import policy_gradient_vec as pg  # noqa: E402

# Ship the example code to the workers by value: they need not find these files on disk.
ray.cloudpickle.register_pickle_by_value(pg)


@dataclass
class Args(pg.Args):
    workers: int = 2  # Ray actors, each with its own vector env
    num_envs: int = 16  # queries per worker per step
    steps: int = 40


@ray.remote(num_cpus=1)
class RolloutWorker:
    def __init__(self, args: Args, seed: int):
        torch.manual_seed(seed)
        self.args = args
        self.env, self.encoder = pg.make_env(args, seed)
        self.rng = np.random.default_rng(seed)

    def rollout(self, weight: torch.Tensor):
        obs = pg.pin_groups(self.env, self.rng, self.args.group)
        features = torch.from_numpy(self.encoder.encode_queries(list(obs)))
        actions = pg.sample_actions(features, weight, self.args.sigma)
        rewards = self.env.step(actions.numpy())[1]
        return features, actions, rewards


def train(args: Args) -> list[float]:
    torch.manual_seed(args.seed)
    workers = [RolloutWorker.remote(args, args.seed + 1 + i) for i in range(args.workers)]
    weight = torch.nn.Parameter(torch.randn(args.dim, args.dim) / args.dim**0.5)
    optimizer = torch.optim.Adam([weight], lr=args.lr)
    history = []
    for _ in range(args.steps):
        batches = ray.get([w.rollout.remote(weight.detach()) for w in workers])
        features, actions = (torch.cat([b[i] for b in batches]) for i in (0, 1))
        rewards = np.concatenate([b[2] for b in batches])
        loss = pg.reinforce_loss(features, actions, rewards, weight, args.sigma, args.group)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(rewards.mean()))
    return history


if __name__ == "__main__":
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    args = pg.parse_args(Args())
    ray.init(num_cpus=max(2, args.workers))
    print(pg.report(train(args)))

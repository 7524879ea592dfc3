"""Stable-Baselines3's PPO on ``SearchR3-v0``, through ``ResidualEmbedding``.

SB3's policies read Box observations, so the env is wrapped: the policy sees
the query's hashing vector and answers with a residual ``a``; the env scores
``normalise(enc(query) + s * a)``. PPO's Gaussian policy starts with mean 0 (the
hashing embedding itself) and unit noise, which costs some reward, and learns
per-query corrections from there. The script prints the first and last 512
training episodes' mean reward, then the deterministic policy against the
hashing embedding on the training queries (what was learned) and on the test
queries (whether it carries to unseen ones). The hashing space is small (256
dimensions) so that PPO's MLP and per-dimension Gaussian stay cheap on a CPU.

    python examples/sb3_ppo.py --timesteps 12288 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import gymnasium
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from threadpoolctl import threadpool_limits

import searchr3_env  # noqa: F401  (registers SearchR3-v0)
from searchr3_env import HashingEncoder, ResidualEmbedding
from searchr3_env.task import resolve_dataset


@dataclass
class Args:
    timesteps: int = field(default=12288, metadata={"help": "episodes to train on (one step each)"})
    seed: int = field(default=0, metadata={"help": "seeds PPO, the envs' query draws and the action noise"})
    n_envs: int = field(default=8, metadata={"help": "envs stepped together by SB3's DummyVecEnv"})
    dataset: str = field(default="synthetic", metadata={"help": "'synthetic' or a BEIR folder"})
    dim: int = field(default=256, metadata={"help": "hashing dimension: observations, actions and the index"})
    residual_scale: float = field(default=0.1, metadata={"help": "s in normalise(enc(q) + s * a)"})
    n_steps: int = field(default=64, metadata={"help": "PPO rollout length per env (batch = n_steps * n_envs)"})
    batch_size: int = field(default=128, metadata={"help": "PPO minibatch size"})
    n_epochs: int = field(default=10, metadata={"help": "PPO passes over each rollout"})
    learning_rate: float = field(default=3e-3, metadata={"help": "Adam learning rate"})


class RewardLog(BaseCallback):
    """Every episode's reward in the order they ended, and one progress line per rollout."""

    def __init__(self, verbose: int = 1):
        super().__init__(verbose)
        self.rewards: list[float] = []
        self._rollout_start = 0

    def _on_step(self) -> bool:
        self.rewards.extend(float(r) for r, done in zip(self.locals["rewards"], self.locals["dones"]) if done)
        return True

    def _on_rollout_end(self) -> None:
        if self.verbose:
            recent = self.rewards[self._rollout_start :]
            std = float(self.model.policy.log_std.detach().exp().mean())
            print(f"episodes {len(self.rewards):6d}  mean reward {np.mean(recent):.4f}  policy std {std:.3f}")
        self._rollout_start = len(self.rewards)


def make_env(args: Args, dataset, encoder: HashingEncoder):
    """``n_envs`` wrapped training envs in SB3's DummyVecEnv, all indexing with ``encoder``."""
    return make_vec_env(
        "SearchR3-v0",
        n_envs=args.n_envs,
        seed=args.seed,
        wrapper_class=ResidualEmbedding,
        wrapper_kwargs={"residual_scale": args.residual_scale},
        env_kwargs={"dataset": dataset, "encoder": encoder, "split": "train"},
    )


def train(args: Args, verbose: int = 1) -> tuple[PPO, list[float], HashingEncoder]:
    """The trained model, every training episode's reward in order, and the encoder the env indexes with.

    One thread for torch and for BLAS: a step scores one query and an update is a
    small MLP, too little work to share, and idle BLAS threads spin (3x the CPU time).
    """
    torch.set_num_threads(1)
    dataset = resolve_dataset(args.dataset)
    encoder = HashingEncoder(dim=args.dim).fit(dataset.document_texts())
    env = make_env(args, dataset, encoder)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device="cpu",
    )
    log = RewardLog(verbose)
    with threadpool_limits(1):
        model.learn(total_timesteps=args.timesteps, callback=log)
    env.close()
    return model, log.rewards, encoder


def evaluate(model: PPO, args: Args, encoder: HashingEncoder, split: str = "test") -> tuple[float, float]:
    """Mean reward over ``split`` of the deterministic policy, and of the encoder's own embedding (residual 0)."""
    env = ResidualEmbedding(
        gymnasium.make("SearchR3-v0", dataset=resolve_dataset(args.dataset), encoder=encoder, split=split),
        residual_scale=args.residual_scale,
    )
    policy, base = [], []
    for query_id in env.unwrapped.task.query_ids:
        obs, _ = env.reset(options={"query_id": query_id})
        policy.append(env.step(model.predict(obs, deterministic=True)[0])[1])
        obs, _ = env.reset(options={"query_id": query_id})
        base.append(env.step(np.zeros(env.action_space.shape, np.float32))[1])
    env.close()
    return float(np.mean(policy)), float(np.mean(base))


def first_last(rewards: list[float], k: int = 512) -> tuple[float, float]:
    """Mean reward of the first ``k`` and the last ``k`` training episodes."""
    return float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f.metadata["help"])
    return Args(**vars(parser.parse_args()))


if __name__ == "__main__":
    args = parse_args()
    model, rewards, encoder = train(args)
    first, last = first_last(rewards)
    print(f"training reward: first 512 episodes {first:.4f} -> last 512 {last:.4f} ({last - first:+.4f})")
    for split in ("train", "test"):
        trained, base = evaluate(model, args, encoder, split)
        print(f"{split} split: deterministic policy {trained:.4f}, hashing embedding (residual 0) {base:.4f}")

"""The examples run, and the agents in them learn (reward goes up) on the synthetic collection."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import policy_gradient_vec as pg  # noqa: E402


def test_policy_gradient_over_make_vec_learns():
    history = pg.train(pg.Args(steps=60, num_envs=32, group=8, lr=0.05))
    assert np.mean(history[-15:]) > np.mean(history[:15]) + 0.03, history


@pytest.mark.slow
def test_ray_rollout_workers_learn_locally():
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    import ray_rollouts

    ray.cloudpickle.register_pickle_by_value(ray_rollouts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        history = ray_rollouts.train(ray_rollouts.Args(workers=2, num_envs=16, group=8, steps=60, lr=0.05))
    finally:
        ray.shutdown()
    assert np.mean(history[-15:]) > np.mean(history[:15]) + 0.03, history

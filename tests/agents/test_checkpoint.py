"""Checkpoints: a round trip restores the random states exactly, a planted pickle is refused unrun, and what a
killed save leaves behind goes at the next load."""

from __future__ import annotations

import os
import random
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.checkpoint import (
    OPTIMIZER,
    RNG,
    CheckpointError,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


def training_objects(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


@pytest.fixture
def saved_run(tmp_path):
    """A run folder whose latest checkpoint is step 3; returns it and the draws that follow the save."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    model, optimizer, scheduler = training_objects(0)
    train_steps(model, optimizer, scheduler, 3)
    save_checkpoint(tmp_path / "run", 3, model, optimizer, scheduler, config={"lr": 1e-2}, state={"epoch": 0})
    return tmp_path / "run", draws(), model, optimizer, scheduler


def test_a_round_trip_restores_weights_optimiser_schedule_and_random_states(saved_run):
    run, after_save, model, optimizer, scheduler = saved_run
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # anything else
    fresh_model, fresh_optimizer, fresh_scheduler = training_objects(7)
    state = load_training_state(resolve_checkpoint(run), fresh_model, fresh_optimizer, fresh_scheduler)
    assert state == {"step": 3, "epoch": 0}
    assert draws() == after_save
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for saved, loaded in zip(optimizer.state_dict()["state"].values(), fresh_optimizer.state_dict()["state"].values()):
        assert all(torch.equal(saved[k], loaded[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


class Planted:
    """Unpickling it creates ``marker``: the stand-in for code a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name", [RNG, OPTIMIZER])
def test_a_planted_pickle_is_refused_without_running_it(saved_run, tmp_path, name):
    run = saved_run[0]
    checkpoint = resolve_checkpoint(run)
    marker = tmp_path / "code-ran"
    content = torch.load(checkpoint / name, weights_only=False)  # the genuine file: a test may trust it
    torch.save({**content, "extra": Planted(marker)}, checkpoint / name)
    with pytest.raises(CheckpointError) as err:
        load_training_state(checkpoint, *training_objects(7))
    assert str(checkpoint / name) in str(err.value)
    assert "objects other than tensors and RNG states" in str(err.value) and "not loaded" in str(err.value)
    assert not marker.exists()


# Saves step 1, then dies (SIGKILL) while writing step 2's optimizer state.
_KILLED_SAVE = r"""
import os, signal, sys, torch
from agents import checkpoint

model = torch.nn.Linear(2, 2)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
checkpoint.save_checkpoint(sys.argv[1], 1, model, optimizer, scheduler, config={}, state={})
real_save = torch.save
def save_then_die(obj, path):
    real_save(obj, path)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.torch.save = save_then_die
checkpoint.save_checkpoint(sys.argv[1], 2, model, optimizer, scheduler, config={}, state={})
"""


def test_a_killed_save_leaves_a_temporary_that_the_next_load_removes(tmp_path):
    run = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(run)], check=False, cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and left[0].startswith(".step-000002."), left
    live = run / "checkpoints" / f".step-000003.{socket.gethostname()}.{os.getpid()}.0123abcd.tmp"
    live.mkdir()  # a save this process is making: never removed
    assert resolve_checkpoint(run).name == "step-000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [live.name, "step-000001"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "latest"]


def test_checkpoint_folders_get_the_umask(tmp_path):
    before = os.umask(0o022)
    try:
        checkpoint = save_checkpoint(tmp_path / "run", 1, *training_objects(0), config={}, state={})
    finally:
        os.umask(before)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o755
    assert stat.S_IMODE((checkpoint / RNG).stat().st_mode) == 0o644

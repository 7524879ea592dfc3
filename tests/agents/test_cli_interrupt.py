"""Ctrl-C during training: one line, exit status 130, and a run folder that resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ctrl_c_during_sft_exits_130_and_the_run_resumes(tmp_path, tiny_model_dir, tiny_beir):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "agents.cli", "sft", "--data", str(tiny_beir), "--model", str(tiny_model_dir),
            "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "60",
            "--checkpoint-every", "2", "--batch-size", "4", "--hard-negatives", "2", "--negatives", "hashing",
            "--val-queries", "0", "--max-doc-tokens", "24", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "latest").is_file() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert child.poll() is None, child.stderr.read()
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "searchr3 sft: interrupted", stderr
    assert "Traceback" not in stderr
    interrupted_at = json.loads((run / "checkpoints" / (run / "latest").read_text() / "state.json").read_text())["step"]
    assert interrupted_at < 60
    # No temporary checkpoint folder is left half-written, and the log reads as JSON line by line.
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]:
        json.loads(line)

    resumed = subprocess.run(args, cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {interrupted_at}" in resumed.stderr  # "resumed ... at step N": not started over
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and sorted(set(steps)) == list(range(steps[0], 61))

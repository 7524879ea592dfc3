"""Kill a writer process in the middle of a save: the crash tests of the index files share this."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]


def kill_writer(args: list[str], trigger: str, ready: Callable[[int], bool], pause: float) -> tuple[int, int, int]:
    """Run ``python -c *args`` (a writer that prints ``saving N``, ``saved N`` and phase words), SIGKILL it ``pause``
    seconds after it prints ``trigger`` once ``ready(last saved generation)`` holds.

    Returns (last generation reported saved, last generation started, saves seen before the kill).
    """
    proc = subprocess.Popen([sys.executable, "-c", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = int(args[3]) if len(args) > 3 else 0
    saved_gen = saving_gen = first - 1
    saves = 0
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"writer died: {proc.stderr.read()}"
            words = line.split()
            if words[0] == "saving":
                saving_gen = int(words[1])
            if words[0] == "saved":
                saved_gen, saves = int(words[1]), saves + 1
            if words[0] == trigger and ready(saved_gen):
                time.sleep(pause)
                break
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for words in (w.split() for w in rest.splitlines()):
        if words and words[0] == "saving":
            saving_gen = int(words[1])
        if words and words[0] == "saved":
            saved_gen = int(words[1])
    assert proc.returncode == -signal.SIGKILL
    return saved_gen, saving_gen, saves

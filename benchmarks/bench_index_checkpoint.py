"""Checkpointing the env's index after a refresh: an incremental save (one delta segment) versus a full save.

A GRPO run with trained documents saves the env's index at every checkpoint, and between two checkpoints a
local refresh rewrites a few percent of its rows. Per corpus size (100,000 and 200,000 rows x 384 float32):

* ``full``: :meth:`CorpusIndex.save`, the whole index in one file, after re-encoding 1 % of the rows;
* ``incremental``: :meth:`CorpusIndex.save_incremental` on top of the previous checkpoint's segments, after
  re-encoding 1 % of the rows (writes one delta segment and the manifest);
* ``cycle``: incremental saves of 1 % refreshes from one base to the next (the default compaction rule),
  so the compaction's new base is paid for: time and bytes per checkpoint averaged over the cycle, and the
  load of the last manifest before compaction (the most deltas a load ever applies) against a full load.

Each case's bytes are measured on disk; the session summary prints the time ratios of the same run.

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_index_checkpoint.py --benchmark-enable``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from searchr3_env.index import CorpusIndex

DIM, REFRESHED = 384, 0.01
SIZES = [100_000, 200_000]


def unit(rng, n):
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n // 1000}k")
def corpus(request):
    n = request.param
    rng = np.random.default_rng(n)
    index = CorpusIndex.from_embeddings([f"doc-{i}" for i in range(n)], unit(rng, n), 1, corpus_fingerprint="f" * 64)
    return index, rng


def refresh(index: CorpusIndex, rng) -> None:
    rows = rng.choice(len(index), int(REFRESHED * len(index)), replace=False)
    index.update(rows, unit(rng, len(rows)), index.oldest_version + 1)


def written(folder: Path, before: set[str]) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name not in before)


@pytest.mark.benchmark(group="index-checkpoint")
def test_full_save(benchmark, corpus, tmp_path, record):
    index, rng = corpus
    path = tmp_path / "full.npz"
    benchmark.pedantic(lambda: index.save(path), setup=lambda: refresh(index, rng), rounds=4, warmup_rounds=1)
    record(benchmark, f"full_save_{len(index) // 1000}k", bytes=path.stat().st_size)


@pytest.mark.benchmark(group="index-checkpoint")
def test_incremental_save(benchmark, corpus, tmp_path, record):
    index, rng = corpus
    folder = tmp_path / "index"
    index.save_incremental(folder, "step-0")  # the run's first checkpoint writes the base
    steps, sizes = iter(range(1, 100)), []

    def setup():
        refresh(index, rng)
        name = f"step-{next(steps)}"
        return (name, {p.name for p in folder.iterdir()}), {}

    def save(name, before):
        index.save_incremental(folder, name)
        sizes.append(written(folder, before))  # (after timing would be cleaner; stat of two files is ~20 us)

    benchmark.pedantic(save, setup=setup, rounds=8, warmup_rounds=1)
    manifest = json.loads((folder / "step-1.json").read_text())
    assert len(manifest["segments"]) == 2  # no compaction inside the measured rounds
    record(benchmark, f"incremental_save_{len(index) // 1000}k", baseline=f"full_save_{len(index) // 1000}k",
           bytes=int(np.mean(sizes)))


@pytest.mark.benchmark(group="index-checkpoint-cycle")
def test_compaction_cycle(benchmark, corpus, tmp_path, record):
    """Time and bytes per checkpoint over one base-to-base cycle, and loading its longest manifest.

    The benchmark's mean is the whole cycle (one round); the per-checkpoint figures are in its extras.
    """
    index, rng = corpus
    folder = tmp_path / "index"
    index.save_incremental(folder, "step-0000")
    seconds, sizes = [], []

    def cycle() -> int:
        step = 0
        while True:
            step += 1
            refresh(index, rng)
            before = {p.name for p in folder.iterdir()}
            start = time.perf_counter()
            path = index.save_incremental(folder, f"step-{step:04d}")
            seconds.append(time.perf_counter() - start)
            sizes.append(written(folder, before))
            if len(json.loads(path.read_text())["segments"]) == 1:  # compacted: a new base
                return step

    steps = benchmark.pedantic(cycle, rounds=1)
    longest = folder / f"step-{steps - 1:04d}.json"
    start = time.perf_counter()
    loaded = CorpusIndex.load_incremental(longest)
    load_s = time.perf_counter() - start
    index.save(tmp_path / "full.npz")
    start = time.perf_counter()
    CorpusIndex.load(tmp_path / "full.npz")
    full_load_s = time.perf_counter() - start
    assert len(loaded) == len(index)
    record(benchmark, f"cycle_{len(index) // 1000}k", checkpoints=steps,
           deltas_before_compaction=len(json.loads(longest.read_text())["segments"]) - 1,
           save_s_per_checkpoint=float(np.mean(seconds)), bytes_per_checkpoint=int(np.mean(sizes)),
           delta_save_s=float(np.mean(seconds[:-1])), compaction_save_s=seconds[-1],
           load_longest_manifest_s=load_s, load_full_file_s=full_load_s)

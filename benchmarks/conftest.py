"""Benchmark plumbing: each benchmark names its baseline, and the session ends with the ratios.

A test calls ``record(benchmark, name, baseline=...)`` after running; the
terminal summary prints ``name / baseline`` throughput ratios measured in the
same run (never against a number from another machine or day), and writes
them to ``benchmarks/results/latest.json`` (not committed) for ``results/env_speed.md``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest

from searchr3_env.atomic import atomic_write

_MEANS: dict[str, float] = {}
_BASELINES: dict[str, tuple[str, ...]] = {}
_EXTRA: dict[str, dict] = {}


@pytest.fixture
def record():
    def _record(benchmark, name: str, baseline: str | tuple[str, ...] = (), **extra) -> None:
        if benchmark.stats is None:  # --benchmark-disable
            return
        _MEANS[name] = benchmark.stats.stats.mean
        _BASELINES[name] = (baseline,) if isinstance(baseline, str) else tuple(baseline)
        if extra:
            _EXTRA[name] = extra

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _MEANS:
        return
    rows = {}
    terminalreporter.write_sep("=", "searchr3 benchmark ratios (same run)")
    for name, mean in _MEANS.items():
        row = {"mean_s": mean, **_EXTRA.get(name, {})}
        terminalreporter.write_line(f"{name}: {mean * 1e3:.3f} ms {_EXTRA.get(name, '')}")
        for base in _BASELINES.get(name, ()):
            if base in _MEANS:
                row[f"throughput_vs_{base}"] = _MEANS[base] / mean
                row[f"overhead_vs_{base}_s"] = mean - _MEANS[base]
                terminalreporter.write_line(
                    f"    vs {base} ({_MEANS[base] * 1e3:.3f} ms): throughput ratio "
                    f"{_MEANS[base] / mean:.3f}, overhead {(mean - _MEANS[base]) * 1e6:.0f} us"
                )
        rows[name] = row
    out = Path(__file__).parent / "results" / "latest.json"
    with atomic_write(out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
                   "results": rows}, f, indent=2)

"""Benchmark plumbing: each benchmark names its baseline, and the session ends with the ratios.

A test calls ``record(benchmark, name, baseline=...)`` after running; the
terminal summary prints ``name / baseline`` throughput ratios measured in the
same run (never against a number from another machine or day), and writes
them to ``benchmarks/results/latest.json`` for RESULTS.md.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest

from searchr3_env.atomic import atomic_write

_MEANS: dict[str, float] = {}
_BASELINES: dict[str, str] = {}
_EXTRA: dict[str, dict] = {}


@pytest.fixture
def record():
    def _record(benchmark, name: str, baseline: str | None = None, **extra) -> None:
        if benchmark.stats is None:  # --benchmark-disable
            return
        _MEANS[name] = benchmark.stats.stats.mean
        if baseline:
            _BASELINES[name] = baseline
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
        base = _BASELINES.get(name)
        if base in _MEANS:
            row["baseline"] = base
            row["throughput_vs_baseline"] = _MEANS[base] / mean
            row["overhead_s"] = mean - _MEANS[base]
            terminalreporter.write_line(
                f"{name}: {mean * 1e3:.3f} ms; {base}: {_MEANS[base] * 1e3:.3f} ms; "
                f"throughput ratio {row['throughput_vs_baseline']:.3f}; overhead {row['overhead_s'] * 1e6:.0f} us"
            )
        else:
            terminalreporter.write_line(f"{name}: {mean * 1e3:.3f} ms {_EXTRA.get(name, '')}")
        rows[name] = row
    out = Path(__file__).parent / "results" / "latest.json"
    with atomic_write(out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
                   "results": rows}, f, indent=2)

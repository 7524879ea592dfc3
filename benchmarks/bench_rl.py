"""Where a GRPO step's time goes: generation, env (scoring and document refresh), update; and peak memory.

Every GRPO step logs ``generate_s`` (sampling the reasoning), ``env_s`` (the
vector-env step, including the refresh policy's re-encoding), ``update_s``
(forwards, reference pass, backward, optimiser), ``docs_reencoded`` and
``peak_mem_mb``. This script summarises those records of finished runs (made by
``searchr3 rl`` or ``searchr3 demo``), so the numbers come from real training,
not a synthetic loop. The first step is left out (it pays one-off warm-up).

    python benchmarks/bench_rl.py runs/demo/grpo [more GRPO run folders]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from agents.metrics_log import MetricsLog

PHASES = ("generate_s", "env_s", "update_s")


def summarise(run_dir: Path) -> dict:
    steps = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if "step_s" in r]
    if len(steps) < 2:
        raise SystemExit(f"{run_dir}: fewer than 2 logged GRPO steps")
    steady = steps[1:]
    step_s = statistics.median(r["step_s"] for r in steady)
    out = {"run": str(run_dir), "steps": len(steady), "step_s": step_s,
           "docs_reencoded": statistics.mean(r["docs_reencoded"] for r in steady),
           "peak_mem_mb": max(r["peak_mem_mb"] for r in steps)}
    for phase in PHASES:
        out[phase] = statistics.median(r[phase] for r in steady)
        out[phase.replace("_s", "_share")] = statistics.median(r[phase] / r["step_s"] for r in steady)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="GRPO run folders (holding metrics.jsonl)")
    args = parser.parse_args()
    print("| run | steps | step s | generate s (share) | env s (share) | update s (share) | docs re-encoded "
          "| peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        s = summarise(run)
        phases = " | ".join(f"{s[p]:.2f} ({s[p.replace('_s', '_share')]:.1%})" for p in PHASES)
        print(f"| {s['run']} | {s['steps']} | {s['step_s']:.2f} | {phases} | {s['docs_reencoded']:.0f} | "
              f"{s['peak_mem_mb']:.0f} |")


if __name__ == "__main__":
    main()

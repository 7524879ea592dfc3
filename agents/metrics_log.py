"""A training run's metrics: one JSON line per record, and a PNG of the losses and eval curves.

Shared by the SFT and RL stages. Every record carries ``step``; a resumed run
first drops the records written after its checkpoint (they belong to the
killed run's lost future), so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from searchr3_env.atomic import atomic_write


class MetricsLog:
    """Append-only JSONL file of ``{"step": int, name: float, ...}`` records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):  # only the last line may be torn (a kill mid-write)
                    raise ValueError(f"{self.path}:{n}: not a JSON record") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (atomically)."""
        kept = [r for r in self.read() if r["step"] <= step]
        with atomic_write(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def plot(self, png: str | Path, title: str = "", panels: dict[str, tuple[str, ...]] | None = None) -> Path:
        """One panel per entry of ``panels`` (title -> key prefixes) against step. By default SFT's: ``loss*``,
        ``eval*``, and, for a run that reasons, the share of queries trained on a reasoning and of samples that
        emitted the embed token."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read()
        groups = panels or {"loss": ("loss",), "eval": ("eval",), "reasoning (share)": ("reasoning_kept", "embed_emitted")}
        panels = {name: sorted({k for r in records for k in r if k.startswith(prefixes)})
                  for name, prefixes in groups.items()}
        panels = {name: keys for name, keys in panels.items() if keys or name in ("loss", "eval")}
        panels = panels or {next(iter(groups)): []}
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (name, keys) in zip(axes[0], panels.items()):
            for key in keys:
                pts = [(r["step"], r[key]) for r in records if key in r]
                ax.plot(*zip(*pts), marker="o" if name == "eval" else None, markersize=3, label=key)
            ax.set_xlabel("optimiser step")
            ax.set_title(name)
            if keys:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        png = Path(png)
        with atomic_write(png) as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        return png

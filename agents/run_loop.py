"""The loop both training stages share: resume, metrics log, held-out evaluations, checkpoints, progress, plot.

A stage supplies what one optimiser step does (a function of the step number
that returns the step's metrics) and how to evaluate; the loop does the rest
the same way for SFT and GRPO. Every random choice of a step is seeded by the
step number inside the stage, so a run resumed from its last checkpoint
repeats the uninterrupted run exactly, and the records the killed run logged
after that checkpoint are dropped first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from searchr3_env.atomic import atomic_write
from searchr3_env.dataset import RetrievalDataset
from searchr3_env.evaluation import AgentEvaluation
from searchr3_env.records import record_metadata, write_record

from .checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from .layout import Layout
from .metrics_log import MetricsLog

log = logging.getLogger(__name__)


@dataclass
class Trainee:
    """What the loop checkpoints: the model, its optimiser and schedule, the encoder whose version it records."""

    model: object
    optimizer: object
    scheduler: object
    encoder: object  # has ``version``, restored on resume
    layout: Layout


@dataclass(frozen=True)
class Validation:
    """A held-out evaluation: logged as ``key`` (its mean nDCG@10), its per-query record kept under records/."""

    key: str  # e.g. "eval_val_ndcg@10"
    evaluation: AgentEvaluation
    dataset: RetrievalDataset  # the held-out queries it scored
    depth: int  # documents retrieved per query


@dataclass
class Hooks:
    """What a stage plugs into the loop."""

    step: Callable[[int], dict]  # one optimiser step at step t; returns the metrics to log at t + 1
    evaluate: Callable[[], Validation | None] = lambda: None  # the held-out evaluation (None: there is none)
    before_checkpoint: Callable[[int], None] = lambda step: None  # state outside the model to save at a step
    after_checkpoint: Callable[[Path], None] = lambda checkpoint: None  # e.g. drop what no kept checkpoint needs
    postfix: tuple[str, ...] = ("loss",)  # metrics shown beside the progress bar
    panels: dict[str, tuple[str, ...]] | None = field(default=None)  # the plot's panels (MetricsLog.plot)


def resume(trainee: Trainee, checkpoint: Path | None, metrics: MetricsLog) -> int:
    """The step to continue from: a checkpoint's (its training state restored, later log records dropped) or 0."""
    if checkpoint is None:
        metrics.truncate_after(-1)
        return 0
    state = load_training_state(checkpoint, trainee.model, trainee.optimizer, trainee.scheduler)
    trainee.encoder.version = state["version"]
    metrics.truncate_after(state["step"])
    log.info("resumed %s at step %d", checkpoint, state["step"])
    return state["step"]


def run(cfg, trainee: Trainee, hooks: Hooks, resume_from: Path | None, desc: str, title: str) -> Path:
    """Train ``cfg.max_steps`` steps (from ``resume_from``'s, if given); returns the final checkpoint."""
    run_dir = Path(cfg.output_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    step = resume(trainee, resume_from, metrics)
    with atomic_write(run_dir / "config.json", "w") as out:
        out.write(json.dumps(asdict(cfg), indent=2))

    def evaluate() -> None:
        if (val := hooks.evaluate()) is not None:
            metrics.write(step, **{val.key: val.evaluation.metrics.mean["ndcg@10"]})
            log.info("step %d: %s %.4f", step, val.key, val.evaluation.metrics.mean["ndcg@10"])
            # Per-query scores of the held-out train queries: what development comparisons are tested on.
            write_record(run_dir / "records" / f"{val.key}-step-{step:06d}.json", val.evaluation,
                         record_metadata(val.dataset, agent=f"{desc}:{run_dir.name}", split="train", held_out=True,
                                         depth=val.depth, seed=cfg.seed, step=step))

    if step == 0:
        evaluate()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", disable=not cfg.progress)
    while step < cfg.max_steps:
        record = hooks.step(step)
        step += 1
        metrics.write(step, **record)
        bar.update(1)
        bar.set_postfix({k: f"{record[k]:.3f}" for k in hooks.postfix if k in record})
        last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            evaluate()
        if step % cfg.checkpoint_every == 0 or last:
            hooks.before_checkpoint(step)
            checkpoint = save_checkpoint(run_dir, step, trainee.model, trainee.optimizer, trainee.scheduler,
                                         asdict(cfg), {"version": trainee.encoder.version,
                                                       "layout": trainee.layout.to_dict()})
            hooks.after_checkpoint(checkpoint)
    bar.close()
    metrics.plot(run_dir / "metrics.png", title=title, panels=hooks.panels)
    return latest_checkpoint(run_dir)

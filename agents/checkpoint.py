"""Training checkpoints that a killed run resumes from exactly.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNN/`` holding

* ``weights.safetensors``: the trainable parameters (LoRA adapters, or every weight when fully fine-tuned) and the
  persistent buffers (state changed without gradients: SPT's codebooks and FFN block order; a plain Hugging Face
  model has none);
* ``optimizer.pt``: optimiser and learning-rate schedule state;
* ``rng.pt``: Python, NumPy and torch random states;
* ``config.json``: the run's configuration, enough to rebuild the model;
* ``state.json``: the step and encoder version.

It is written to a temporary folder and renamed into place, then ``<run>/latest``
is atomically pointed at it, so a kill at any moment leaves the previous
checkpoint usable and never a half-written one. What a killed save leaves
behind is removed by the next save or load of the run
(:func:`searchr3_env.atomic.remove_stale_temporaries`).

The ``.pt`` files are pickles, and unpickling runs whatever a file names, so
they are loaded with ``weights_only=True``: only tensors, plain containers and
the NumPy pieces of a random state are built; a checkpoint naming anything else
is refused, never run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from searchr3_env.atomic import atomic_write, remove_stale_temporaries, staging_folder
from searchr3_env.cache_keys import cache_key, file_digest

from .config import upgrade_saved

WEIGHTS, OPTIMIZER, RNG, CONFIG, STATE = "weights.safetensors", "optimizer.pt", "rng.pt", "config.json", "state.json"
FILES = (WEIGHTS, OPTIMIZER, RNG, CONFIG, STATE)
# What np.random.get_state() pickles besides builtins: a uint32 array (found with get_unsafe_globals_in_checkpoint).
_NUMPY_RNG_GLOBALS = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, or does not fit the model."""


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters and the persistent buffers of ``model``, by name."""
    buffers = {name for name, _ in model.named_buffers()}
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update((n, b) for n, b in model.state_dict().items() if n in buffers)  # persistent ones only
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, config: dict, state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; keeps the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:06d}"
    with staging_folder(target) as tmp:
        save_file(trainable_state(model), tmp / WEIGHTS, metadata={"step": str(step)})
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / RNG)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=2))
        for name in FILES:  # the rename below must not publish bytes still in the page cache only
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    with atomic_write(Path(run_dir) / "latest", "w") as f:
        f.write(target.name)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's latest checkpoint; clears what killed saves left there."""
    path = Path(path)
    if (path / "latest").is_file():
        remove_stale_temporaries(path / "latest")
        path = path / "checkpoints" / (path / "latest").read_text().strip()
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    for step in {p.name.split(".")[1] for p in path.parent.glob(".step-*.tmp")}:  # .step-NNNNNN.<host>.<pid>...
        remove_stale_temporaries(path.parent / step)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None for a fresh run."""
    return resolve_checkpoint(run_dir) if (Path(run_dir) / "latest").is_file() else None


RESUME_MAY_CHANGE = ("progress", "cache_dir", "gradient_checkpointing")  # settings that do not change the numbers


def resumable_checkpoint(run_dir: str | Path, config) -> Path | None:
    """The run's latest checkpoint (None for a fresh run), refusing a run made with other settings.

    ``config`` is the run's config dataclass. A setting missing from the saved config was added to the
    package after the run started; the run used what is now its default, so resuming with the default is allowed.
    """
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        saved = upgrade_saved(type(config), read_json(checkpoint, CONFIG))
        changed = sorted(f.name for f in dataclasses.fields(config) if f.name not in RESUME_MAY_CHANGE
                         and saved.get(f.name, _default(f)) != getattr(config, f.name))
        if changed:
            raise ValueError(f"{run_dir} holds a run with other settings ({changed}); use a new --output-dir")
    return checkpoint


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def read_json(checkpoint: Path, name: str) -> dict:
    return json.loads((Path(checkpoint) / name).read_text())


def read_config(checkpoint: Path, config: type):
    """The run config ``checkpoint`` was written with, as today's ``config`` class reads it."""
    return config(**upgrade_saved(config, read_json(checkpoint, CONFIG)))


def load_weights(checkpoint: Path, model) -> None:
    """Copy the saved trainable parameters and buffers into ``model`` (names and shapes must match)."""
    saved = load_file(Path(checkpoint) / WEIGHTS)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise CheckpointError(f"{checkpoint}: weights {unknown[:3]} do not exist in the model (another setup?)")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{checkpoint}: {name} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def load_training_state(checkpoint: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, schedule and random states; returns the saved ``state.json``."""
    load_weights(checkpoint, model)
    opt = _load_pt(Path(checkpoint) / OPTIMIZER)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = _load_pt(Path(checkpoint) / RNG)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_json(checkpoint, STATE)


def _load_pt(path: Path):
    """``torch.load`` that builds tensors, plain containers and NumPy random states only: a planted file cannot
    run code when a run resumes from it."""
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL (\S+)", str(err))  # torch's message names the first refused global
        raise CheckpointError(
            f"{path}: holds objects other than tensors and RNG states{f' ({named[1]})' if named else ''}, "
            "so it is not loaded (unpickling them could run any code)"
        ) from err


def weights_digest(checkpoint: Path) -> str:
    """Short content hash of the weights: tells checkpoints apart in encoder names."""
    return file_digest(Path(checkpoint) / WEIGHTS)[:10]


def checkpoint_id(checkpoint: Path, base: str | None) -> str | None:
    """What a model is after loading ``checkpoint`` over weights named ``base`` (None if unnamed): the corpus-index
    cache key of its embeddings covers the saved weights and the config that says how they apply (LoRA scale...)."""
    if base is None:
        return None
    return cache_key(base, file_digest(Path(checkpoint) / WEIGHTS), file_digest(Path(checkpoint) / CONFIG))

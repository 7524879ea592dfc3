"""Fixtures shared by tests/ and benchmarks/."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo root>/../shared/data`` (the real BEIR collections); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (real BEIR collections not available)")
    return SHARED_DATA

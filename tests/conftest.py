"""Shared test settings and fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: keep torch from oversubscribing them when pytest runs beside other work.
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared corpora (../shared/data, or $BDH_SHARED_DATA); tests using it skip without it."""
    path = Path(os.environ.get("BDH_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set BDH_SHARED_DATA)")
    return path

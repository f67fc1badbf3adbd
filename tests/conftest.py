"""Shared fixtures: seeded RNG, the shared data folder, and tolerances."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GMR_SHARED_DATA", REPO.parent / "shared" / "data"))
# the real demo slide: from ../shared/data when it is there (CI, developers), else the copy that ships
_SHARED_DEMO = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
DEMO_SLIDE = _SHARED_DEMO if _SHARED_DEMO.is_file() else REPO / "data" / "demo" / "CMU-1-Small-Region.svs"

# 2 cores: keep torch from oversubscribing when pytest-xdist is not used
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (a scale-free error that zero entries cannot blow up)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """torch.allclose with a tolerance relative to the output's scale."""
    scale = float(b.abs().max())
    assert torch.allclose(a, b, rtol=rel, atol=rel * scale), f"max relative error {max_rel_err(a, b):.3g} > {rel}"

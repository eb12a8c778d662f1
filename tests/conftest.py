"""Fixtures shared by all tests: small random-weight SegGPT models and their checkpoints."""
from __future__ import annotations

import pytest

from seggpt_model import SegGPT, save_checkpoint
from seggpt_model.testing import random_model


@pytest.fixture
def tiny_model() -> SegGPT:
    return random_model()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """An official-layout ``.pth`` of the tiny random model."""
    return save_checkpoint(tiny_model, tmp_path / "tiny.pth", layout="official")

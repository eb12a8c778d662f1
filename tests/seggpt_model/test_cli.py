"""``python -m seggpt_model predict`` on the bundled example images."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import seggpt_model

ASSETS = Path(seggpt_model.__file__).parent / "assets"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seggpt_model", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_predict_writes_mask_and_overlay(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    r = run("predict", "--weights", str(tiny_checkpoint),
            "--prompt", str(ASSETS / "example_prompt.jpg"), "--prompt-mask", str(ASSETS / "example_prompt_mask.png"),
            "--prompt", str(ASSETS / "example_prompt.jpg"), "--prompt-mask", str(ASSETS / "example_prompt_mask.png"),
            "--query", str(ASSETS / "example_query.jpg"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    query = Image.open(ASSETS / "example_query.jpg")
    mask = Image.open(out / "example_query_mask.png")
    overlay = Image.open(out / "example_query_overlay.png")
    assert mask.size == query.size == overlay.size
    colours = {tuple(c) for c in np.asarray(mask).reshape(-1, 3)}
    assert colours <= {(0, 0, 0), (255, 255, 255)}  # background and the one label of a binary mask
    assert "pixels per label" in r.stdout
    assert "demo" not in r.stderr  # the demo warning is for the demo only


def test_without_weights_the_demo_model_is_used_and_announced(tmp_path):
    """No --weights and no $SEGGPT_WEIGHTS: the documented default, the bundled demo, with a WARNING."""
    from seggpt_model.weights import DEMO_NOTICE

    env = {k: v for k, v in os.environ.items() if k != "SEGGPT_WEIGHTS"} | {"OMP_NUM_THREADS": "1"}
    r = run("predict", "--prompt", str(ASSETS / "example_prompt.jpg"),
            "--prompt-mask", str(ASSETS / "example_prompt_mask.png"),
            "--query", str(ASSETS / "example_query.jpg"), "--out", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(f"WARNING seggpt_model: {DEMO_NOTICE}") == 1
    mask = np.asarray(Image.open(tmp_path / "example_query_mask.png"))
    assert (mask == 255).all(axis=-1).sum() > 1000  # the demo finds the shape, not a blank mask


def test_bad_arguments_give_a_message_not_a_traceback(tmp_path, tiny_checkpoint):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    r = run("predict", "--weights", str(tiny_checkpoint), "--prompt", str(tmp_path / "junk.png"),
            "--prompt-mask", str(ASSETS / "example_prompt_mask.png"),
            "--query", str(ASSETS / "example_query.jpg"), "--out", str(tmp_path))
    assert r.returncode == 2 and "cannot read image" in r.stderr and "Traceback" not in r.stderr
    r = run("predict", "--weights", str(tmp_path / "missing.pth"), "--prompt", str(ASSETS / "example_prompt.jpg"),
            "--prompt-mask", str(ASSETS / "example_prompt_mask.png"),
            "--query", str(ASSETS / "example_query.jpg"), "--out", str(tmp_path))
    assert r.returncode == 2 and "weights not found" in r.stderr

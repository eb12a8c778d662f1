"""scripts/train_demo.py: both stages of the demo recipe run, log and write a loadable checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from seggpt_model import load_seggpt

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--steps", "2", "--batch", "2",
                           "--threads", "1", "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_two_stage_training_writes_checkpoints_logs_and_configs(tmp_path):
    assert train(tmp_path / "s1", "--seed", "0").returncode == 0
    first = tmp_path / "s1" / "seggpt_demo.safetensors"
    done = train(tmp_path / "s2", "--seed", "1", "--init", str(first), "--fg-weight-end", "1.5", "--absent-prob", "0.5",
                 "--drop-path", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "s2" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and all(r["loss"] > 0 for r in log)
    config = json.loads((tmp_path / "s2" / "train_config.json").read_text())
    assert (config["init"], config["fg_weight_end"], config["absent_prob"]) == (str(first), 1.5, 0.5)
    first_config = json.loads((tmp_path / "s1" / "train_config.json").read_text())["config"]
    assert first_config["drop_path_rate"] == 0.05 and config["config"]["drop_path_rate"] == 0  # the model trained
    a, b = load_seggpt(first).state_dict(), load_seggpt(tmp_path / "s2" / "seggpt_demo.safetensors").state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)  # trained on from stage 1


def test_init_from_another_shape_is_refused(tmp_path):
    from seggpt_model import save_checkpoint
    from seggpt_model.testing import random_model

    other = save_checkpoint(random_model(), tmp_path / "tiny.safetensors")
    done = train(tmp_path / "out", "--init", str(other))
    assert done.returncode != 0 and "does not fit the demo configuration: size mismatch" in done.stderr
    assert "Traceback" not in done.stderr


def test_drop_path_outside_its_range_is_refused(tmp_path):
    done = train(tmp_path / "out", "--drop-path", "1.5")
    assert done.returncode == 2 and "expected a value in [0, 1), got 1.5" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written

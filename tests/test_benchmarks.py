"""The benchmarks still run end to end (smallest settings; their figures are not asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=600)


def test_speed_benchmark_reports_every_case_and_the_ensemble_cost(tmp_path):
    out = tmp_path / "speed.json"
    run("speed.py", "--config", "tiny", "--repeats", "1", "--json", str(out))
    report = json.loads(out.read_text())
    cases = {(r["case"], r["impl"], r["dtype"]) for r in report["rows"]}
    assert cases == {(c, i, d) for c in ("pair", "k4", "batch4") for i in ("ours", "hf") for d in ("fp32", "bf16")}
    assert all(r["s_per_query"] > 0 and r["peak_rss_mb"] > 0 for r in report["rows"])
    assert set(report["k4_over_pair"]) == {"ours fp32", "hf fp32", "ours bf16", "hf bf16"}


def test_quality_benchmark_reports_every_measure(tmp_path):
    out = tmp_path / "quality.json"
    run("quality.py", "--episodes", "3", "--projects", "1", "--held-out", "2", "--tune-steps", "2", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["train-domain mIoU"]) == {"1-shot", "2-shot", "4-shot", "8-shot"}
    assert 0 <= report["absent-target false-positive rate"] <= 1
    assert {"one-shot", "tuned-5", "tuned-10", "tuned-20"} <= set(report["shifted-domain mIoU"])
    assert all(0 <= v <= 1 for v in report["shifted-domain mIoU"].values())


def test_quality_benchmark_validation_split_measures_only_what_is_asked(tmp_path):
    out = tmp_path / "validation.json"
    run("quality.py", "--episodes", "2", "--ks", "1", "--projects", "0", "--first-seed", "3000000000",
        "--json", str(out))
    report = json.loads(out.read_text())
    assert report["first_seed"] == 3_000_000_000 and set(report["train-domain mIoU"]) == {"1-shot"}
    assert report["shifted-domain mIoU"] == {} and 0 <= report["absent-target false-positive rate"] <= 1


def test_quality_benchmark_refuses_bad_prompt_counts():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--ks", "1,0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected comma-separated positive integers, got '1,0'" in done.stderr


def test_memory_benchmark_loads_both_layouts_in_both_dtypes(tmp_path):
    out = tmp_path / "memory.json"
    run("memory.py", "--config", "tiny", "--json", str(out))
    rows = json.loads(out.read_text())
    assert {(r["layout"], r["dtype"]) for r in rows} == {(la, d) for la in ("official .pth", "HF safetensors")
                                                         for d in ("bf16", "fp32")}
    assert all(r["after_k4_mb"] >= r["after_k1_mb"] >= r["after_load_mb"] >= r["start_mb"] > 0 for r in rows)


def test_quality_benchmark_highres_suite_compares_tiling_off_and_auto(tmp_path):
    out = tmp_path / "highres.json"
    run("quality.py", "--suite", "highres", "--episodes", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["suite"] == "highres"
    assert set(report["modes"]) == {"off", "off, refined", "auto, unrefined", "auto"}
    off, auto = report["modes"]["off"], report["modes"]["auto"]
    assert off["tiles/query"] == 1 and auto["tiles/query"] > 1
    for row in report["modes"].values():
        assert 0 <= row["mIoU"] <= 1 and 0 <= row["boundary F"] <= 1 and row["s/query"] > 0


def test_quality_benchmark_scale_sweep_reports_each_size(tmp_path):
    out = tmp_path / "sweep.json"
    run("quality.py", "--suite", "scale-sweep", "--episodes", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) > 3 and all(0 <= r["mIoU"] <= 1 and 0 < r["on canvas"] < 1 for r in rows)

"""A short run of benchmarks/load.py's workload (8 clients for 5 s) against a live server: correctness only.

Timings and memory are the benchmark's business; this checks that under concurrency every
/predict is answered with one prediction per task and /health keeps answering.
"""
from __future__ import annotations

import time

import httpx
import pytest

from backend.app import create_app
from backend.model import SegGPTBackend
from backend.settings import Settings
from benchmarks.load import CONFIG, PROJECT, annotation_event, run_load
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model


@pytest.fixture
def live_url(tmp_path, store, image_server, serve) -> str:
    settings = Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,), min_region_area=1)
    backend = SegGPTBackend(settings, store, predictor=SegGPTPredictor(random_model(), device="cpu"))
    return serve(create_app(settings, backend))


def test_concurrent_predictions_are_all_answered(live_url, image_server) -> None:
    scenes = [image_server.add_scene(f"s{i}.png", size=(48 + 8 * i, 40), box=(4, 4, 20, 20), seed=i) for i in range(4)]
    with httpx.Client(base_url=live_url, timeout=60) as http:
        for i, (url, label_map) in enumerate(scenes[:2]):
            http.post("/webhook", json=annotation_event(i + 1, 100 + i, url, label_map)).raise_for_status()
        deadline = time.monotonic() + 30
        while not http.post("/setup", json={"project": PROJECT, "schema": CONFIG}).json()["model_version"].endswith("-v2"):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    report = run_load(live_url, [url for url, _ in scenes], clients=8, duration=5, tasks_per_request=2)

    assert report.sent >= 8 and report.failures == []
    assert report.answered == report.sent  # 200, one well-formed prediction per task
    assert report.reasons == []  # every image was readable, so every task was predicted
    assert report.health_latency and report.health_failures == []

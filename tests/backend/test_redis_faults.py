"""Redis killed (SIGKILL) and restarted while /predict is under load: predictions resume by themselves.

A real redis-server process with its append-only file, the app under a real uvicorn, and
client threads posting /predict back to back through the crash: while Redis is down every
answer is a 503 naming Redis (never a 500, never a hang), and once it is back the same
server, without a restart, answers every request again with the same model_version.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from backend.app import create_app
from backend.model import SegGPTBackend
from backend.settings import Settings
from backend.store import PromptStore
from benchmarks.load import CONFIG, PROJECT, annotation_event
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.redis_process import RedisProcess

CLIENTS = 4


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def live_url(tmp_path, redis_process, image_server, serve) -> str:
    settings = Settings(model_dir=tmp_path / "model", device="cpu", redis_url=redis_process.url,
                        allowed_media_hosts=(image_server.host,), min_region_area=1)
    backend = SegGPTBackend(settings, PromptStore.from_settings(settings),
                            predictor=SegGPTPredictor(random_model(), device="cpu"))
    return serve(create_app(settings, backend), log_level="critical")


def test_predictions_resume_by_themselves_after_redis_is_killed_and_restarted(live_url, redis_process,
                                                                              image_server) -> None:
    scenes = [image_server.add_scene(f"s{i}.png", size=(56, 40), box=(4, 4, 24, 24), seed=i) for i in range(3)]
    with httpx.Client(base_url=live_url, timeout=60) as http:
        for i, (url, label_map) in enumerate(scenes[:2]):
            http.post("/webhook", json=annotation_event(i + 1, 100 + i, url, label_map)).raise_for_status()
        deadline = time.monotonic() + 30
        while not (version := http.post("/setup", json={"project": PROJECT, "schema": CONFIG})
                   .json()["model_version"]).endswith("-v2"):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    answers: list[tuple[float, int, dict]] = []  # (time, status, body)
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=live_url, timeout=30) as http:
            n = 0
            while not stop.is_set():
                task = {"id": index * 1000 + n, "data": {"image": scenes[n % len(scenes)][0]}}
                n += 1
                response = http.post("/predict", json={"project": PROJECT, "label_config": CONFIG, "tasks": [task]})
                answers.append((time.monotonic(), response.status_code, response.json()))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        _wait_for(lambda: sum(status == 200 for _, status, _ in answers) >= 2 * CLIENTS, "predictions before the crash")
        redis_process.stop(kill=True)
        killed = time.monotonic()
        _wait_for(lambda: sum(status == 503 for _, status, _ in answers) >= 2 * CLIENTS, "503s while Redis is down")
        time.sleep(0.5)
        redis_process.start()  # same port and data directory: nothing in the service is restarted
        restarted = time.monotonic()
        _wait_for(lambda: sum(status == 200 and t > restarted for t, status, _ in answers) >= 4 * CLIENTS,
                  "predictions after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    assert {status for _, status, _ in answers} <= {200, 503}, "only predictions or a Redis 503, never a crash"
    for t, status, body in answers:
        if status == 503:
            assert "Redis" in body["detail"] and killed - 1 < t
        else:
            [prediction] = body["results"]
            assert "reason" not in prediction and prediction["model_version"] == version  # the AOF kept it all
    recovered = [t for t, status, _ in answers if status == 200 and t > restarted]
    last_failure = max(t for t, status, _ in answers if status == 503)
    assert last_failure < min(recovered) + 5, "503s went on long after predictions had resumed"
    with httpx.Client(base_url=live_url, timeout=10) as http:
        assert http.get("/health").json()["status"] == "UP"


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)

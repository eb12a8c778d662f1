"""The prompt state on a real redis-server process: no lost update between processes, state
that survives a Redis crash, and a service that rides out a Redis outage by itself."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.model import SegGPTBackend
from backend.settings import Settings
from backend.store import PromptEntry, PromptStore
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.redis_process import RedisProcess
from tests.backend.test_packs import fill
from tests.backend.test_state_api import CONFIG

CHANGES = 100


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def entry(task: int) -> PromptEntry:
    return PromptEntry(task, task + 1, float(task), {"image": f"img-{task}".encode()}, {"tag": f"map-{task}".encode()})


def change_project(url: str, writer: int) -> tuple[list[int], float]:
    """One replica's share of the race: waits for the other, then makes CHANGES versions."""
    store = PromptStore(redis.Redis.from_url(url), keep_versions=10)
    store.redis.incr("ready")
    while int(store.redis.get("ready")) < 2:
        time.sleep(0.001)
    started = time.monotonic()
    versions = [store.put_entry("1", entry(writer * 1000 + n)) for n in range(CHANGES)]
    return versions, time.monotonic() - started


def test_two_processes_never_lose_a_change(redis_process: RedisProcess) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        (first, t1), (second, t2) = pool.starmap(change_project, [(redis_process.url, 0), (redis_process.url, 1)])
    assert sorted(first + second) == list(range(1, 2 * CHANGES + 1))  # every change got its own version
    store = PromptStore(redis.Redis.from_url(redis_process.url), keep_versions=10)
    assert store.version("1") == 2 * CHANGES and store.entry_count("1") == 2 * CHANGES
    assert len(store.history("1")) == 10
    print(f"2 x {CHANGES} concurrent changes (processes, redis-server): final version {store.version('1')}, "
          f"{max(t1, t2):.2f} s")


def test_prompt_state_survives_a_redis_crash(redis_process: RedisProcess) -> None:
    store = PromptStore(redis.Redis.from_url(redis_process.url))
    fill(store, "1")
    store.rollback("1", 2)
    before = (store.version("1"), store.history("1"), store.entries("1")[1], store.tuned_prompt("1"),
              store.settings("1"), store.redis.hgetall("seggpt:p:1:blobrefs"))
    redis_process.stop(kill=True)  # SIGKILL: only what the append-only file holds comes back
    with pytest.raises(redis.ConnectionError):
        store.version("1")
    redis_process.start()
    after = (store.version("1"), store.history("1"), store.entries("1")[1], store.tuned_prompt("1"),
             store.settings("1"), store.redis.hgetall("seggpt:p:1:blobrefs"))
    assert after == before and before[0] == 5
    assert store.put_entry("1", entry(7)) == 6  # and it goes on from there


def test_the_service_rides_out_a_redis_outage(redis_process: RedisProcess, tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path, device="cpu", redis_url=redis_process.url)
    backend = SegGPTBackend(settings, PromptStore.from_settings(settings),
                            predictor=SegGPTPredictor(random_model(), device="cpu"))
    client = TestClient(create_app(settings, backend))
    setup = {"project": "1.1795551004", "schema": CONFIG}
    fill(backend.store, "1")
    version = client.post("/setup", json=setup).json()["model_version"]
    pack = client.get("/projects/1/pack").content
    redis_process.stop(kill=True)

    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "DEGRADED"
    predict = {"project": "1", "label_config": CONFIG, "tasks": [{"id": 1, "data": {"image": "http://x/y.png"}}]}
    for method, path, body in [("POST", "/setup", setup), ("POST", "/predict", predict),
                               ("POST", "/projects/1/rollback", {"version": 1})]:
        response = client.request(method, path, json=body)
        assert response.status_code == 503 and "Redis" in response.json()["detail"], path
    assert client.post("/projects/1/pack", content=pack).status_code == 503

    redis_process.start()  # same port, same data directory
    assert client.get("/health").json()["status"] == "UP"
    assert client.post("/setup", json=setup).json()["model_version"] == version  # nothing half-written
    assert client.post("/projects/1/rollback", json={"version": 1}).json()["version"] == 5

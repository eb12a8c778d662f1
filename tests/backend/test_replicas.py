"""Two real backend processes on one real redis-server share one prompt state per project,
and the pack commands of the CLI work against the same Redis."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import redis

from backend.cli import main
from backend.label_config import parse_label_config
from backend.results import label_map_to_results
from backend.store import PromptStore
from seggpt_model import save_checkpoint
from seggpt_model.testing import random_model
from tests.backend.redis_process import RedisProcess, free_port
from tests.backend.test_packs import fill

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Cat"/></BrushLabels></View>"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcess, dict]]:
    """A redis-server and the environment every backend process of this module gets."""
    root = tmp_path_factory.mktemp("replicas")
    server = RedisProcess(root / "redis").start()
    weights = save_checkpoint(random_model(), root / "tiny.safetensors")
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env |= {"REDIS_URL": server.url, "MODEL_DIR": str(root / "model_dir"), "SEGGPT_WEIGHTS": str(weights),
            "DEVICE": "cpu", "LOG_LEVEL": "WARNING", "MIN_REGION_AREA": "1"}
    yield server, env
    server.stop()


def wait_for(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def replicas(shared, image_server, tmp_path) -> Iterator[list[httpx.Client]]:
    server, env = shared
    redis.Redis.from_url(server.url).flushall()
    env = env | {"ALLOWED_MEDIA_HOSTS": image_server.host}
    procs, clients = [], []
    try:
        for i in range(2):
            port = free_port()
            log = (tmp_path / f"backend-{i}.log").open("wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1",
                                           "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            clients.append(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
        for i, client in enumerate(clients):
            wait_for(lambda: _up(client, procs[i], tmp_path / f"backend-{i}.log"), timeout=180, what="backend")
        yield clients
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def _up(client: httpx.Client, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"backend exited: {log.read_text()[-3000:]}")
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def setup(client: httpx.Client, project: str = "1") -> str:
    response = client.post("/setup", json={"project": f"{project}.1795551004", "schema": CONFIG})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def annotation_created(ann_id: int, task_id: int, url: str, labels) -> dict:
    control = parse_label_config(CONFIG)[0]
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "task": {"id": task_id, "data": {"image": url}},
            "annotation": {"id": ann_id, "task": task_id, "was_cancelled": False,
                           "updated_at": "2026-11-24T20:19:52Z",
                           "result": label_map_to_results(labels, None, control, min_area=1)}}


def test_two_processes_serve_one_prompt_state(replicas, image_server) -> None:
    a, b = replicas
    assert setup(a) == setup(b)  # same weights, same Redis: same model_version before anything

    url, labels = image_server.add_scene("prompt.png")
    assert a.post("/webhook", json=annotation_created(1, 10, url, labels)).status_code == 200
    wait_for(lambda: setup(b).endswith("-v1"), what="replica b to see the annotation made through a")
    query, _ = image_server.add_scene("query.png", seed=3)
    body = {"project": "1.1795551004", "label_config": CONFIG, "tasks": [{"id": 11, "data": {"image": query}}]}
    from_b = b.post("/predict", json=body).json()
    assert from_b["model_version"] == setup(a) and from_b["results"][0]["result"]

    pack = b.get("/projects/1/pack").content  # an import through b ...
    assert b.post("/projects/2/pack", content=pack).json()["version"] == 1
    assert [v["entries"] for v in a.get("/projects/2/versions").json()["versions"]] == [1]  # ... a serves
    assert setup(a, "2") == setup(b, "2")

    response = a.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}],
                                        "project": {"id": 1}})
    assert response.status_code == 200
    wait_for(lambda: setup(b).endswith("-v2"), what="replica b to see the deletion")
    assert a.post("/projects/1/rollback", json={"version": 1}).json()["version"] == 3  # a rollback through a ...
    assert setup(b).endswith("-v3")  # ... is b's very next answer
    again = b.post("/predict", json=body).json()["results"][0]
    assert without_ids(again["result"]) == without_ids(from_b["results"][0]["result"])  # v3 is v1 again


def without_ids(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "id"} for r in results]


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_exports_imports_lists_and_rolls_back(shared, tmp_path, monkeypatch, capsys) -> None:
    server, env = shared
    store = PromptStore(redis.Redis.from_url(server.url))
    store.redis.flushall()
    fill(store, "1")
    out = tmp_path / "p1.zip"
    exported = run_cli(env, "export", "--project", "1", "--out", str(out))  # the real entry point, once
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["version"] == 4 and out.is_file() and not out.with_suffix(".zip.part").exists()

    for name, value in env.items():  # the rest in this process: the same main(), without the start-up
        monkeypatch.setenv(name, value)

    def cli(*args: str) -> tuple[int, dict | None, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        captured = capsys.readouterr()
        return exited.value.code, json.loads(captured.out) if captured.out else None, captured.err

    code, imported, _ = cli("import", "--project", "7", str(out))
    assert code == 0 and imported["entries"] == 2 and imported["version"] == 1
    assert store.entries("7")[1] == store.entries("1")[1] and store.tuned_prompt("7") == store.tuned_prompt("1")

    (tmp_path / "bad.zip").write_bytes(out.read_bytes()[:-50])
    code, _, err = cli("import", "--project", "7", str(tmp_path / "bad.zip"))
    assert code == 1 and "truncated" in err and "Traceback" not in err
    code, _, err = cli("import", "--project", "7", str(tmp_path / "none.zip"))
    assert code == 1 and "cannot read" in err
    assert store.version("7") == 1

    code, listed, _ = cli("versions", "--project", "1")
    assert code == 0 and [v["version"] for v in listed["versions"]] == [4, 3, 2, 1]
    code, rolled, _ = cli("rollback", "--project", "1", "--version", "2")
    assert code == 0 and rolled == {"project": "1", "status": "rolled_back", "version": 5}
    code, _, err = cli("rollback", "--project", "1", "--version", "99")
    assert code == 1 and "version 99 of project 1 is not in its history" in err

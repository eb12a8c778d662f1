"""Redis killed (SIGKILL) and restarted while a tune job runs on a worker process.

A real redis-server with its append-only file holds a project's prompt state; a
``seggpt-backend worker`` process runs a tune job; Redis is killed mid-tuning and started
again on the same port from the same AOF. The job must end visibly (finished, or failed
with a reason, never left running), the prompt state must be one whole version (the old
one, or the next one carrying the tuned prompt), and a new trigger must run to its end.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from backend.jobs import JobQueue
from backend.model import SegGPTBackend
from backend.prompting import unpack_tuned
from backend.settings import Settings
from backend.store import PromptStore
from seggpt_model import SegGPTPredictor, load_seggpt
from tests.backend.redis_process import RedisProcess
from tests.backend.test_tuning_service import PROJECT, annotate

REPO_ROOT = Path(__file__).resolve().parents[2]
ENDED = ("finished", "failed")


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def worker(tmp_path, redis_process, tiny_checkpoint) -> Iterator[subprocess.Popen]:
    """``python -m backend worker`` on the test's redis-server; it and its work horses are killed at the end."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env = keep | {"REDIS_URL": redis_process.url, "SEGGPT_WEIGHTS": str(tiny_checkpoint), "DEVICE": "cpu",
                  "MODEL_DIR": str(tmp_path / "model"), "NUM_PROMPTS": "2", "TUNE_STEPS": "150", "TUNE_BATCH": "2",
                  "TUNE_BF16": "false", "TUNE_MIN_GAIN": "-1", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO"}
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "worker"], env=env, cwd=REPO_ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    yield proc
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    log.close()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_tune_job_survives_redis_killed_and_restarted(tmp_path, redis_process, worker, tiny_checkpoint,
                                                        image_server, brush_config) -> None:
    settings = Settings(model_dir=tmp_path / "model", device="cpu", redis_url=redis_process.url, num_prompts=2,
                        allowed_media_hosts=(image_server.host,), min_region_area=1,
                        seggpt_weights=str(tiny_checkpoint))
    store = PromptStore.from_settings(settings)
    backend = SegGPTBackend(settings, store, predictor=SegGPTPredictor(load_seggpt(str(tiny_checkpoint)), "cpu"))
    annotate(backend, image_server, brush_config, range(1, 5))
    before = store.state(PROJECT)
    assert before.version == 4 and len(before.entries) == 4 and before.tuned is None
    queue = JobQueue(store)

    job, created = queue.submit(PROJECT, "tune", {"label_config": brush_config})
    assert created
    wait_for(lambda: (queue.get(job["id"]) or {}).get("done", 0) >= 2, "the tune job to be tuning", 60)
    redis_process.stop(kill=True)
    time.sleep(1.5)
    redis_process.start()  # same port, same AOF directory

    def settled() -> dict | None:
        record = queue.get(job["id"])  # a dead job is marked failed when looked at
        return record if record["status"] in ENDED else None

    record = wait_for(settled, "the interrupted job to end visibly", 30)
    if record["status"] == "failed":
        assert record["reason"] and "Traceback" not in record["reason"] and "File \"" not in record["reason"]
    assert queue.get(job["id"])["status"] == record["status"]  # and it stays ended
    assert worker.poll() is None, "the worker quit when Redis went away"
    worker_log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "lost the connection to Redis" in worker_log or record["status"] == "finished"
    assert "Traceback" not in worker_log and 'File "' not in worker_log, worker_log[-3000:]

    after = store.state(PROJECT)  # decodes, and its blobs are all there
    assert dict(after.entries) == dict(before.entries)
    assert [e.task_id for e in store.entries(PROJECT)[1]] and len(store.entries(PROJECT)[1]) == 4
    history = store.history(PROJECT)
    assert [h["version"] for h in history] == list(range(after.version, 0, -1))
    assert all(h["entries"] == 4 for h in history[: after.version - 3])
    if after.version == before.version:  # the run promoted nothing
        assert after.tuned is None and store.tuned_prompt(PROJECT) is None
    else:  # the run promoted: one whole new version with the tuned prompt
        assert after.version == before.version + 1 and record["status"] == "finished"
        assert set(unpack_tuned(store.tuned_prompt(PROJECT))) == {"tag"}
        assert history[0]["tuned"] is True

    rerun, created = queue.submit(PROJECT, "tune", {"label_config": brush_config})
    assert created and rerun["id"] != job["id"]  # no stale claim on (project, tune)
    final = wait_for(lambda: (r := queue.get(rerun["id"]))["status"] in ENDED and r, "the new tune job", 60)
    assert final["status"] == "finished", final
    assert final["result"]["decision"] == "promoted"
    latest = store.state(PROJECT)
    assert latest.version == after.version + 1 and dict(latest.entries) == dict(before.entries)
    assert set(unpack_tuned(store.tuned_prompt(PROJECT))) == {"tag"}

"""Job records and the one-active-job rule, on a real Redis with RQ's real queue (no worker here)."""
from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from rq.job import Job
from rq.serializers import JSONSerializer

from backend import jobs as jobs_module
from backend.app import create_app
from backend.jobs import LOST, JobQueue
from backend.model import SegGPTBackend
from backend.prelabel import NEEDS_LABEL_STUDIO
from backend.settings import Settings
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model


@pytest.fixture
def queue(store) -> JobQueue:
    return JobQueue(store)


def rq_job(queue: JobQueue, job_id: str) -> Job:
    return Job.fetch(job_id, connection=queue.queue.connection, serializer=JSONSerializer)


def test_a_second_trigger_joins_the_active_job(queue) -> None:
    first, created = queue.submit("1", "prelabel", {"batch_size": 4})
    assert created and first["status"] == "queued" and first["params"] == {"batch_size": 4}
    again, created_again = queue.submit("1", "prelabel")
    assert not created_again and again["id"] == first["id"]
    assert queue.queue.job_ids == [first["id"]]  # enqueued on RQ once, under the record's id
    assert rq_job(queue, first["id"]).args == [first["id"]]
    other_project, created_other = queue.submit("2", "prelabel")
    assert created_other and other_project["id"] != first["id"]
    assert [j["id"] for j in queue.jobs("1")] == [first["id"]]


def test_simultaneous_triggers_create_exactly_one_job(queue) -> None:
    ids: list[str] = []
    start = threading.Barrier(8)

    def trigger() -> None:
        start.wait()
        ids.append(queue.submit("5", "prelabel")[0]["id"])

    threads = [threading.Thread(target=trigger) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 8
    assert len(queue.jobs("5")) == 1 and queue.queue.count == 1


def test_an_ended_job_frees_its_project_and_kind(queue) -> None:
    first, _ = queue.submit("1", "prelabel")
    failed = queue.fail(first["id"], "Label Studio went away")
    assert failed["status"] == "failed" and failed["reason"] == "Label Studio went away" and failed["ended_at"]
    assert queue.fail(first["id"], "again") is None  # an ended job stays as it ended
    second, created = queue.submit("1", "prelabel")
    assert created and second["id"] != first["id"]
    assert [j["id"] for j in queue.jobs("1")] == [second["id"], first["id"]]  # newest first


def test_a_job_taken_off_the_queue_is_failed_and_the_next_trigger_starts_anew(queue) -> None:
    first, _ = queue.submit("3", "prelabel")
    rq_job(queue, first["id"]).cancel()  # what an operator's `rq` command (or a lost worker) leaves
    record = queue.get(first["id"])
    assert record["status"] == "failed" and record["reason"] == LOST
    second, created = queue.submit("3", "prelabel")
    assert created and second["id"] != first["id"]


def test_a_running_job_without_heartbeat_is_failed(queue, store) -> None:
    job, _ = queue.submit("4", "prelabel", inline=True)  # running in "this" process
    assert queue.get(job["id"])["status"] == "running"
    store.redis.delete(queue._alive_key(job["id"]))  # the process died: its heartbeat expired
    assert queue.get(job["id"])["status"] == "failed"
    assert queue.submit("4", "prelabel")[1]


@pytest.mark.parametrize("runner", ["backend.no_such_tuning_module:run_tune", "backend.jobs:no_such_function"])
def test_tune_fails_visibly_while_no_tuning_job_is_installed(queue, monkeypatch, runner) -> None:
    monkeypatch.setitem(jobs_module.RUNNERS, "tune", runner)
    job, created = queue.submit("1", "tune")
    assert created and job["status"] == "failed" and job["reason"].startswith("tuning not available")
    assert queue.queue.count == 0  # nothing pretends to run
    assert queue.submit("1", "tune")[0]["id"] != job["id"]  # a failed job holds nothing
    assert queue.get(job["id"]) == job


def test_unknown_kind_is_refused(queue) -> None:
    with pytest.raises(ValueError, match="unknown job kind 'train'"):
        queue.submit("1", "train")


def test_a_failing_job_ends_with_a_reason_and_no_traceback(queue, tmp_path) -> None:
    job, _ = queue.submit("1", "prelabel")
    final = queue.run(job["id"], Settings(model_dir=tmp_path, device="cpu"))  # no Label Studio configured
    assert final["status"] == "failed" and final["reason"] == NEEDS_LABEL_STUDIO
    assert final == queue.get(job["id"]) and final["started_at"] >= job["created_at"]

    job, _ = queue.submit("1", "prelabel")
    unreachable = Settings(model_dir=tmp_path, device="cpu", label_studio_url="http://127.0.0.1:9",
                           label_studio_api_key="0123456789abcdef")
    final = queue.run(job["id"], unreachable)
    assert final["status"] == "failed" and "cannot reach Label Studio" in final["reason"]
    assert "Traceback" not in json.dumps(queue.jobs("1")) and "0123456789abcdef" not in json.dumps(queue.jobs("1"))
    assert queue.submit("1", "prelabel")[1]  # the failures freed the project


# -- over HTTP ----------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path, store) -> TestClient:
    settings = Settings(model_dir=tmp_path, device="cpu")
    backend = SegGPTBackend(settings, store, predictor=SegGPTPredictor(random_model(), device="cpu"))
    return TestClient(create_app(settings, backend))


def test_http_prelabel_trigger_joins_and_job_status(client) -> None:
    response = client.post("/projects/7/prelabel", json={"batch_size": 4})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["project"] == "7" and job["joined"] is False
    again = client.post("/projects/7/prelabel")
    assert again.status_code == 202 and again.json()["id"] == job["id"] and again.json()["joined"] is True
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    assert [j["id"] for j in client.get("/projects/7/jobs").json()["jobs"]] == [job["id"]]
    assert client.get("/projects/8/jobs").json() == {"jobs": []}


@pytest.mark.parametrize("method, path, body, status, detail", [
    ("post", "/projects/x7/prelabel", None, 422, "project must be a Label Studio project id"),
    ("post", "/projects/7/prelabel", {"batch_size": 0}, 422, "batch_size"),
    ("post", "/projects/7/prelabel", {"batch": 4}, 422, "batch"),
    ("get", "/projects/x/jobs", None, 422, "project must be"),
    ("get", "/jobs/prelabel-999", None, 404, "no job 'prelabel-999'"),
])
def test_http_job_errors_are_clear(client, method, path, body, status, detail) -> None:
    response = getattr(client, method)(path, **({"json": body} if body is not None else {}))
    assert response.status_code == status and detail in response.json()["detail"]


def test_start_training_joins_an_active_tune_job(client, monkeypatch) -> None:
    monkeypatch.setitem(jobs_module.RUNNERS, "tune", "backend.prelabel:run_prelabel")  # any installed runner
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}}).json()
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}}).json()
    assert first["status"] == "queued" and second["status"] == "joined" and second["job"] == first["job"]

"""Whole-project pre-labeling in this process: real Redis, real HTTP to the local fake Label
Studio and the image server, a tiny random-weight SegGPT checkpoint."""
from __future__ import annotations

import threading
import time

import pytest

from backend.jobs import JobQueue
from backend.settings import Settings
from backend.store import model_version
from tests.backend.fake_project import PROJECT, Project, make_project
from tests.backend.local_http import LEGACY_KEY, server  # noqa: F401  (fixture)

P = str(PROJECT)


@pytest.fixture
def settings(tmp_path, image_server, server, tiny_checkpoint) -> Settings:  # noqa: F811
    return Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,), min_region_area=1,
                    num_prompts=2, label_studio_url=server.url, label_studio_api_key=LEGACY_KEY,
                    seggpt_weights=str(tiny_checkpoint))


@pytest.fixture
def project(server, image_server, brush_config) -> Project:  # noqa: F811
    return make_project(server, image_server, brush_config, annotated=2, cancelled=1, unlabeled=5)


@pytest.fixture
def queue(store) -> JobQueue:
    return JobQueue(store)


def run_prelabel(queue: JobQueue, settings: Settings, **params) -> dict:
    job, created = queue.submit(P, "prelabel", params)
    assert created
    return queue.run(job["id"], settings)


def current_version(queue: JobQueue, settings: Settings) -> str:
    from backend.model import weights_fingerprint

    return model_version(weights_fingerprint(settings.seggpt_weights), queue.store.version(P))


def test_prelabel_predicts_every_unlabeled_task_once_and_skips_labeled_ones(queue, settings, project) -> None:
    final = run_prelabel(queue, settings, batch_size=3)
    assert final["status"] == "finished", final
    version = current_version(queue, settings)
    assert queue.store.entry_count(P) == 2  # the two annotations became prompts (read from Label Studio)
    per_task = project.ls.per_task()
    assert sorted(per_task) == project.unlabeled  # the skipped-only task counts as unlabeled
    assert all(versions == [version] for versions in per_task.values())
    assert all(p["result"] and p["result"][0]["type"] == "brushlabels" for p in project.ls.predictions)
    assert final["result"] == {"tasks": 8, "labeled": 2, "predicted": 6, "already_predicted": 0, "failed": 0,
                               "model_version": version}
    assert final["progress"] == 1.0 and final["done"] == final["total"] == 6

    again = run_prelabel(queue, settings)
    assert again["status"] == "finished" and again["result"]["predicted"] == 0
    assert again["result"]["already_predicted"] == 6
    assert len(project.ls.predictions) == 6  # no duplicates


def test_a_prediction_written_before_a_crash_is_not_written_again(queue, settings, project) -> None:
    """The done-set in Redis lacks it (the crash came between the write and the bookkeeping),
    but Label Studio has it: the job checks there before predicting."""
    assert run_prelabel(queue, settings)["status"] == "finished"
    queue.store.redis.delete(*queue.store.redis.keys("seggpt:p:1:prelabeled:*"))
    stale = {"task": project.unlabeled[0], "result": [], "score": 0.1, "model_version": "seggpt-older-v0"}
    project.ls.predictions.append(stale)  # an older version's prediction does not count
    again = run_prelabel(queue, settings)
    assert again["result"]["predicted"] == 0 and again["result"]["already_predicted"] == 6
    assert len(project.ls.predictions) == 7


def test_job_goes_queued_running_finished_with_progress(queue, settings, project) -> None:
    project.ls.hold_after = 2  # the third write waits: the job is caught mid-run
    job, _ = queue.submit(P, "prelabel", {"batch_size": 2})
    assert queue.get(job["id"])["status"] == "queued"
    worker = threading.Thread(target=queue.run, args=(job["id"], settings))
    worker.start()
    try:
        assert project.ls.holding.wait(120), "the job never reached its third write"
        running = queue.get(job["id"])
        assert running["status"] == "running" and running["worker"]
        assert running["done"] == 2 and running["total"] == 6 and running["progress"] == pytest.approx(1 / 3, 1e-3)
        assert queue.submit(P, "prelabel") == (running, False)  # a trigger meanwhile joins it
    finally:
        project.ls.release.set()
        worker.join(120)
    final = queue.get(job["id"])
    assert final["status"] == "finished" and final["ended_at"] >= final["started_at"] >= final["created_at"]
    assert final["message"].startswith("6 tasks predicted, 0 already had")


def test_project_without_annotations_fails_with_the_reason(queue, settings, server, image_server,  # noqa: F811
                                                            brush_config) -> None:
    make_project(server, image_server, brush_config, annotated=0, cancelled=0, unlabeled=3)
    final = run_prelabel(queue, settings)
    assert final["status"] == "failed" and final["reason"].startswith("no annotated examples yet")


def test_tasks_whose_image_cannot_be_read_are_counted_not_written(queue, settings, project, image_server) -> None:
    broken = project.unlabeled[-1]
    (image_server.root / f"t{broken}.png").unlink()
    final = run_prelabel(queue, settings)
    assert final["status"] == "finished" and final["result"]["failed"] == 1 and final["result"]["predicted"] == 5
    assert "could not be predicted" in final["message"] and broken not in project.ls.per_task()


def test_bad_batch_size_is_a_clear_failure(queue, settings, project) -> None:
    final = run_prelabel(queue, settings, batch_size=0)
    assert final["status"] == "failed" and final["reason"] == "batch_size must be an integer from 1 to 256, got 0"


def test_heartbeat_keeps_a_long_job_alive(queue, settings, project, monkeypatch) -> None:
    """A job busy longer than the heartbeat's lifetime is still running, not reaped."""
    from backend import jobs

    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.6)
    project.ls.hold_after = 0
    job, _ = queue.submit(P, "prelabel")
    worker = threading.Thread(target=queue.run, args=(job["id"], settings))
    worker.start()
    try:
        assert project.ls.holding.wait(120)
        time.sleep(1.5)
        assert queue.get(job["id"])["status"] == "running"
    finally:
        project.ls.release.set()
        worker.join(120)
    assert queue.get(job["id"])["status"] == "finished"

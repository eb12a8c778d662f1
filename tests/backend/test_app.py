"""The HTTP service as Label Studio 1.23 calls it: real HTTP (TestClient, uvicorn), real Redis."""
from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient

from backend.app import PREDICT_THREADS, create_app
from backend.label_config import parse_label_config
from backend.jobs import RUNNERS
from backend.model import NO_CLIENT, NO_PROMPTS, SegGPTBackend
from backend.results import label_map_to_results
from backend.settings import Settings
from backend.store import PromptStore, connect
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model

PROJECT = "1.1795551004"  # what Label Studio sends to /setup and /predict


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


@pytest.fixture
def settings(tmp_path, image_server) -> Settings:
    return Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,), min_region_area=1)


@pytest.fixture
def backend(settings, store, predictor) -> SegGPTBackend:
    return SegGPTBackend(settings, store, predictor=predictor)


@pytest.fixture
def client(settings, backend) -> TestClient:
    return TestClient(create_app(settings, backend))


def task(task_id: int, url: str) -> dict:
    """A task serialized as Label Studio does for /predict (TaskSimpleSerializer fields)."""
    return {"id": task_id, "data": {"image": url}, "meta": {}, "created_at": "2026-11-24T20:19:50.988480Z",
            "updated_at": "2026-11-24T20:19:50.988506Z", "is_labeled": False, "overlap": 1, "inner_id": task_id,
            "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0,
            "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1, "updated_by": None,
            "file_upload": None, "comment_authors": [], "annotations": [], "predictions": []}


def predict_body(tasks: list[dict], config: str, context: dict | None = None) -> dict:
    return {"tasks": tasks, "project": PROJECT, "label_config": config,
            "params": {"login": None, "password": None, "context": context}}


def annotation_created(ann_id: int, task_id: int, url: str, label_map, config: str) -> dict:
    control = parse_label_config(config)[0]
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": ann_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
                           "updated_at": "2026-11-24T20:19:52.637541Z", "project": 1, "completed_by": 1,
                           "result": label_map_to_results(label_map, None, control, min_area=1)},
            "task": {"id": task_id, "data": {"image": url}, "is_labeled": True, "project": 1},
            "project": {"id": 1, "title": "p", "label_config": config, "total_annotations_number": 1}}


def setup(client: TestClient, config: str) -> str:
    response = client.post("/setup", json={"project": PROJECT, "schema": config, "hostname": "http://ls:8080",
                                           "access_token": "legacy", "extra_params": '{"threshold": 0.5}'})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_health(client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "UP", "model_class": "SegGPTBackend", "model_loaded": True, "redis": "ok",
                               "demo_model": False}


def test_setup_returns_the_version_predict_uses(client, image_server, brush_config) -> None:
    version = setup(client, brush_config)
    assert version.startswith("seggpt-") and version.endswith("-v0")
    url, _ = image_server.add_scene("q.png")
    body = client.post("/predict", json=predict_body([task(1, url)], brush_config)).json()
    assert body["results"][0]["model_version"] == body["model_version"] == version
    # extra_params may be an object too (label-studio-ml 2.x fails on that)
    again = client.post("/setup", json={"project": PROJECT, "schema": brush_config, "extra_params": {"a": 1}})
    assert again.json() == {"model_version": version}


def test_setup_with_an_unservable_config_is_a_clear_4xx(client) -> None:
    response = client.post("/setup", json={"project": PROJECT, "schema": "<View><Text name='t' value='$t'/></View>"})
    assert response.status_code == 422
    assert "label config cannot be served" in response.json()["detail"]
    response = client.post("/setup", json={"project": PROJECT, "schema": "<View><oops"})
    assert response.status_code == 422 and "not valid XML" in response.json()["detail"]


def test_batch_predict_one_entry_per_task_in_order(client, image_server, brush_config) -> None:
    url, label_map = image_server.add_scene("prompt.png")
    assert client.post("/webhook", json=annotation_created(1, 100, url, label_map, brush_config)).status_code == 200
    sizes = [(64, 48), (30, 70), (90, 40), (50, 50)]
    tasks = [task(i, image_server.add_scene(f"q{i}.png", size=s, box=(3, 3, 20, 20), seed=i)[0])
             for i, s in enumerate(sizes)]
    tasks.insert(2, task(99, image_server.url("missing.png")))
    response = client.post("/predict", json=predict_body(tasks, brush_config))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 5
    assert "HTTP 404" in results[2]["reason"] and "result" not in results[2]
    for prediction, size in zip(results[:2] + results[3:], sizes):
        assert prediction["result"] and "reason" not in prediction
        assert {(r["original_width"], r["original_height"]) for r in prediction["result"]} == {size}


def test_predict_before_any_annotation_explains_why_it_is_empty(client, image_server, brush_config) -> None:
    url, _ = image_server.add_scene("q.png")
    results = client.post("/predict", json=predict_body([task(1, url), task(2, url)], brush_config)).json()["results"]
    assert [r["reason"] for r in results] == [NO_PROMPTS + NO_CLIENT] * 2
    assert all("result" not in r and r["model_version"].endswith("-v0") for r in results)


def test_interactive_predict_answers_for_the_task(client, image_server, brush_config) -> None:
    url, label_map = image_server.add_scene("prompt.png")
    client.post("/webhook", json=annotation_created(1, 100, url, label_map, brush_config))
    context = {"result": [{"id": "kpA", "from_name": "kp", "to_name": "image", "type": "keypointlabels",
                           "original_width": 64, "original_height": 48, "is_positive": True,
                           "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Cat"]}}]}
    response = client.post("/predict", json=predict_body([task(5, url)], brush_config, context))
    assert response.status_code == 200
    [prediction] = response.json()["results"]
    assert prediction["result"] and prediction["model_version"].endswith("-v1")


def test_webhooks_update_and_delete_the_bank_and_change_the_version(client, backend, image_server,
                                                                    brush_config) -> None:
    v0 = setup(client, brush_config)
    url, label_map = image_server.add_scene("a.png")
    response = client.post("/webhook", json=annotation_created(3, 7, url, label_map, brush_config))
    assert response.status_code == 200 and response.json()["status"] == "accepted"
    v1 = setup(client, brush_config)
    assert v1 != v0 and backend.store.entry("1", 7).annotation_id == 3

    response = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3}],
                                             "project": {"id": 1, "title": "p"}})
    assert response.status_code == 200
    v2 = setup(client, brush_config)
    assert v2 not in (v0, v1) and backend.store.entry_count("1") == 0
    versions = client.get("/versions").json()["versions"]
    assert versions == [v2] and client.get("/versions", params={"project": PROJECT}).json() == {"versions": [v2]}


def test_start_training_answers_at_once_with_a_tune_job_that_says_why_it_failed(client, backend,
                                                                                 monkeypatch) -> None:
    monkeypatch.setitem(RUNNERS, "tune", "backend.no_such_tuning_module:run_tune")  # no tuning job installed
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4, "title": "p"}})
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "failed" and body["message"].startswith("tuning not available")
    job = client.get(f"/jobs/{body['job']}").json()
    assert job["kind"] == "tune" and job["project"] == "4" and job["reason"] == body["message"]


def test_other_webhooks_are_acknowledged(client) -> None:
    for body in ({"action": "PROJECT_UPDATED", "project": {"id": 1}}, {"action": "LABEL_LINK_CREATED"}):
        response = client.post("/webhook", json=body)
        assert response.status_code == 200 and response.json()["status"] == "ignored"


@pytest.mark.parametrize("path, body, status, message", [
    ("/predict", b"{not json", 400, "request body is not valid JSON"),
    ("/predict", b"[1, 2]", 422, "valid dictionary"),
    ("/predict", b'{"project": "1", "label_config": "<View/>"}', 422, "tasks: Field required"),
    ("/predict", b'{"tasks": [], "project": "1", "label_config": "<View/>"}', 422, "tasks: List should have"),
    ("/predict", b'{"tasks": [{"data": {}}], "project": "1", "label_config": "x"}', 422, "tasks.0.id: Field required"),
    ("/predict", b'{"tasks": [{"id": 1, "data": "x"}], "project": "1", "label_config": "x"}', 422, "tasks.0.data"),
    ("/predict", b'{"tasks": [{"id": 1, "data": {}}], "project": "x1", "label_config": "x"}', 422, "project"),
    ("/setup", b'{"project": "1"}', 422, "schema: Field required"),
    ("/setup", b'{"project": [], "schema": "<View/>"}', 422, "project"),
    ("/webhook", b'{"project": {"id": 1}}', 422, "action: Field required"),
    ("/webhook", b'{"action": "ANNOTATION_CREATED"}', 422, "project"),
    ("/webhook", b'{"action": "START_TRAINING", "project": {"title": "no id"}}', 422, "project"),
])
def test_malformed_bodies_get_short_json_errors(client, path, body, status, message) -> None:
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert "Traceback" not in response.text and "File \"" not in response.text


class _ExplodingBackend(SegGPTBackend):
    """Fails the way a bug would, with a secret in the message."""

    def predict(self, *args, **kwargs):
        raise RuntimeError("token=supersecret123")


def test_unexpected_errors_are_a_generic_500_and_log_no_secret(settings, store, predictor, image_server,
                                                               brush_config, caplog) -> None:
    client = TestClient(create_app(settings, _ExplodingBackend(settings, store, predictor=predictor)))
    with caplog.at_level(logging.INFO, logger="backend"):
        response = client.post("/predict", json=predict_body([task(1, image_server.url("x.png"))], brush_config))
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; see the server log"}
    assert "supersecret" not in caplog.text and "RuntimeError" in caplog.text
    with caplog.at_level(logging.DEBUG, logger="backend"):
        client.post("/predict", json=predict_body([task(1, image_server.url("x.png"))], brush_config))
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)  # traceback: debug only


def test_lost_redis_is_reported_not_crashed(settings, predictor, tmp_path, brush_config) -> None:
    dead = PromptStore(connect(replace(settings, redis_url=f"unix://{tmp_path / 'gone.sock'}")))
    client = TestClient(create_app(settings, SegGPTBackend(settings, dead, predictor=predictor)))
    assert client.get("/health").json()["redis"] == "unreachable"
    response = client.post("/setup", json={"project": PROJECT, "schema": brush_config})
    assert response.status_code == 503 and "Redis" in response.json()["detail"]


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_guards_every_endpoint(settings, backend, brush_config) -> None:
    secured = replace(settings, basic_auth_user="mluser", basic_auth_pass="mlpass")
    client = TestClient(create_app(secured, backend))
    calls = [("GET", "/health", None), ("GET", "/versions", None),
             ("POST", "/setup", {"project": PROJECT, "schema": brush_config}),
             ("POST", "/predict", predict_body([task(1, "http://x/y.png")], brush_config)),
             ("POST", "/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1}})]
    for method, path, body in calls:
        for headers in ({}, _basic("mluser", "wrong"), _basic("other", "mlpass"), {"Authorization": "Bearer x"}):
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Basic" and "detail" in response.json()
        assert client.request(method, path, json=body, headers=_basic("mluser", "mlpass")).status_code in (200, 201)


@pytest.fixture
def live_server(settings, backend, serve) -> str:
    """The app under a real uvicorn on 127.0.0.1, as Label Studio would reach it."""
    return serve(create_app(settings, backend))


def test_health_and_setup_answer_while_predictions_run(live_server, image_server, brush_config) -> None:
    """Label Studio gives /health 1 s and /setup 3 s, and calls them before every batch."""
    url, label_map = image_server.add_scene("prompt.png")
    image_server.add_scene("q.png")
    with httpx.Client(base_url=live_server, timeout=60) as http:
        http.post("/webhook", json=annotation_created(1, 100, url, label_map, brush_config)).raise_for_status()
        setup_body = {"project": PROJECT, "schema": brush_config}
        while not http.post("/setup", json=setup_body).json()["model_version"].endswith("-v1"):
            time.sleep(0.01)  # webhooks are applied just after they are answered
        answers: list[httpx.Response] = []

        def predict(i: int) -> None:  # each waits for its image until released: predictions in flight
            answers.append(http.post("/predict", json=predict_body(
                [task(i, image_server.url(f"slow/q.png?{i}"))], brush_config)))

        busy = [threading.Thread(target=predict, args=(i,)) for i in range(PREDICT_THREADS + 2)]
        for thread in busy:
            thread.start()
        try:
            while len([p for p in image_server.requests if p.startswith("/slow/")]) < PREDICT_THREADS:
                time.sleep(0.01)
            for _ in range(5):
                started = time.monotonic()
                assert http.get("/health").json()["status"] == "UP"
                assert http.post("/setup", json=setup_body).status_code == 200
                assert time.monotonic() - started < 1.0  # generous: typically a few milliseconds
            assert answers == []  # every prediction was still running meanwhile
        finally:
            image_server.release.set()
            for thread in busy:
                thread.join(60)
    assert len(answers) == PREDICT_THREADS + 2
    assert all(a.status_code == 200 and a.json()["results"][0]["result"] for a in answers)



def test_demo_model_is_announced(tmp_path, store, caplog) -> None:
    """SEGGPT_WEIGHTS=demo serves the bundled checkpoint, and says so in the log and in /health."""
    settings = Settings(model_dir=tmp_path, device="cpu", seggpt_weights="demo")
    with caplog.at_level("WARNING", logger="backend"):
        app = create_app(settings, SegGPTBackend(settings, store))
    assert "demo model" in caplog.text
    body = TestClient(app).get("/health").json()
    assert body["demo_model"] is True and "demo model" in body["warning"] and body["model_loaded"] is False

"""Misconfiguration is named where the user looks: annotations that cannot become prompts
are recorded per project, predictions and /setup say why and which setting to change, and
fixing the cause (a restart with the setting, a good annotation, a deletion) clears it."""
from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.bank import problem_key
from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.model import NO_PROMPTS, ONLY_OWN_EXAMPLE, SegGPTBackend
from backend.problems import BACKFILL_PROBLEM, describe, fix_for, slug
from backend.results import label_map_to_results
from backend.settings import Settings
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.local_http import FakeLabelStudio, LocalServer, Reply

PROJECT = "1.1795551004"
UPLOAD = "/data/upload/1/a.png"


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


def annotated(ann_id: int, task_id: int, url: str, label_map, config: str, action: str = "ANNOTATION_CREATED") -> dict:
    control = parse_label_config(config)[0]
    return {"action": action,
            "annotation": {"id": ann_id, "task": task_id, "was_cancelled": False, "project": 1,
                           "result": label_map_to_results(label_map, None, control, min_area=1)},
            "task": {"id": task_id, "data": {"image": url}, "project": 1},
            "project": {"id": 1, "label_config": config}}


def setup(http: TestClient | httpx.Client, config: str) -> httpx.Response:
    return http.post("/setup", json={"project": PROJECT, "schema": config}, follow_redirects=False)


def predict(http: TestClient | httpx.Client, config: str, url: str, task_id: int = 7) -> dict:
    body = {"project": PROJECT, "label_config": config, "tasks": [{"id": task_id, "data": {"image": url}}]}
    response = http.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


@pytest.fixture
def client(tmp_path, store, predictor, image_server) -> TestClient:
    """A backend started without LABEL_STUDIO_URL, as a newcomer's first `make run` was."""
    settings = Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,), min_region_area=1)
    return TestClient(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))


def test_uploads_without_label_studio_url_are_named_not_called_missing(client, store, image_server,
                                                                       brush_config) -> None:
    _, label_map = image_server.add_scene("a.png")
    assert client.post("/webhook", json=annotated(11, 3, UPLOAD, label_map, brush_config)).status_code == 200

    [problem] = client.get("/projects/1/problems").json()["problems"]
    assert problem["key"] == problem_key(11) and problem["task"] == 3
    assert "LABEL_STUDIO_URL is not set" in problem["reason"]

    answer = predict(client, brush_config, image_server.url("a.png"))
    assert "could not become prompts" in answer["reason"] and "task 3" in answer["reason"]
    assert "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in answer["reason"]
    assert "no annotated examples" not in answer["reason"]
    assert "result" not in answer  # Label Studio stores nothing for it

    refused = setup(client, brush_config)  # Label Studio shows only the URL of a failed /setup
    assert refused.status_code == 307 and "LABEL_STUDIO_URL" in refused.json()["detail"]
    location = refused.headers["location"]
    assert location.startswith("setup-refused/") and "set-LABEL_STUDIO_URL-and-LABEL_STUDIO_API_KEY" in location
    final = client.post(f"/{location}", json={"project": PROJECT, "schema": brush_config})
    assert final.status_code == 422 and "LABEL_STUDIO_URL" in final.json()["detail"]


def test_a_usable_annotation_or_a_deletion_clears_the_problem(client, image_server, brush_config) -> None:
    url, label_map = image_server.add_scene("a.png")
    client.post("/webhook", json=annotated(11, 3, UPLOAD, label_map, brush_config))
    client.post("/webhook", json=annotated(12, 4, UPLOAD, label_map, brush_config))
    assert client.get("/projects/1/problems").json()["count"] == 2

    # the same annotation saved again with an image the backend can read: a prompt, no problem
    client.post("/webhook", json=annotated(11, 3, url, label_map, brush_config, "ANNOTATION_UPDATED"))
    assert [p["key"] for p in client.get("/projects/1/problems").json()["problems"]] == [problem_key(12)]
    assert setup(client, brush_config).status_code == 200  # prompts exist: served despite the other
    assert "reason" not in predict(client, brush_config, url)

    client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 12}]})
    assert client.get("/projects/1/problems").json()["count"] == 0


def test_deleting_the_only_annotation_goes_back_to_no_prompts(client, image_server, brush_config) -> None:
    _, label_map = image_server.add_scene("a.png")
    client.post("/webhook", json=annotated(11, 3, UPLOAD, label_map, brush_config))
    assert setup(client, brush_config).status_code == 307
    client.post("/webhook", json={"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": [{"id": 3}]})
    assert setup(client, brush_config).status_code == 200
    assert predict(client, brush_config, image_server.url("a.png"))["reason"].startswith(NO_PROMPTS)


def test_a_host_that_is_not_allowed_names_allowed_media_hosts(tmp_path, store, predictor, image_server,
                                                              brush_config) -> None:
    settings = Settings(model_dir=tmp_path, device="cpu")  # the image server is not allowed
    client = TestClient(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))
    url, label_map = image_server.add_scene("a.png")
    client.post("/webhook", json=annotated(11, 3, url, label_map, brush_config))
    assert "ALLOWED_MEDIA_HOSTS" in predict(client, brush_config, url)["reason"]
    assert "ALLOWED_MEDIA_HOSTS" in setup(client, brush_config).headers["location"]


def test_annotations_in_the_predict_request_become_prompts(client, image_server, brush_config) -> None:
    """Label Studio sends each task's annotations with /predict: a backend that missed the
    webhooks (connected later, no LABEL_STUDIO_URL to read them) still finds its prompts."""
    url, label_map = image_server.add_scene("a.png")
    control = parse_label_config(brush_config)[0]
    labelled = {"id": 3, "data": {"image": url}, "annotations": [
        {"id": 11, "task": 3, "was_cancelled": False, "result": label_map_to_results(label_map, None, control,
                                                                                   min_area=1)}]}
    body = {"project": PROJECT, "label_config": brush_config, "tasks": [labelled, {"id": 4, "data": {"image": url}}]}
    own, other = client.post("/predict", json=body).json()["results"]
    assert "reason" not in other and other["result"] and other["model_version"].endswith("-v1")
    assert own["reason"] == ONLY_OWN_EXAMPLE and "result" not in own  # never prompted by its own annotation


def test_a_rejected_token_is_named_and_a_restart_with_a_good_one_backfills_at_setup(
        tmp_path, store, predictor, image_server, brush_config) -> None:
    with LocalServer() as ls_server:
        ls = FakeLabelStudio(ls_server)
        _, label_map = image_server.add_scene("a.png")
        ls.serve(UPLOAD, Reply(200, (image_server.root / "a.png").read_bytes()))
        ls.tasks = [{"id": 3, "data": {"image": UPLOAD},
                     "annotations": [annotated(11, 3, UPLOAD, label_map, brush_config)["annotation"]]}]

        def started(token: str) -> TestClient:
            settings = Settings(model_dir=tmp_path, device="cpu", label_studio_url=ls_server.url,
                                label_studio_api_key=token, min_region_area=1)
            backend = SegGPTBackend(settings, store, client=LabelStudioClient(ls_server.url, token),
                                    predictor=predictor)
            return TestClient(create_app(settings, backend))

        wrong = started("not-a-valid-token-0123456789")
        refused = setup(wrong, brush_config)  # the backfill fails within /setup's wait
        assert refused.status_code == 307, refused.text
        assert "LABEL_STUDIO_API_KEY" in refused.json()["detail"]
        assert [p["key"] for p in store.problems("1")] == [BACKFILL_PROBLEM]

        fixed = started(ls.pat)  # the restart: the backfill runs again at once, within /setup
        accepted = setup(fixed, brush_config)
        assert accepted.status_code == 200 and accepted.json()["model_version"].endswith("-v1")
        assert store.problems("1") == []


def test_fixes_name_the_setting_and_slugs_read_as_words() -> None:
    assert "LABEL_STUDIO_API_KEY" in fix_for("GET /api/tasks/ failed: HTTP 401: x (check LABEL_STUDIO_API_KEY)")
    assert "ALLOWED_MEDIA_HOSTS" in fix_for("image host of x is not allowed; add it to ALLOWED_MEDIA_HOSTS")
    assert fix_for("something odd").startswith("see the reason")
    assert slug("set LABEL_STUDIO_URL, then restart it!") == "set-LABEL_STUDIO_URL-then-restart-it"
    assert len(slug("x " * 500)) <= 160 and slug("???") == "refused"
    assert describe([]) is None
    two = [{"key": problem_key(1), "reason": "r1", "task": 1}, {"key": problem_key(2), "reason": "r2", "task": 2}]
    assert describe(two) == "2 annotations could not become prompts (task 2: r2)"

"""Auth on every route, secrets kept out of logs, request-size limits over real HTTP, hostile images in a batch."""
from __future__ import annotations

import base64
import io
import struct
import zlib
import logging
import time
from typing import Callable

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.model import SegGPTBackend
from backend.results import label_map_to_results
from backend.settings import Settings
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.conftest import scene
from tests.backend.local_http import FakeLabelStudio, LocalServer, Reply, TrickleServer

PROJECT = "1.1795551004"
USER, PASSWORD = "ml-user", "pw-Zq8#x1-not-in-logs"


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def annotation_created(ann_id: int, task_id: int, url: str, config: str) -> dict:
    _, label_map = scene()
    control = parse_label_config(config)[0]
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": config},
            "annotation": {"id": ann_id, "task": task_id, "updated_at": "2026-01-01T00:00:00Z",
                           "result": label_map_to_results(label_map, None, control, min_area=1)},
            "task": {"id": task_id, "data": {"image": url}}}


@pytest.fixture
def live(serve) -> Callable:
    """A real uvicorn whose own loggers reach caplog (no log config of its own), at debug level."""
    return lambda app: serve(app, log_config=None, log_level="debug")


# -- auth --------------------------------------------------------------------------------------------------
def test_every_route_needs_credentials_when_basic_auth_is_set(tmp_path, store, predictor, brush_config) -> None:
    """Enumerated from the app itself, so routes added later are covered; nothing is parsed before auth."""
    settings = Settings(model_dir=tmp_path, device="cpu", basic_auth_user=USER, basic_auth_pass=PASSWORD)
    client = TestClient(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))
    paths = client.app.openapi()["paths"]
    assert {"/health", "/setup", "/predict", "/webhook", "/versions"} <= set(paths)
    refused = [{}, basic(USER, "wrong"), basic("other", PASSWORD), basic(USER, PASSWORD + "x"), basic(USER, ""),
               {"Authorization": f"Bearer {PASSWORD}"}, {"Authorization": "Basic !!notbase64"},
               {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},  # no colon
               {"Authorization": f"basic {base64.b64encode(f'{USER}:{PASSWORD}'.encode()).decode()}x"}]
    checked = 0
    for template, operations in paths.items():
        path = template.replace("{project}", "1").replace("{job_id}", "tune-1")
        for method in operations:
            for headers in refused:
                for body in (None, b"{not json", b'{"action": "START_TRAINING", "project": 1}'):
                    response = client.request(method, path, content=body, headers=headers)
                    assert response.status_code == 401, (method, path, headers, body)
                    assert response.headers["www-authenticate"] == "Basic"
                    assert response.json() == {"detail": "authentication required"}
                    checked += 1
            answered = client.request(method, path, headers=basic(USER, PASSWORD))
            assert answered.status_code != 401, (method, path)
    assert checked >= 5 * len(refused) * 3
    assert client.get("/no/such/route").status_code == 401  # not even 404 without credentials
    big = client.post("/predict", content=b"x" * (settings.max_request_bytes + 1))
    assert big.status_code == 401  # refused before the body is read


def test_health_and_webhooks_with_the_header_label_studio_is_told_to_send(tmp_path, store, predictor,
                                                                        brush_config) -> None:
    """The README's recipe: Label Studio's webhook gets an ``Authorization: Basic ...`` header."""
    settings = Settings(model_dir=tmp_path, device="cpu", basic_auth_user=USER, basic_auth_pass=PASSWORD)
    client = TestClient(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))
    header = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert client.get("/health", headers={"Authorization": f"Basic {header}"}).status_code == 200
    body = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    assert client.post("/webhook", json=body).status_code == 401
    assert client.post("/webhook", json=body, headers={"Authorization": f"Basic {header}"}).status_code == 200


def test_secrets_never_reach_the_logs(tmp_path, store, predictor, brush_config, live, caplog) -> None:
    """A whole session with basic auth and a personal access token, logged at DEBUG by every logger."""
    with LocalServer() as ls_server, LocalServer() as storage:
        ls = FakeLabelStudio(ls_server)
        ls.legacy_enabled = False
        image = png_bytes(scene()[0])
        ls.serve("/data/upload/1/a.png", Reply(200, image))
        signature = "X-Amz-Signature=5ec4e7-presigned-signature"
        ls_server.route("GET", "/tasks/9/presign/", ls.authed(lambda r: Reply(
            303, b"", {"Location": f"{storage.url}/bucket/q.png?{signature}"})))
        storage.route("GET", "/bucket/q.png", Reply(200, image))
        ls.tasks = [{"id": 3, "data": {"image": "/data/upload/1/a.png"}, "annotations": [
            {**annotation_created(30, 3, "/data/upload/1/a.png", brush_config)["annotation"], "was_cancelled": False}]}]
        settings = Settings(model_dir=tmp_path, device="cpu", basic_auth_user=USER, basic_auth_pass=PASSWORD,
                            label_studio_url=ls_server.url, label_studio_api_key=ls.pat, min_region_area=1,
                            log_level="DEBUG")
        backend = SegGPTBackend(settings, store, client=LabelStudioClient(ls_server.url, ls.pat), predictor=predictor)
        with caplog.at_level(logging.DEBUG):
            url = live(create_app(settings, backend))
            with httpx.Client(base_url=url, timeout=30, headers=basic(USER, PASSWORD)) as http:
                for wrong in ("wrong-guess-1", PASSWORD[::-1]):
                    assert http.get("/health", headers=basic(USER, wrong)).status_code == 401
                setup = {"project": PROJECT, "schema": brush_config, "access_token": ls.pat, "hostname": ls_server.url}
                assert http.post("/setup", json=setup).status_code == 200  # starts the backfill from the LS API
                deadline = time.monotonic() + 20
                while not http.post("/setup", json=setup).json()["model_version"].endswith("-v1"):
                    assert time.monotonic() < deadline, "the backfill did not finish"
                    time.sleep(0.05)
                tasks = [{"id": 9, "data": {"image": "s3://bucket/q.png"}},
                         {"id": 5, "data": {"image": "/data/upload/1/a.png"}},  # not task 3, the example
                         {"id": 4, "data": {"image": f"{storage.url}/bucket/q.png?{signature}"}}]  # not allowed
                body = {"project": PROJECT, "label_config": brush_config, "tasks": tasks}
                results = http.post("/predict", json=body).json()["results"]
                assert "reason" not in results[0] and "reason" not in results[1] and "not allowed" in results[2]["reason"]
                assert signature not in str(results)
                assert http.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).status_code < 500
        assert ls.refreshes >= 1 and ls.valid_access  # the PAT really was used
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "/predict" in logged and "backfill" in logged  # the capture saw the session
    for secret in (PASSWORD, "wrong-guess-1", PASSWORD[::-1], ls.pat, *ls.valid_access, "presigned-signature",
                   base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert secret not in logged, f"a secret reached the logs: {secret[:6]}..."


# -- request size -----------------------------------------------------------------------------------------
def test_oversized_bodies_are_refused_over_real_http(tmp_path, store, predictor, live) -> None:
    settings = Settings(model_dir=tmp_path, device="cpu", max_request_bytes=64 * 1024)
    url = live(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))
    with httpx.Client(base_url=url, timeout=30) as http:
        declared = http.post("/predict", content=b"[" * (64 * 1024 + 1), headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and "MAX_REQUEST_BYTES (65536 bytes)" in declared.json()["detail"]
        chunked = http.post("/webhook", content=iter([b"{" * 16384] * 8), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413  # no Content-Length: counted as it streams in
        assert http.post("/webhook", json={"action": "PING", "pad": "x" * 60_000}).status_code == 200
        deep = http.post("/webhook", content=b"[" * 30_000 + b"]" * 30_000, headers={"Content-Type": "application/json"})
        assert deep.status_code == 400
        as_text = http.post("/webhook", content=b'{"action": "PING"}', headers={"Content-Type": "text/plain"})
        assert as_text.status_code == 415 and "application/json" in as_text.json()["detail"]
        assert http.get("/health").json()["redis"] == "ok"


# -- hostile images inside a batch ------------------------------------------------------------------------
def test_hostile_images_in_a_batch_get_a_reason_and_the_rest_is_predicted(tmp_path, store, predictor, image_server,
                                                                          brush_config) -> None:
    good, _ = image_server.add_scene("good.png", size=(64, 48))
    other, _ = image_server.add_scene("other.png", size=(50, 70), seed=3)
    files = {"bomb.png": _png_header_only(40_000, 40_000), "cut.png": png_bytes(scene()[0])[:200],
             "page.png": b"<html><body>Sign in</body></html>", "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\nshowpage\n",
             "huge.png": png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)))}
    for name, data in files.items():
        (image_server.root / name).write_bytes(data)
    with TrickleServer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200, chunk=1, delay=0.02) as slow:
        settings = Settings(model_dir=tmp_path, device="cpu", min_region_area=1, media_timeout=0.5,
                            max_image_bytes=100_000, max_image_pixels=10_000_000,
                            allowed_media_hosts=(image_server.host, slow.host))
        client = TestClient(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))
        assert client.post("/webhook", json=annotation_created(1, 100, good, brush_config)).status_code == 200
        urls = [good, image_server.url("bomb.png"), image_server.url("cut.png"), image_server.url("page.png"),
                slow.url(), image_server.url("eps.png"), image_server.url("huge.png"), other,
                "http://169.254.169.254/latest/meta-data/"]
        started = time.monotonic()
        response = client.post("/predict", json={"project": PROJECT, "label_config": brush_config,
                                                 "tasks": [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)]})
        assert time.monotonic() - started < 30
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(urls)
    expected = {1: "MAX_IMAGE_PIXELS|decompression bomb", 2: "truncated or corrupt", 3: "not an image",
                4: "MEDIA_TIMEOUT", 5: "not an image", 6: "MAX_IMAGE_BYTES", 8: "not allowed"}
    for index, reason in expected.items():
        assert "result" not in results[index], index
        assert any(part in results[index]["reason"] for part in reason.split("|")), (index, results[index]["reason"])
    for index, size in ((0, (64, 48)), (7, (50, 70))):
        assert "reason" not in results[index] and results[index]["result"]
        assert {(r["original_width"], r["original_height"]) for r in results[index]["result"]} == {size}


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")

"""History, rollback and prompt-pack endpoints, and Redis faults, over real HTTP and real Redis."""
from __future__ import annotations

import base64
import io
import zipfile
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from backend import state_api
from backend.app import create_app
from backend.model import SegGPTBackend
from backend.settings import Settings
from backend.store import PromptEntry, PromptStore, connect
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.test_packs import fill, jpeg, label_map, png

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Cat"/></BrushLabels></View>"""


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(model_dir=tmp_path, device="cpu")


@pytest.fixture
def backend(settings, store, predictor) -> SegGPTBackend:
    return SegGPTBackend(settings, store, predictor=predictor)


@pytest.fixture
def client(settings, backend) -> TestClient:
    return TestClient(create_app(settings, backend))


def setup_version(client: TestClient, project: str = "1.1795551004") -> str:
    response = client.post("/setup", json={"project": project, "schema": CONFIG})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_versions_list_the_history_newest_first(client, store) -> None:
    fill(store, "1")
    body = client.get("/projects/1/versions").json()
    assert body["project"] == "1" and body["version"] == 4 and body["keep_versions"] == 20
    assert body["model_version"] == setup_version(client)
    assert [v["version"] for v in body["versions"]] == [4, 3, 2, 1]
    assert body["versions"][0]["change"] == "tuned prompt set" and body["versions"][-1]["entries"] == 1
    assert all(v["model_version"].endswith(f"-v{v['version']}") for v in body["versions"])
    assert client.get("/projects/9/versions").json()["versions"] == []
    assert client.get("/projects/abc/versions").status_code == 422


def test_rollback_is_a_new_version_label_studio_sees(client, store) -> None:
    fill(store, "1")
    before = setup_version(client)
    response = client.post("/projects/1/rollback", json={"version": 1})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "rolled_back" and body["version"] == 5 and body["restored"] == 1
    assert body["model_version"] == setup_version(client) != before  # LS re-predicts on the change
    assert store.entry_count("1") == 1 and store.tuned_prompt("1") is None
    again = client.post("/projects/1/rollback", json={"version": 1}).json()
    assert again["status"] == "unchanged" and again["version"] == 5
    missing = client.post("/projects/1/rollback", json={"version": 42})
    assert missing.status_code == 404 and "version 42 of project 1 is not in its history" in missing.json()["detail"]
    for bad in ({}, {"version": 0}, {"version": "x"}, {"version": 1, "extra": 1}):
        assert client.post("/projects/1/rollback", json=bad).status_code == 422


def test_pack_download_and_upload_raw_or_multipart(client, store) -> None:
    fill(store, "1")
    response = client.get("/projects/1/pack")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == 'attachment; filename="seggpt-project-1-v4.zip"'
    pack = response.content
    assert zipfile.ZipFile(io.BytesIO(pack)).testzip() is None

    raw = client.post("/projects/2/pack", content=pack, headers={"Content-Type": "application/zip"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["status"] == "imported" and raw.json()["entries"] == 2 and raw.json()["version"] == 1
    assert raw.json()["model_version"] == setup_version(client, "2.1795551004")
    form = client.post("/projects/3/pack", files={"file": ("p.zip", pack, "application/zip")})
    assert form.status_code == 200, form.text
    assert store.entries("2")[1] == store.entries("3")[1] == store.entries("1")[1]


def test_bad_uploads_are_4xx_and_change_nothing(client, store, monkeypatch) -> None:
    fill(store, "1")
    pack = client.get("/projects/1/pack").content
    version = store.version("1")
    truncated = client.post("/projects/1/pack", content=pack[:-100])
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]
    assert client.post("/projects/1/pack", content=b"").status_code == 422
    no_file = client.post("/projects/1/pack", files={"other": ("p.zip", pack)})
    assert no_file.status_code == 422 and "no file field 'file'" in no_file.json()["detail"]
    broken = client.post("/projects/1/pack", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert broken.status_code == 422
    monkeypatch.setattr(state_api, "MAX_UPLOAD_BYTES", 1000)
    too_big = client.post("/projects/1/pack", content=pack)
    assert too_big.status_code == 413 and "at most 1000 bytes" in too_big.json()["detail"]
    assert store.version("1") == version
    for response in (truncated, no_file, too_big):
        assert "Traceback" not in response.text


def test_a_pack_for_another_model_shape_is_refused(settings, store, client) -> None:
    fill(store, "1")
    pack = client.get("/projects/1/pack").content
    other = SegGPTBackend(settings, store, predictor=SegGPTPredictor(
        random_model(replace(random_model().config, embed_dim=32)), device="cpu"))
    response = TestClient(create_app(settings, other)).post("/projects/1/pack", content=pack)
    assert response.status_code == 422 and "another shape (embed_dim: pack 64, here 32" in response.json()["detail"]


def test_state_endpoints_need_basic_auth_when_set(settings, backend, store) -> None:
    client = TestClient(create_app(replace(settings, basic_auth_user="u", basic_auth_pass="p"), backend))
    good = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    for method, path, body in [("GET", "/projects/1/versions", None), ("GET", "/projects/1/pack", None),
                               ("POST", "/projects/1/rollback", {"version": 1}),
                               ("POST", "/projects/1/pack", None)]:
        assert client.request(method, path, json=body).status_code == 401
    store.put_entry("1", PromptEntry(1, 1, 1.0, {"image": jpeg(8, 8)}, {"tag": png(label_map(8, 8) * 0 + 1)}))
    assert client.get("/projects/1/versions", headers=good).json()["version"] == 1


def test_unreachable_redis_degrades_health_and_answers_503(settings, predictor, tmp_path) -> None:
    dead = PromptStore(connect(replace(settings, redis_url=f"unix://{tmp_path / 'gone.sock'}")))
    client = TestClient(create_app(settings, SegGPTBackend(settings, dead, predictor=predictor)))
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "DEGRADED" and health.json()["redis"] == "unreachable"
    calls = [("POST", "/setup", {"project": "1", "schema": CONFIG}),
             ("POST", "/predict", {"project": "1", "label_config": CONFIG, "tasks": [{"id": 1, "data": {}}]}),
             ("GET", "/projects/1/versions", None), ("POST", "/projects/1/rollback", {"version": 1}),
             ("GET", "/projects/1/pack", None), ("GET", "/versions", None)]
    for method, path, body in calls:
        response = client.request(method, path, json=body)
        assert response.status_code == 503, path
        assert response.json() == {"detail": "the prompt store (Redis) is unreachable; retry shortly"}

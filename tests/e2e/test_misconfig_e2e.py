"""The newcomer's misstep against a real Label Studio 1.23.2: a backend started without
LABEL_STUDIO_URL cannot read uploaded images. Label Studio must show why (the backend card
turns Error with the fix in its message), store no empty predictions, and, once the backend
is restarted with the setting, the very next "Retrieve predictions" must predict."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (REPO_ROOT, LabelStudio, ServerProcess, base_env, free_port, http_ok, start_server,
                                write_tiny_checkpoint)
from tests.e2e.test_label_studio_e2e import LABEL_CONFIG, SIZES, brush_result, make_scene, ok, wait_for

SCENES = 4
ANNOTATED = 2


def serve(name: str, env: dict[str, str], port: int, root: Path) -> ServerProcess:
    cmd = [sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return start_server(name, cmd, env, root / f"{name}.log", http_ok(f"http://127.0.0.1:{port}/health"),
                        timeout_s=120, cwd=REPO_ROOT)


def retrieve(ls_api: httpx.Client, project: int, tasks: list[int]) -> None:
    """The Data Manager's "Retrieve predictions" on ``tasks``."""
    ok(ls_api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                   json={"selectedItems": {"all": False, "included": tasks}}))


def test_uploads_without_label_studio_url_are_named_and_a_restart_fixes_them(
        label_studio: LabelStudio, ls_api: httpx.Client, tmp_path: Path) -> None:
    port = free_port()
    backend_url = f"http://127.0.0.1:{port}"
    env = base_env() | {"MODEL_DIR": str(tmp_path / "model_dir"), "DEVICE": "cpu", "TORCH_THREADS": "1",
                        "SEGGPT_WEIGHTS": str(write_tiny_checkpoint(tmp_path / "tiny.pth"))}
    server = serve("backend-without-ls-url", env, port, tmp_path)
    try:
        pid = ok(ls_api.post("/api/projects/", json={"title": "misconfigured", "label_config": LABEL_CONFIG}), 201)["id"]
        scenes = {f"scene{i}": make_scene(i) for i in range(SCENES)}
        files = {name: (f"{name}.png", s.png(), "image/png") for name, s in scenes.items()}
        ok(ls_api.post(f"/api/projects/{pid}/import", files=files), 201)
        tasks = ok(ls_api.get("/api/tasks/", params={"project": pid, "page_size": 100}))["tasks"]
        scene_of = {t["id"]: scenes[re.search(r"(scene\d+)\.png$", t["data"]["image"]).group(1)] for t in tasks}
        ids = sorted(scene_of, key=lambda t: scene_of[t].name)
        annotated, unlabeled = ids[:ANNOTATED], ids[ANNOTATED:]
        ml = ok(ls_api.post("/api/ml/", json={"project": pid, "url": backend_url, "title": "seggpt",
                                              "is_interactive": True, "auto_update": True}), 201)
        assert ml["state"] == "CO", ml  # nothing is known to be wrong yet
        for tid in annotated:
            ok(ls_api.post(f"/api/tasks/{tid}/annotations/", json={"result": brush_result(scene_of[tid])}), 201)

        # Both annotations reached the backend and are recorded as unusable, with the reason.
        problems = lambda: httpx.get(f"{backend_url}/projects/{pid}/problems", timeout=10).json()  # noqa: E731
        wait_for(lambda: problems()["count"] == ANNOTATED, "two recorded problems")
        assert all("LABEL_STUDIO_URL is not set" in p["reason"] for p in problems()["problems"])

        # Retrieve predictions: the backend card turns Error and its message names the fix.
        retrieve(ls_api, pid, unlabeled)
        card = ok(ls_api.get(f"/api/ml/{ml['id']}"))
        assert card["state"] == "ER", card
        assert "set-LABEL_STUDIO_URL-and-LABEL_STUDIO_API_KEY-on-the-backend" in card["error_message"], card
        for tid in ids:  # no empty "0.00 %" prediction stands in the way of the fixed backend
            assert ok(ls_api.get("/api/predictions/", params={"task": tid})) == []

        # An API user (or Send Test Request) reads the reason in the prediction itself.
        body = {"project": str(pid), "label_config": LABEL_CONFIG,
                "tasks": [{"id": unlabeled[0], "data": {"image": tasks[0]["data"]["image"]}}]}
        [answer] = ok(httpx.post(f"{backend_url}/predict", json=body, timeout=60))["results"]
        assert "LABEL_STUDIO_URL" in answer["reason"] and "no annotated examples" not in answer["reason"]
        assert "result" not in answer
    finally:
        server.stop()

    # The fix: the same backend (same MODEL_DIR, same port) restarted with the two settings.
    fixed = serve("backend-fixed", env | {"LABEL_STUDIO_URL": label_studio.url,
                                          "LABEL_STUDIO_API_KEY": label_studio.token}, port, tmp_path)
    try:
        retrieve(ls_api, pid, unlabeled)
        card = ok(ls_api.get(f"/api/ml/{ml['id']}"))
        assert card["state"] == "CO" and not card["error_message"], card
        assert card["model_version"].endswith(f"-v{ANNOTATED}"), card  # the backfilled state, not v0
        for tid in unlabeled:
            stored = ok(ls_api.get("/api/predictions/", params={"task": tid}))
            assert [p["model_version"] for p in stored] == [card["model_version"]], stored
            width, height = scene_of[tid].size
            assert all((r["original_width"], r["original_height"]) == (width, height) for r in stored[0]["result"])
        assert httpx.get(f"{backend_url}/projects/{pid}/problems", timeout=10).json()["count"] == 0
    finally:
        fixed.stop()

"""Whole-project pre-labeling against a real Label Studio 1.23.2: `seggpt-backend prelabel`
writes one prediction of the current model_version per unlabeled task through the LS API,
never duplicates on a second run, and resumes after being killed mid-run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
import redis
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from backend.model import weights_fingerprint
from backend.store import PromptStore, model_version
from tests.e2e.conftest import REPO_ROOT, LabelStudio, base_env, write_tiny_checkpoint

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="Square" background="red"/></BrushLabels></View>'
)
ANNOTATED = 2


def scene(index: int) -> tuple[bytes, np.ndarray]:
    """A PNG with a red square on grey (size and place vary) and the square's 0/255 mask."""
    width, height = 64 + 4 * (index % 5), 48 + 4 * (index % 3)
    yy, xx = np.mgrid[:height, :width]
    x0, y0, side = 4 + 3 * (index % 7), 4 + 2 * (index % 5), 16 + index % 4
    square = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    image = np.full((height, width, 3), 128, np.uint8)
    image[square] = (220, 30, 30)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue(), square.astype(np.uint8) * 255


def ok(response: httpx.Response, status: int = 200) -> dict | list:
    assert response.status_code == status, f"{response.request.url}: HTTP {response.status_code} {response.text[:300]}"
    return response.json()


def create_project(ls_api: httpx.Client, title: str, images: int) -> tuple[int, list[int], list[int], dict]:
    """A project with ``images`` uploaded tasks; the first ANNOTATED get a brush annotation and
    the next one only a skipped (cancelled) one. Returns the project id, the labeled and the
    unlabeled task ids, and each task's image size."""
    pid = ok(ls_api.post("/api/projects/", json={"title": title, "label_config": LABEL_CONFIG}), 201)["id"]
    scenes = {f"s{i:02d}": scene(i) for i in range(images)}
    files = {name: (f"{name}.png", png, "image/png") for name, (png, _) in scenes.items()}
    assert ok(ls_api.post(f"/api/projects/{pid}/import", files=files), 201)["task_count"] == images
    tasks = ok(ls_api.get("/api/tasks/", params={"project": pid, "page_size": 100}))["tasks"]
    by_name = {Path(t["data"]["image"]).stem.split("-", 1)[1]: t for t in tasks}
    ordered = [by_name[name] for name in sorted(by_name)]
    sizes = {t["id"]: scenes[name][1].shape[::-1] for name, t in zip(sorted(by_name), ordered)}
    for task in ordered[:ANNOTATED]:
        _, mask = scenes[Path(task["data"]["image"]).stem.split("-", 1)[1]]
        result = [
            {
                "id": f"r{task['id']}",
                "from_name": "tag",
                "to_name": "image",
                "type": "brushlabels",
                "original_width": mask.shape[1],
                "original_height": mask.shape[0],
                "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Square"]},
            }
        ]
        ok(ls_api.post(f"/api/tasks/{task['id']}/annotations/", json={"result": result, "was_cancelled": False}), 201)
    skipped = ordered[ANNOTATED]
    ok(ls_api.post(f"/api/tasks/{skipped['id']}/annotations/", json={"result": [], "was_cancelled": True}), 201)
    return pid, [t["id"] for t in ordered[:ANNOTATED]], [t["id"] for t in ordered[ANNOTATED:]], sizes


@pytest.fixture(scope="module")
def cli_env(label_studio: LabelStudio, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prelabel")
    weights = write_tiny_checkpoint(root / "seggpt-tiny.pth")
    return base_env() | {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "REDIS_URL": redis_url,
        "SEGGPT_WEIGHTS": str(weights),
        "MODEL_DIR": str(root / "model_dir"),
        "DEVICE": "cpu",
        "LOG_LEVEL": "INFO",
    }


def backend_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "backend", *args]


def current_version(env: dict[str, str], project: int) -> str:
    with redis.Redis.from_url(env["REDIS_URL"]) as client:
        return model_version(weights_fingerprint(env["SEGGPT_WEIGHTS"]), PromptStore(client).version(str(project)))


def predictions(ls_api: httpx.Client, task: int) -> list[dict]:
    return ok(ls_api.get("/api/predictions/", params={"task": task}))


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)


def test_prelabel_writes_one_current_prediction_per_unlabeled_task(ls_api, cli_env, tmp_path) -> None:
    pid, labeled, unlabeled, sizes = create_project(ls_api, "prelabel e2e", images=10)
    first = subprocess.run(
        backend_cmd("prelabel", "--project", str(pid), "--inline"),
        env=cli_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert ": finished: 8 tasks predicted, 0 already had" in first.stdout, first.stdout

    version = current_version(cli_env, pid)
    assert version.endswith("-v2")  # the two annotations, read from Label Studio, are the prompts
    for task in unlabeled:
        [prediction] = predictions(ls_api, task)
        assert prediction["model_version"] == version
        for item in prediction["result"]:
            assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["Square"]
            assert (item["original_width"], item["original_height"]) == sizes[task]
    for task in labeled:
        assert predictions(ls_api, task) == []

    # Again, this time on a worker process: nothing new to write.
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        backend_cmd("worker"), env=cli_env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        second = subprocess.run(
            backend_cmd("prelabel", "--project", str(pid)),
            env=cli_env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ": finished: 0 tasks predicted, 8 already had a " + version in second.stdout, second.stdout
    assert all(len(predictions(ls_api, task)) == 1 for task in unlabeled)


def test_prelabel_killed_mid_run_resumes_without_duplicates(ls_api, cli_env) -> None:
    pid, labeled, unlabeled, _ = create_project(ls_api, "prelabel resume e2e", images=20)
    cmd = backend_cmd("prelabel", "--project", str(pid), "--inline", "--batch-size", "1")
    run = subprocess.Popen(cmd, env=cli_env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def written() -> int:
        return ok(ls_api.get(f"/api/projects/{pid}/"))["total_predictions_number"]

    try:
        wait_for(lambda: written() >= 1 or run.poll() is not None, "the first prediction")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(30)
    done_before = written()
    assert 1 <= done_before < len(unlabeled), f"the kill came too late to test resuming ({done_before} written)"

    # The killed run still counts as running until its heartbeat runs out; the rerun takes over then.
    rerun = subprocess.run(cmd, env=cli_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert ": finished: " in rerun.stdout, rerun.stdout

    version = current_version(cli_env, pid)
    for task in unlabeled:
        assert [p["model_version"] for p in predictions(ls_api, task)] == [version], f"task {task}"
    for task in labeled:
        assert predictions(ls_api, task) == []

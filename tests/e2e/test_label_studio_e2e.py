"""The labeling loop against a real Label Studio 1.23.2: a BrushLabels project with uploaded
images and two annotations, the SegGPT backend connected through the LS API, then batch
predictions, an interactive request and "Start training" driven the way the UI drives them.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from backend.jobs import JobQueue
from backend.store import PromptStore

LABELS = ("Square", "Disc")
COLOURS = {"Square": (220, 30, 30), "Disc": (30, 60, 220)}
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image">'
    '<Label value="Square" background="red"/><Label value="Disc" background="blue"/>'
    "</BrushLabels></View>"
)
# (width, height) per scene: distinct sizes, so a mask at the wrong size cannot pass.
SIZES = ((96, 64), (80, 60), (112, 72), (64, 64), (100, 70), (72, 88))
ANNOTATED_SCENES = 2  # scenes 0 and 1 are annotated, the rest are predicted


@dataclass(frozen=True)
class Scene:
    """A generated image and the true mask (0/255, the brush convention) of each label."""

    name: str
    image: np.ndarray
    masks: dict[str, np.ndarray]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    def png(self) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.image).save(out, format="PNG")
        return out.getvalue()


def make_scene(index: int) -> Scene:
    """A red square and a blue disc on grey, placed and sized differently in each scene."""
    width, height = SIZES[index]
    yy, xx = np.mgrid[:height, :width]
    side = min(width, height) // 3
    x0, y0 = 4 + (index * 7) % (width // 2 - side // 2), 4 + (index * 5) % (height - side - 8)
    square = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    radius = min(width, height) // 6
    cx, cy = width - radius - 4 - index % 5, height - radius - 4 - (index * 3) % 7
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2) & ~square
    image = np.full((height, width, 3), 128, np.uint8)
    image[square] = COLOURS["Square"]
    image[disc] = COLOURS["Disc"]
    masks = {"Square": square.astype(np.uint8) * 255, "Disc": disc.astype(np.uint8) * 255}
    return Scene(f"scene{index}", image, masks)


def brush_result(scene: Scene) -> list[dict]:
    """The annotation an annotator would submit: one brush region per label."""
    width, height = scene.size
    return [
        {
            "id": f"{scene.name}-{label}",
            "from_name": "tag",
            "to_name": "image",
            "type": "brushlabels",
            "origin": "manual",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": [label]},
        }
        for label, mask in scene.masks.items()
    ]


def decode_brush(item: dict, width: int, height: int) -> np.ndarray:
    """A stored brush region as an HxW bool mask; fails if the RLE is not W*H RGBA values."""
    flat = decode_rle(item["value"]["rle"])
    assert flat.size == width * height * 4, f"RLE holds {flat.size} values, image needs {width * height * 4}"
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def assert_brush_regions(result: list[dict], width: int, height: int) -> int:
    """Check LS result items against the config and the image size; return the region count."""
    for item in result:
        assert item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
        assert (item["original_width"], item["original_height"]) == (width, height)
        assert item["value"]["format"] == "rle"
        assert len(item["value"]["brushlabels"]) == 1 and item["value"]["brushlabels"][0] in LABELS
        assert decode_brush(item, width, height).any(), "an empty region was returned"
    return len(result)


@dataclass(frozen=True)
class Project:
    id: int
    ml_backend_id: int
    scenes: dict[int, Scene]  # task id -> scene
    annotated: tuple[int, ...]  # task ids
    unlabeled: tuple[int, ...]


def ok(response: httpx.Response, status: int = 200) -> dict | list:
    """The JSON body, after checking the status (the message names the call and the reply)."""
    request = response.request
    assert (
        response.status_code == status
    ), f"{request.method} {request.url}: HTTP {response.status_code} {response.text[:500]}"
    return response.json() if response.content else {}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.25)


def wait_for_prompts(project: Project, prompt_store: PromptStore) -> None:
    """Webhooks are applied after they are answered, so prompts arrive a moment later."""
    wait_for(
        lambda: prompt_store.entry_count(str(project.id)) == len(project.annotated),
        f"{len(project.annotated)} prompts in the backend's bank",
    )


@pytest.fixture(scope="module")
def project(ls_api: httpx.Client, backend_url: str) -> Project:
    """Project, uploads and backend connection through the LS API, then two annotations:
    connecting first means the backend also receives the ANNOTATION_CREATED webhooks."""
    pid = ok(ls_api.post("/api/projects/", json={"title": "SegGPT e2e", "label_config": LABEL_CONFIG}), 201)["id"]
    scenes = {s.name: s for s in map(make_scene, range(len(SIZES)))}
    # LS reads one file per form field, so every image gets a field of its own.
    files = {name: (f"{name}.png", s.png(), "image/png") for name, s in scenes.items()}
    imported = ok(ls_api.post(f"/api/projects/{pid}/import", files=files), 201)
    assert imported["task_count"] == len(scenes), imported

    task_scenes: dict[int, Scene] = {}
    for task in ok(ls_api.get("/api/tasks/", params={"project": pid, "page_size": 100}))["tasks"]:
        url = task["data"]["image"]
        match = re.fullmatch(rf"/data/upload/{pid}/[0-9a-f]+-(scene\d+)\.png", url)
        assert match, f"unexpected upload URL {url!r}"
        task_scenes[task["id"]] = scenes[match.group(1)]
    assert len(task_scenes) == len(scenes)

    ml = ok(
        ls_api.post(
            "/api/ml/",
            json={
                "project": pid,
                "url": backend_url,
                "title": "seggpt-e2e",
                "is_interactive": True,
                "auto_update": True,
            },
        ),
        201,
    )
    assert ml["state"] == "CO", ml
    hooks = ok(ls_api.get("/api/webhooks/", params={"project": pid}))
    assert [h["url"] for h in hooks] == [f"{backend_url}/webhook"]

    task_ids = sorted(task_scenes, key=lambda tid: task_scenes[tid].name)
    annotated = tuple(task_ids[:ANNOTATED_SCENES])
    for tid in annotated:
        ok(
            ls_api.post(
                f"/api/tasks/{tid}/annotations/",
                json={
                    "result": brush_result(task_scenes[tid]),
                    "was_cancelled": False,
                    "ground_truth": False,
                    "lead_time": 2.0,
                },
            ),
            201,
        )
    return Project(pid, ml["id"], task_scenes, annotated, tuple(task_ids[ANNOTATED_SCENES:]))


def test_annotations_round_trip_through_label_studio(ls_api: httpx.Client, project: Project) -> None:
    """The brush annotations LS stored decode back to the shapes they were made from."""
    for tid in project.annotated:
        scene = project.scenes[tid]
        [annotation] = ok(ls_api.get(f"/api/tasks/{tid}/annotations/"))
        decoded = {item["value"]["brushlabels"][0]: decode_brush(item, *scene.size) for item in annotation["result"]}
        assert set(decoded) == set(LABELS)
        for label, mask in decoded.items():
            np.testing.assert_array_equal(mask, scene.masks[label] > 0)


def test_annotations_become_prompts(project: Project, prompt_store: PromptStore) -> None:
    """The ANNOTATION_CREATED webhooks (or the backend's own read of the project) put both
    annotated tasks into the project's prompt bank."""
    wait_for_prompts(project, prompt_store)
    for tid in project.annotated:
        assert prompt_store.entry(str(project.id), tid) is not None, f"task {tid} is not a prompt"


def test_retrieve_predictions_stores_brush_masks(
    ls_api: httpx.Client, project: Project, prompt_store: PromptStore
) -> None:
    """The Data Manager action sends the unlabeled tasks to /predict in one batch; every one
    gets a stored prediction at its image's size, with config labels and the backend's
    model_version."""
    wait_for_prompts(project, prompt_store)
    action = ok(
        ls_api.post(
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project.id},
            json={"selectedItems": {"all": False, "included": list(project.unlabeled)}},
        )
    )
    assert action.get("processed_items") == len(project.unlabeled), action

    version = ok(ls_api.get(f"/api/ml/{project.ml_backend_id}"))["model_version"]
    assert version, "the backend's /setup returned no model_version"
    assert version in ok(ls_api.get(f"/api/ml/{project.ml_backend_id}/versions"))["versions"]
    regions = 0
    for tid in project.unlabeled:
        predictions = ok(ls_api.get("/api/predictions/", params={"task": tid}))
        assert len(predictions) == 1, f"task {tid}: {len(predictions)} predictions stored"
        assert predictions[0]["model_version"] == version
        regions += assert_brush_regions(predictions[0]["result"], *project.scenes[tid].size)
    # A seeded random-weight model is not accurate, but it must produce masks at all.
    assert regions > 0, "no task received a single region"


def test_interactive_request_returns_suggestions(
    ls_api: httpx.Client, project: Project, prompt_store: PromptStore
) -> None:
    """A smart-tool request goes straight to /predict with the context; LS hands the first
    result back to the caller and stores nothing."""
    wait_for_prompts(project, prompt_store)
    tid = project.unlabeled[0]
    scene = project.scenes[tid]
    stored = len(ok(ls_api.get("/api/predictions/", params={"task": tid})))
    context = {"result": brush_result(scene)[:1]}
    body = ok(
        ls_api.post(f"/api/ml/{project.ml_backend_id}/interactive-annotating", json={"task": tid, "context": context})
    )
    assert "errors" not in body, body
    suggestion = body["data"]
    assert suggestion["model_version"] == ok(ls_api.get(f"/api/ml/{project.ml_backend_id}"))["model_version"]
    assert_brush_regions(suggestion["result"], *scene.size)
    assert len(ok(ls_api.get("/api/predictions/", params={"task": tid}))) == stored


def test_start_training_reaches_the_backend(ls_api: httpx.Client, project: Project, prompt_store: PromptStore) -> None:
    """ "Start training" reaches the backend as a START_TRAINING webhook through the ML API
    client, and the backend records a job for the project. (LS answers 200 whatever the
    backend replied, and re-checks /health and /setup on every read of the backend row, so
    its TRAINING/ERROR state cannot be observed through the API.)"""
    jobs_before = JobQueue(prompt_store).jobs(str(project.id))
    response = ls_api.post(f"/api/ml/{project.ml_backend_id}/train", json={})
    assert 200 <= response.status_code < 300, response.text[:500]
    jobs = JobQueue(prompt_store).jobs(str(project.id))
    assert len(jobs) == len(jobs_before) + 1, jobs
    assert jobs[0]["project"] == str(project.id)

"""The quickstart's demo project in Label Studio, and connecting the backend to it.

The bundled images (``demo/images``, made by ``scripts/make_demo_project.py``) are uploaded
through Label Studio's import, so tasks point at ``/data/upload/...`` and the backend reads them
through LABEL_STUDIO_URL and the token, as it would in any project. The first images listed as
annotated in ``demo/manifest.json`` get brush annotations made from their label maps, so the
backend has prompts; every other task is left for the backend to pre-label.
"""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from typing import Callable

import numpy as np
from PIL import Image

from backend.label_config import parse_label_config
from backend.quickstart.labelstudio import Api
from backend.quickstart.state import QuickstartError
from backend.results import label_map_to_results

PROJECT_TITLE = "SegGPT quickstart demo"
ML_TITLE = "SegGPT (quickstart)"
LABEL_COLOURS = ("#ff2d95", "#00c2ff")  # stand out from the images' yellow coins and blue-white tiles

Say = Callable[[str], None]


@lru_cache(maxsize=1)
def manifest() -> dict:
    return json.loads(_demo_file("manifest.json").read_text(encoding="utf-8"))


def _demo_file(*parts: str):
    return resources.files("backend.quickstart").joinpath("demo", *parts)


def label_config() -> str:
    labels = "\n".join(f'    <Label value="{name}" background="{colour}"/>'
                       for name, colour in zip(manifest()["labels"], LABEL_COLOURS))
    return ('<View>\n  <Image name="image" value="$image" zoom="true" zoomControl="true"/>\n'
            f'  <BrushLabels name="tag" toName="image">\n{labels}\n  </BrushLabels>\n</View>')


def annotation_results(image_name: str) -> list[dict]:
    """Brush results (one region per instance, RLE) for a bundled image, from its label map."""
    stem = image_name.rsplit(".", 1)[0]
    with _demo_file("labels", f"{stem}.png").open("rb") as fh:
        label_map = np.asarray(Image.open(fh)).astype(np.int32)
    control = parse_label_config(label_config())[0]
    return label_map_to_results(label_map, None, control, min_area=1)


def project_exists(api: Api, project: int) -> bool:
    status = api.status("GET", f"/api/projects/{project}/")
    if status in (404, 403):
        return False
    if status != 200:
        raise QuickstartError(f"Label Studio: GET /api/projects/{project}/ answered HTTP {status}")
    return True


def create_project(api: Api, say: Say) -> int:
    """The demo project: created, images imported, the annotated ones annotated; removed again on failure."""
    info = manifest()
    project = api.call("POST", "/api/projects/", json={
        "title": PROJECT_TITLE, "label_config": label_config(),
        "description": "Made by `seggpt-backend quickstart`: two images are annotated, SegGPT pre-labels the rest.",
    })["id"]
    try:
        files = [(name, (name, _demo_file("images", name).read_bytes(), "image/jpeg")) for name in info["images"]]
        api.call("POST", f"/api/projects/{project}/import", files=files)
        tasks = api.tasks(project)
        if len(tasks) != len(info["images"]):
            raise QuickstartError(f"Label Studio made {len(tasks)} tasks of the {len(info['images'])} demo images")
        by_name = {}
        for task in tasks:
            url = str((task.get("data") or {}).get("image", ""))
            name = next((n for n in info["images"] if url.endswith("-" + n) or url.endswith("/" + n)), None)
            by_name[name] = task["id"]
        for name in info["annotated"]:
            if name not in by_name:
                raise QuickstartError(f"the imported demo image {name} is not among the project's tasks")
            api.call("POST", f"/api/tasks/{by_name[name]}/annotations/", json={
                "result": annotation_results(name), "was_cancelled": False, "ground_truth": False, "lead_time": 0})
    except BaseException:
        try:
            api.call("DELETE", f"/api/projects/{project}/")
        except QuickstartError:
            pass
        raise
    say(f"created the demo project {project}: {len(info['images'])} images, {len(info['annotated'])} annotated")
    return project


def connect_backend(api: Api, project: int, backend_url: str, basic_auth: tuple[str, str] | None,
                    previous_url: str | None) -> None:
    """Register the backend as the project's ML backend (interactive, auto-update) and make sure the
    annotation webhook reaches ``<backend_url>/webhook``, with basic auth when the backend wants it."""
    body: dict = {"project": project, "url": backend_url, "title": ML_TITLE, "is_interactive": True,
                  "auto_update": True, "auth_method": "NONE"}
    if basic_auth:
        body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
    found = api.get("/api/ml/", project=project) or []
    urls = {backend_url, (previous_url or "").rstrip("/")}
    ours = [m for m in found if m.get("url", "").rstrip("/") in urls or m.get("title") == ML_TITLE]
    if ours:  # PATCH must carry url and project, or Label Studio answers 500
        ml = api.call("PATCH", f"/api/ml/{ours[0]['id']}", json=body)
    else:  # a backend the user connected is left alone
        ml = api.call("POST", "/api/ml/", json=body)
    if ml.get("state") == "ER":
        raise QuickstartError(f"Label Studio cannot use the backend at {backend_url}: "
                              f"{' '.join(str(ml.get('error_message') or 'no reason given').split())[:200]}")

    target = f"{backend_url}/webhook"
    stale = {f"{previous_url.rstrip('/')}/webhook"} if previous_url else set()
    hooks = api.get("/api/webhooks/", project=project) or []
    hook = next((h for h in hooks if h.get("url") == target), None)
    if hook is None:
        old = next((h for h in hooks if h.get("url") in stale), None)
        hook = (api.call("PATCH", f"/api/webhooks/{old['id']}/", json={"url": target, "is_active": True}) if old else
                api.call("POST", "/api/webhooks/", json={"project": project, "url": target, "send_payload": True,
                                                          "send_for_all_actions": True, "is_active": True}))
    headers = dict(hook.get("headers") or {})
    wanted = dict(headers)
    wanted.pop("Authorization", None)
    if basic_auth:
        wanted["Authorization"] = "Basic " + base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
    if wanted != headers or not hook.get("is_active", True):
        api.call("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": wanted, "is_active": True})
    hooks = api.get("/api/webhooks/", project=project) or []
    if not any(h.get("url") == target and h.get("is_active", True) for h in hooks):
        raise QuickstartError(f"Label Studio has no active webhook to {target} for project {project}")


def task_counts(api: Api, project: int) -> tuple[list[int], list[int]]:
    """(annotated task ids, unlabelled task ids); cancelled (skipped) annotations do not count."""
    annotated, unlabelled = [], []
    for task in api.tasks(project):
        (annotated if int(task.get("total_annotations") or 0) > 0 else unlabelled).append(int(task["id"]))
    return annotated, unlabelled


def unpredicted(api: Api, task_ids: list[int], model_version: str) -> list[int]:
    """The tasks that hold no prediction of ``model_version`` with at least one region."""
    missing = []
    for task in task_ids:
        predictions = api.get("/api/predictions/", task=task) or []
        if not any(p.get("model_version") == model_version and p.get("result") for p in predictions):
            missing.append(task)
    return missing

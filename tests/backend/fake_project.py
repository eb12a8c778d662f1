"""A Label Studio project on the local fake LS: tasks, annotations and a predictions API.

Enough of Label Studio 1.23's API for pre-labeling: the project (its label config), task
pages (the light view keeps ``total_annotations`` and drops annotation bodies, as 1.23
does), ``GET /api/predictions/?task=`` and ``POST /api/predictions/``. Writes can be held
at a gate to catch a job mid-run.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from backend.label_config import parse_label_config
from backend.results import label_map_to_results
from tests.backend.local_http import FakeLabelStudio, LocalServer, Reply

PROJECT = 1


class ProjectLS(FakeLabelStudio):
    def __init__(self, server: LocalServer, label_config: str, tasks: list[dict]) -> None:
        super().__init__(server, tasks=tasks)
        self.hold_after: int | None = None  # writes beyond this many wait for ``release``
        self.release = threading.Event()
        self.holding = threading.Event()  # set while a write waits
        self._lock = threading.Lock()
        project = {"id": PROJECT, "title": "prelabel", "label_config": label_config}
        server.route("GET", f"/api/projects/{PROJECT}/", self.authed(lambda r: Reply.json(project)))
        server.route("GET", "/api/predictions/", self.authed(self.list_predictions))

    def create_prediction(self, request):
        if self.hold_after is not None and len(self.predictions) >= self.hold_after:
            self.holding.set()
            self.release.wait(120)
        with self._lock:
            body = request.json()
            self.predictions.append(body)
            return Reply.json({"id": len(self.predictions), **body}, 201)

    def list_predictions(self, request):
        task = int(request.query["task"][0])
        return Reply.json([{"id": i + 1, **p} for i, p in enumerate(self.predictions) if p["task"] == task])

    def per_task(self) -> dict[int, list[str]]:
        """task id -> the model_version of each prediction written for it."""
        out: dict[int, list[str]] = {}
        for p in self.predictions:
            out.setdefault(p["task"], []).append(p["model_version"])
        return out


@dataclass
class Project:
    ls: ProjectLS
    labeled: list[int]
    unlabeled: list[int]
    urls: dict[int, str] = field(default_factory=dict)


def make_project(server: LocalServer, image_server, config: str, annotated: int = 2, unlabeled: int = 6,
                 cancelled: int = 1) -> Project:
    """``annotated`` tasks with a brush annotation, ``cancelled`` with only a skipped one
    (still unlabeled) and ``unlabeled`` more; images on ``image_server``."""
    control = parse_label_config(config)[0]
    tasks, labeled, open_ids, urls = [], [], [], {}
    for i in range(1, annotated + cancelled + unlabeled + 1):
        url, label_map = image_server.add_scene(f"t{i}.png", box=(4 + i, 6, 28 + i, 36), seed=i)
        task = {"id": i, "data": {"image": url}, "annotations": [], "total_annotations": 0, "cancelled_annotations": 0}
        if i <= annotated:
            task["annotations"] = [{"id": 100 + i, "task": i, "was_cancelled": False,
                                    "updated_at": f"2026-11-24T20:00:0{i}Z",
                                    "result": label_map_to_results(label_map, None, control, min_area=1)}]
            task["total_annotations"] = 1
            labeled.append(i)
        else:
            if i <= annotated + cancelled:
                task["annotations"] = [{"id": 100 + i, "task": i, "was_cancelled": True, "result": []}]
                task["cancelled_annotations"] = 1
            open_ids.append(i)
        tasks.append(task)
        urls[i] = url
    return Project(ProjectLS(server, config, tasks), labeled, open_ids, urls)

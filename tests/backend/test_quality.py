"""Quality report: pre-labels of two model versions against final annotations, via a local fake Label Studio."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.quality import mask_iou, project_report, report_chart
from backend.results import label_map_to_results
from tests.backend.local_http import LEGACY_KEY, FakeLabelStudio, Reply, server  # noqa: F401  (fixture)

CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels></View>"""
H, W = 40, 60


def box_map(*boxes: tuple[int, int, int, int, int]) -> np.ndarray:
    out = np.zeros((H, W), np.int32)
    for label, x0, y0, x1, y1 in boxes:
        out[y0:y1, x0:x1] = label
    return out


def results(label_map: np.ndarray) -> list[dict]:
    return label_map_to_results(label_map, None, parse_label_config(CONFIG)[0], min_area=1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def project_tasks() -> tuple[list[dict], dict]:
    """Three annotated tasks; v1 predicted all three roughly, v2 predicted two exactly; one task unannotated."""
    final = {1: box_map((1, 5, 5, 25, 25), (2, 35, 10, 55, 30)), 2: box_map((1, 10, 10, 30, 30)),
             3: box_map((2, 0, 0, 20, 20))}
    v1 = {1: box_map((1, 5, 5, 25, 25), (2, 40, 10, 55, 30)),  # cat exact, dog shifted
          2: box_map((1, 10, 10, 30, 20)),  # half the cat
          3: box_map((1, 0, 0, 20, 20))}  # right place, wrong label
    v2 = {1: final[1], 2: final[2]}
    tasks = []
    for t in (1, 2, 3):
        preds = [{"id": 10 + t, "model_version": "seggpt-abcdef12-v1", "created_at": f"2026-11-20T10:00:0{t}Z",
                  "result": results(v1[t])}]
        if t in v2:
            preds.append({"id": 20 + t, "model_version": "seggpt-abcdef12-v2", "created_at": f"2026-11-21T10:00:0{t}Z",
                          "result": results(v2[t])})
        old = {"id": 100 + t, "was_cancelled": False, "updated_at": "2026-11-20T12:00:00Z", "result": results(v1[t])}
        new = {"id": 200 + t, "was_cancelled": False, "updated_at": "2026-11-22T12:00:00Z", "result": results(final[t])}
        skipped = {"id": 300 + t, "was_cancelled": True, "updated_at": "2026-11-23T12:00:00Z", "result": []}
        tasks.append({"id": t, "data": {"image": "x"}, "annotations": [old, new, skipped], "predictions": preds})
    tasks.append({"id": 4, "data": {"image": "x"}, "annotations": [], "predictions": tasks[0]["predictions"]})
    return tasks, {"final": final, "v1": v1}


def test_pycocotools_iou_matches_the_definition() -> None:
    a, b = box_map((1, 0, 0, 10, 10)) > 0, box_map((1, 5, 0, 15, 10)) > 0
    assert abs(mask_iou(a, b) - iou(a, b)) < 1e-9 and mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_report_per_version_over_a_fake_label_studio(server) -> None:  # noqa: F811
    tasks, maps = project_tasks()
    ls = FakeLabelStudio(server, tasks=tasks)
    server.route("GET", "/api/projects/1/", ls.authed(lambda r: Reply.json({"id": 1, "label_config": CONFIG})))
    report = project_report(LabelStudioClient(server.url, LEGACY_KEY), 1)

    assert report["annotated_tasks"] == 3
    v1, v2 = report["versions"]
    assert [v1["model_version"], v2["model_version"]] == ["seggpt-abcdef12-v1", "seggpt-abcdef12-v2"]
    final, pred = maps["final"], maps["v1"]
    expected = {
        "1": np.mean([iou(pred[1] == 1, final[1] == 1), iou(pred[1] == 2, final[1] == 2)]),
        "2": iou(pred[2] == 1, final[2] == 1),
        "3": np.mean([iou(pred[3] == 1, final[3] == 1), iou(pred[3] == 2, final[3] == 2)]),  # 0 and 0
    }
    assert v1["per_task"] == expected and v1["tasks"] == 3
    assert abs(v1["mean_iou"] - np.mean(list(expected.values()))) < 1e-12
    # v1 regions: cat(1), dog(1), half cat(2), wrong-label cat(3): only task 1's cat is unchanged
    assert (v1["regions"], v1["accepted"], v1["accepted_share"]) == (4, 1, 0.25)
    assert v2["per_task"] == {"1": 1.0, "2": 1.0} and v2["accepted_share"] == 1.0 and v2["regions"] == 3

    png = Image.open(io.BytesIO(report_chart(report, "project 1")))
    assert png.format == "PNG" and png.size == (720, 420)


def test_predictions_listed_as_ids_are_fetched_per_task(server) -> None:  # noqa: F811
    tasks, _ = project_tasks()
    full = {t["id"]: t["predictions"] for t in tasks}
    listed = [{**t, "predictions": [p["id"] for p in t["predictions"]]} for t in tasks[:3]]
    ls = FakeLabelStudio(server, tasks=listed)
    server.route("GET", "/api/projects/1/", ls.authed(lambda r: Reply.json({"id": 1, "label_config": CONFIG})))
    server.route("GET", "/api/predictions/", ls.authed(lambda r: Reply.json(full[int(r.query["task"][0])])))
    report = project_report(LabelStudioClient(server.url, LEGACY_KEY), 1)
    assert [v["tasks"] for v in report["versions"]] == [3, 2]
    assert len(server.hits("/api/predictions/")) == 3

"""Quality report: pre-labels of two model versions against final annotations, via a local fake Label Studio."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.quality import mask_iou, project_report, report_chart, version_report, version_tick
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


def annotation(ann_id: int, label_map: np.ndarray, created: str | None, updated: str | None = None,
               draft: str | None = None) -> dict:
    """An annotation with the time fields Label Studio gives (reference §10.2)."""
    return {"id": ann_id, "was_cancelled": False, "created_at": created, "updated_at": updated or created,
            "draft_created_at": draft, "result": results(label_map)}


def prediction(pred_id: int, version: str, label_map: np.ndarray, created: str | None) -> dict:
    return {"id": pred_id, "model_version": f"seggpt-abcdef12-{version}", "created_at": created,
            "result": results(label_map)}


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
        preds = [prediction(10 + t, "v1", v1[t], f"2026-11-20T10:00:0{t}Z")]
        if t in v2:
            preds.append(prediction(20 + t, "v2", v2[t], f"2026-11-21T10:00:0{t}Z"))
        old = annotation(100 + t, v1[t], "2026-11-20T11:00:00.479556Z", "2026-11-20T12:00:00.479587Z")
        new = annotation(200 + t, final[t], "2026-11-22T12:00:00Z")
        skipped = {**annotation(300 + t, np.zeros((H, W), np.int32), "2026-11-23T12:00:00Z"), "was_cancelled": True}
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

    assert report["left_out"] == {"after_annotation": 0, "undated": 0}
    png = Image.open(io.BytesIO(report_chart(report, "project 1")))
    assert png.format == "PNG" and png.size[0] == 720


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


CONTROLS = parse_label_config(CONFIG)
FINAL = box_map((1, 5, 5, 25, 25))
ROUGH = box_map((1, 5, 5, 25, 15))  # half the final cat: IoU 0.5


def one_task(annotations: list[dict], predictions: list[dict]) -> dict:
    return version_report([{"id": 1, "data": {"image": "x"}, "annotations": annotations, "predictions": predictions}],
                          CONTROLS)


def per_task(report: dict) -> dict[str, dict[str, float]]:
    return {v["model_version"].rsplit("-", 1)[1]: v["per_task"] for v in report["versions"]}


def test_a_prediction_made_after_the_annotation_was_started_does_not_count() -> None:
    final = annotation(1, FINAL, "2026-11-22T12:00:00Z", updated="2026-11-25T09:00:00Z")
    report = one_task([final], [prediction(1, "v1", ROUGH, "2026-11-22T11:59:59.999999Z"),
                                prediction(2, "v2", FINAL, "2026-11-22T12:00:00Z"),  # as it was submitted
                                prediction(3, "v3", FINAL, "2026-11-23T08:00:00Z")])  # between submit and the edit
    assert per_task(report) == {"v1": {"1": 0.5}}
    assert report["left_out"] == {"after_annotation": 2, "undated": 0}


def test_a_draft_marks_an_earlier_start() -> None:
    final = annotation(1, FINAL, "2026-11-22T12:00:00Z", draft="2026-11-22T09:00:00Z")
    report = one_task([final], [prediction(1, "v1", ROUGH, "2026-11-22T08:00:00Z"),
                                prediction(2, "v2", FINAL, "2026-11-22T10:00:00Z")])  # after the draft was saved
    assert per_task(report) == {"v1": {"1": 0.5}} and report["left_out"]["after_annotation"] == 1


def test_times_compare_as_times_across_offsets() -> None:
    # 13:00+01:00 is 12:00Z: a prediction at 12:30Z came after it, though it sorts first as a string
    late = one_task([annotation(1, FINAL, "2026-11-22T13:00:00+01:00")],
                    [prediction(1, "v1", FINAL, "2026-11-22T12:30:00Z")])
    assert per_task(late) == {} and late["left_out"]["after_annotation"] == 1
    # 11:00-02:00 is 13:00Z: a prediction at 12:30Z came before it, though it sorts last as a string
    early = one_task([annotation(1, FINAL, "2026-11-22T11:00:00-02:00")],
                     [prediction(1, "v1", FINAL, "2026-11-22T12:30:00.5Z")])
    assert per_task(early) == {"v1": {"1": 1.0}}


def test_the_newest_earlier_prediction_and_the_newest_annotation_are_chosen_by_time() -> None:
    older = annotation(1, ROUGH, "2026-11-22T10:00:00Z", updated="2026-11-22T12:00:00Z")
    newer = annotation(2, FINAL, "2026-11-22T10:00:00Z", updated="2026-11-22T11:00:00-03:00")  # 14:00Z
    report = one_task([older, newer], [prediction(1, "v1", FINAL, "2026-11-21T10:00:00Z")])
    assert per_task(report) == {"v1": {"1": 1.0}}  # compared with the newer annotation
    report = one_task([newer], [prediction(1, "v1", ROUGH, "2026-11-21T10:00:00Z"),
                                prediction(2, "v1", FINAL, "2026-11-21T09:30:00-02:00")])  # 11:30Z, the newer
    assert per_task(report) == {"v1": {"1": 1.0}}


def test_a_missing_or_unreadable_time_leaves_the_prediction_out() -> None:
    predictions = [prediction(1, "v1", FINAL, None), prediction(2, "v2", FINAL, "yesterday"),
                   prediction(3, "v3", FINAL, "2026-11-21T10:00:00Z")]
    report = one_task([annotation(1, FINAL, "2026-11-22T12:00:00Z")], predictions)
    assert per_task(report) == {"v3": {"1": 1.0}} and report["left_out"] == {"after_annotation": 0, "undated": 2}
    undated = one_task([{**annotation(1, FINAL, None), "updated_at": "2026-11-22T12:00:00Z"}], predictions)
    assert per_task(undated) == {} and undated["left_out"] == {"after_annotation": 0, "undated": 3}
    assert undated["annotated_tasks"] == 1


def test_version_ticks_keep_what_tells_versions_apart() -> None:
    assert version_tick("seggpt-abcdef12-v12") == "v12"
    ticks = [version_tick(f"custom-model-{i:03d}") for i in range(15)]
    assert len(set(ticks)) == 15 and all(len(t) <= 12 and t.endswith(f"{i:03d}") for i, t in enumerate(ticks))

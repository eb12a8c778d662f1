"""How good were the pre-labels? Per model version, compared with the final annotations.

For every task that has both a final annotation and predictions, each model version's
prediction is rasterised per control and compared with the annotation: the task's IoU is
the mean over the labels present in either (pycocotools RLE maths), and a predicted
region counts as *accepted unchanged* when an annotation region of the same label has
the same mask (IoU >= 0.99). Versions are ordered by their first prediction.

A prediction counts only if it was made before the annotator started the annotation it is
compared with: a later one (say a re-prediction by a version prompted with that very
annotation) was not what the annotator corrected and would inflate the figures. The start
is the annotation's ``created_at``, or its ``draft_created_at`` when it was submitted from
an earlier draft; ``updated_at`` does not move it, since later edits of a submitted
annotation did not start from a pre-label made in between. Of each version the newest
prediction made before the start is compared. A missing or unreadable time on either side
leaves the prediction out; the report counts what it left out.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Iterable

import numpy as np
from pycocotools import mask as coco_mask

from backend.charts import line_chart
from backend.label_config import ControlSpec, parse_label_config
from backend.ls_client import LabelStudioClient
from backend.results import results_to_label_map

log = logging.getLogger(__name__)

ACCEPTED_IOU = 0.99
EARLIEST = datetime.min.replace(tzinfo=timezone.utc)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks through their COCO RLEs; 1.0 when both are empty."""
    if not a.any() and not b.any():
        return 1.0
    rles = coco_mask.encode(np.asfortranarray(np.stack([a, b], axis=-1).astype(np.uint8)))
    return float(coco_mask.iou([rles[0]], [rles[1]], [0])[0, 0])


def _size(results: Iterable[dict]) -> tuple[int, int] | None:
    for item in results:
        if item.get("original_height") and item.get("original_width"):
            return int(item["original_height"]), int(item["original_width"])
    return None


def compare(predicted: list[dict], annotated: list[dict], controls: list[ControlSpec]) -> dict | None:
    """IoU and accepted-region counts of one prediction against one annotation.

    None when neither holds a region of a served control (nothing to compare) or the two
    cannot be rasterised (no size, malformed items).
    """
    names = {c.name for c in controls}
    pred = [r for r in predicted if r.get("from_name") in names]
    ann = [r for r in annotated if r.get("from_name") in names]
    size = _size(ann) or _size(pred)
    if size is None:
        return None
    height, width = size
    ious, regions, accepted = [], 0, 0
    try:
        for control in controls:
            pmap = results_to_label_map(pred, control, height, width)
            amap = results_to_label_map(ann, control, height, width)
            for label in range(1, len(control.labels) + 1):
                if (pmap == label).any() or (amap == label).any():
                    ious.append(mask_iou(pmap == label, amap == label))
            ann_regions = [(r, results_to_label_map([r], control, height, width) > 0)
                           for r in ann if r.get("from_name") == control.name]
            for r in (r for r in pred if r.get("from_name") == control.name):
                region = results_to_label_map([r], control, height, width) > 0
                if not region.any():
                    continue
                regions += 1
                label = _label(r)
                accepted += any(_label(a) == label and mask_iou(region, m) >= ACCEPTED_IOU for a, m in ann_regions)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("quality report: a prediction could not be compared: %s", exc)
        return None
    if not ious:
        return None
    return {"iou": float(np.mean(ious)), "regions": regions, "accepted": accepted}


def _label(item: dict) -> str | None:
    names = (item.get("value") or {}).get(item.get("type")) or []
    return names[0] if names else None


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time as an aware datetime, so that "…Z" and "…+01:00" compare as times, not
    as strings; one without an offset is UTC (Label Studio's time zone). None when missing or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def annotation_start(annotation: dict) -> datetime | None:
    """The latest moment by which the annotator had started from the pre-labels: the
    annotation's creation, or its draft's when that came first. None when neither is readable."""
    times = [t for t in (parse_time(annotation.get("created_at")), parse_time(annotation.get("draft_created_at"))) if t]
    return min(times) if times else None


def final_annotation(task: dict) -> dict | None:
    """The newest (by ``updated_at``, else ``created_at``) submitted, non-cancelled annotation of a task."""
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    return max(done, key=lambda a: (parse_time(a.get("updated_at")) or parse_time(a.get("created_at")) or EARLIEST,
                                    a.get("id") or 0))


def version_report(tasks: Iterable[dict], controls: list[ControlSpec]) -> dict:
    """``{"annotated_tasks": n, "versions": [...], "left_out": {...}}``: per version its tasks,
    mean IoU, per-task IoUs, predicted regions and the share accepted unchanged, oldest version
    first; ``left_out`` counts the predictions made after their annotation was started, or
    without a readable time on either side."""
    acc: dict[str, dict] = {}
    first: dict[str, datetime] = {}
    left_out = {"after_annotation": 0, "undated": 0}
    seen = 0
    for task in tasks:
        annotation = final_annotation(task)
        if annotation is None:
            continue
        seen += 1
        start = annotation_start(annotation)
        latest: dict[str, tuple[datetime, dict]] = {}  # per version, its newest prediction made before the start
        for p in task.get("predictions") or []:
            v, made = str(p.get("model_version") or ""), parse_time(p.get("created_at"))
            if not v:
                continue
            if start is None or made is None:
                left_out["undated"] += 1
            elif made >= start:
                left_out["after_annotation"] += 1
            elif v not in latest or made >= latest[v][0]:
                latest[v] = (made, p)
        for v, (made, p) in latest.items():
            scored = compare(p.get("result") or [], annotation.get("result") or [], controls)
            if scored is None:
                continue
            row = acc.setdefault(v, {"model_version": v, "per_task": {}, "regions": 0, "accepted": 0})
            if v not in first or made < first[v]:
                first[v], row["first_prediction"] = made, p["created_at"]
            row["per_task"][str(task["id"])] = scored["iou"]
            row["regions"] += scored["regions"]
            row["accepted"] += scored["accepted"]
    versions = sorted(acc.values(), key=lambda r: (first[r["model_version"]], _version_number(r["model_version"])))
    for row in versions:
        row["tasks"] = len(row["per_task"])
        row["mean_iou"] = float(np.mean(list(row["per_task"].values())))
        row["accepted_share"] = row["accepted"] / row["regions"] if row["regions"] else None
    return {"annotated_tasks": seen, "versions": versions, "left_out": left_out}


def _version_number(version: str) -> int:
    found = re.search(r"-v(\d+)$", version)
    return int(found.group(1)) if found else -1


def version_tick(version: str) -> str:
    """A version's x tick label: without this backend's "seggpt-<hash>-" prefix, and of a longer
    name its end, where names of versions differ ("…l-model-012", not "custom-model")."""
    tag = re.sub(r"^seggpt-[0-9a-f]+-", "", version)
    return tag if len(tag) <= 12 else "…" + tag[-11:]


def report_chart(report: dict, title: str) -> bytes:
    """Mean IoU and accepted share over versions, as a PNG."""
    rows = report["versions"]
    ticks = [version_tick(r["model_version"]) for r in rows]
    series = {"mean IoU with the final annotation": [r["mean_iou"] for r in rows],
              "regions accepted unchanged": [r["accepted_share"] if r["accepted_share"] is not None else float("nan")
                                             for r in rows]}
    return line_chart(series, title, "model version", "share / IoU", x_ticks=ticks, y_range=(0.0, 1.0))


def fetch_tasks(client: LabelStudioClient, project: int) -> Iterable[dict]:
    """Annotated tasks with their predictions (fetched per task where the listing lacks them)."""
    for task in client.iter_tasks(project):
        predictions = task.get("predictions") or []
        listed = all(isinstance(p, dict) and "result" in p for p in predictions)
        if not listed or (not predictions and task.get("total_predictions")):
            task = {**task, "predictions": client.get_json("/api/predictions/", {"task": int(task["id"])})}
        yield task


def project_report(client: LabelStudioClient, project: int) -> dict:
    """The report of a Label Studio project, read through its API (label config included)."""
    config = client.get_project(project).get("label_config") or ""
    controls = parse_label_config(config)
    return {"project": str(project), **version_report(fetch_tasks(client, project), controls)}

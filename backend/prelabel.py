"""Whole-project pre-labeling: predict every unlabeled task and store it in Label Studio.

Label Studio's own "Retrieve predictions" is one synchronous /predict call cut at 100 s;
this job instead predicts in small batches and writes each prediction through
``POST /api/predictions/``, so a project of any size gets done. A task is skipped when it
is labeled (a non-cancelled annotation) or already holds a prediction of the current
``model_version`` — checked in Label Studio right before predicting and in a per-(project,
version) done-set in Redis — so a job stopped anywhere resumes without duplicates.
"""
from __future__ import annotations

import logging
from typing import Any

from backend.jobs import JobContext, JobError, Progress
from backend.ls_client import LabelStudioClient
from backend.model import SegGPTBackend, controls_of, project_key

log = logging.getLogger(__name__)

BATCH_SIZE = 8
DONE_TTL_S = 30 * 86400  # the done-set of a model_version is kept this long after its last write
NEEDS_LABEL_STUDIO = "pre-labeling needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY in the worker's environment"


def run_prelabel(ctx: JobContext, project: str, params: dict, progress: Progress) -> dict[str, Any]:
    """The ``prelabel`` job: returns counts of predicted, skipped and failed tasks."""
    if ctx.client is None:
        raise JobError(NEEDS_LABEL_STUDIO)
    project = project_key(project)
    batch_size = _batch_size(params.get("batch_size", BATCH_SIZE))
    client = ctx.client
    label_config = client.get_project(int(project)).get("label_config") or ""
    controls = controls_of(label_config)  # LabelConfigError names what cannot be served
    backend = SegGPTBackend(ctx.settings, ctx.store, client=ctx.client)
    if not backend.store.entry_count(project):  # no webhooks seen (yet): read the annotations from Label Studio
        progress(0.0, "reading the project's annotations")
        backend.bank.backfill(project, list(controls), client.iter_tasks(int(project)))
        backend.store.mark_backfilled(project)
        if not backend.store.entry_count(project):
            raise JobError(backend.no_prompts_reason(project))

    progress(0.0, "listing tasks")
    tasks, labeled = [], 0
    for task in client.iter_tasks(int(project), annotated_only=False, full=False):
        if _is_labeled(task):
            labeled += 1
        else:
            tasks.append({"id": int(task["id"]), "data": task.get("data") or {}})
    counts = {"tasks": len(tasks) + labeled, "labeled": labeled, "predicted": 0, "already_predicted": 0,
              "failed": 0}
    reason = ""
    for start in range(0, len(tasks), batch_size):
        batch = tasks[start:start + batch_size]
        version = backend.model_version(project)
        todo = [t for t in batch if not _has_prediction(client, ctx, project, t["id"], version)]
        counts["already_predicted"] += len(batch) - len(todo)
        predictions = backend.predict(todo, project=project, label_config=label_config) if todo else []
        for task, prediction in zip(todo, predictions):
            if prediction.get("reason"):  # unreadable image, or the prompts were all deleted meanwhile
                counts["failed"] += 1
                reason = prediction["reason"]
                continue
            produced = prediction["model_version"]  # differs from ``version`` if the prompts changed meanwhile
            if produced != version and _has_prediction(client, ctx, project, task["id"], produced):
                counts["already_predicted"] += 1
                continue
            client.create_prediction(task["id"], prediction["result"], prediction["score"], produced)
            _mark_done(ctx, project, produced, task["id"])
            counts["predicted"] += 1
        done = start + len(batch)
        progress(done / len(tasks), f"{done}/{len(tasks)} unlabeled tasks", done=done, total=len(tasks))
    if tasks and counts["failed"] == len(tasks):
        raise JobError(f"no task could be predicted: {reason}")
    counts["model_version"] = backend.model_version(project)
    counts["message"] = _summary(counts, reason)
    return counts


def _batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise JobError(f"batch_size must be an integer from 1 to 256, got {value!r}")
    return value


def _is_labeled(task: dict) -> bool:
    """A non-cancelled annotation; the light view only counts them (``total_annotations``)."""
    if "annotations" in task:
        return any(not a.get("was_cancelled") for a in task["annotations"] or [])
    return int(task.get("total_annotations") or 0) > 0


def _done_key(ctx: JobContext, project: str, version: str) -> str:
    return f"{ctx.store.ns}:p:{project}:prelabeled:{version}"


def _has_prediction(client: LabelStudioClient, ctx: JobContext, project: str, task_id: int, version: str) -> bool:
    """Whether the task already holds a prediction of ``version``: the done-set, then Label Studio
    itself (a prediction written just before a crash, or by Label Studio's own /predict)."""
    if ctx.store.redis.sismember(_done_key(ctx, project, version), task_id):
        return True
    stored = client.get_json("/api/predictions/", {"task": task_id})
    if any(p.get("model_version") == version for p in stored if isinstance(p, dict)):
        _mark_done(ctx, project, version, task_id)
        return True
    return False


def _mark_done(ctx: JobContext, project: str, version: str, task_id: int) -> None:
    key = _done_key(ctx, project, version)
    with ctx.store.redis.pipeline() as pipe:
        pipe.sadd(key, task_id)
        pipe.expire(key, DONE_TTL_S)
        pipe.execute()


def _summary(counts: dict, reason: str) -> str:
    text = (f"{counts['predicted']} tasks predicted, {counts['already_predicted']} already had a "
            f"{counts['model_version']} prediction, {counts['labeled']} labeled tasks skipped")
    if counts["failed"]:
        text += f"; {counts['failed']} could not be predicted (last reason: {reason})"
    return text

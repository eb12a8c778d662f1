"""HTTP routes for prompt settings, tuning results and the quality report.

``GET``/``PUT /projects/{id}/settings`` read and change how a project is prompted
(``prompt_selection``: similar | recent, ``tuned_prompt``: ensemble | alone; ``null`` goes
back to the deployment default); a change is a new prompt-state version, so Label Studio
re-predicts. ``GET /jobs/{id}/loss.png`` is a tune job's loss curve.
``GET /projects/{id}/report`` (JSON) and ``/report.png`` compare each model version's
pre-labels with the final annotations, read from Label Studio.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Body, HTTPException, Response

from backend.ls_client import LabelStudioError
from backend.model import SegGPTBackend
from backend.state_api import project_or_422
from backend.prompting import prompt_settings
from backend.quality import project_report, report_chart
from backend.store import model_version
from backend.tuning import loss_chart_key

Call = Callable[..., Awaitable[Any]]  # app._call: runs a function in a thread, maps errors to HTTP
NEEDS_LABEL_STUDIO = "the quality report reads Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"


def tuning_routes(backend: SegGPTBackend, call: Call) -> APIRouter:
    router = APIRouter()
    store = backend.store

    def settings_view(key: str) -> dict:
        state = store.state(key)
        return {"project": key, "settings": prompt_settings(state, backend.settings), "own": dict(state.settings),
                "version": state.version, "model_version": model_version(backend.fingerprint, state.version)}

    @router.get("/projects/{project}/settings")
    async def get_settings(project: str) -> dict:
        return await call(settings_view, project_or_422(project))

    @router.put("/projects/{project}/settings")
    async def put_settings(project: str, changes: Any = Body(...)) -> dict:
        key = project_or_422(project)
        version = await call(_client_errors(store.update_settings), key, changes)
        return {**await call(settings_view, key), "changed": version is not None}

    @router.get("/jobs/{job_id}/loss.png")
    async def loss_png(job_id: str) -> Response:
        data = await call(store.redis.get, loss_chart_key(store, job_id))
        if data is None:
            raise HTTPException(404, f"no loss curve for job {job_id!r} (not a finished tune job, or expired)")
        return Response(data, media_type="image/png")

    async def report(project: str) -> dict:
        if backend.client is None:
            raise HTTPException(503, NEEDS_LABEL_STUDIO)
        return await call(_client_errors(project_report), backend.client, int(project_or_422(project)))

    @router.get("/projects/{project}/report")
    async def report_json(project: str) -> dict:
        return await report(project)

    @router.get("/projects/{project}/report.png")
    async def report_png(project: str) -> Response:
        data = await report(project)
        return Response(await call(report_chart, data, f"pre-label quality, project {data['project']}"),
                        media_type="image/png")

    return router



def _client_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input (ValueError) -> 422, what Label Studio does not have (its 404) -> 404, and other
    Label Studio failures -> 502, with their messages."""

    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except LabelStudioError as exc:
            raise HTTPException(404 if exc.status == 404 else 502, f"Label Studio: {exc}") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    return wrapped

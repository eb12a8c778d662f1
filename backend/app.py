"""The HTTP service Label Studio 1.23 talks to: /health, /setup, /predict, /webhook, /versions.

Label Studio calls /health (1 s timeout) and /setup (3 s) before every prediction batch,
so predictions run in worker threads behind their own limiter and never queue those two
behind them; the event loop itself only parses and routes. Annotation webhooks are
answered at once and applied afterwards, because Label Studio sends them inside the
annotator's save request.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import anyio
import redis
from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.events import checked_event
from backend.ls_client import LabelStudioClient
from backend.model import DEMO_WARNING, PROMPT_EVENTS, LabelConfigError, ProjectUnservable, SegGPTBackend, project_key
from backend.prelabel import BATCH_SIZE
from backend.problems import slug
from backend.security import BasicAuthMiddleware, BodyLimitMiddleware
from backend.settings import Settings
from backend.state_api import project_or_422, state_routes
from backend.tuning_api import tuning_routes
from backend.store import PromptStore
from seggpt_model import WeightsError

log = logging.getLogger(__name__)

PREDICT_THREADS = 4  # concurrent /predict calls in threads; the model itself runs one at a time


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _ProjectBody(_Body):
    """Bodies naming a project as Label Studio does ("3.1718000000"); kept as the bare id."""

    project: str | int

    @field_validator("project")
    @classmethod
    def _project_id(cls, value: str | int) -> str:
        return project_key(value)


class SetupRequest(_ProjectBody):
    schema_: str = Field(alias="schema")
    extra_params: Any = None


class Task(_Body):
    id: int
    data: dict[str, Any]


class PredictParams(_Body):
    context: dict[str, Any] | None = None


class PredictRequest(_ProjectBody):
    tasks: list[Task] = Field(min_length=1)
    label_config: str
    params: PredictParams | None = None


class PrelabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(default=BATCH_SIZE, ge=1, le=256)


class WebhookRequest(_Body):
    action: str = Field(max_length=100)
    project: dict[str, Any] | int | str | None = None


def create_app(settings: Settings, backend: SegGPTBackend | None = None) -> FastAPI:
    """Build the service; without ``backend`` one is made from ``settings`` (Redis, LS client)."""
    if backend is None:
        client = (LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
                  if settings.label_studio_url and settings.label_studio_api_key else None)
        backend = SegGPTBackend(settings, PromptStore.from_settings(settings), client=client)
    app = FastAPI(title="SegGPT ML backend for Label Studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.basic_auth_user:  # added last: runs first, before the body is even read
        app.add_middleware(BasicAuthMiddleware, user=settings.basic_auth_user, password=settings.basic_auth_pass)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(redis.ConnectionError, _redis_unreachable)
    app.add_exception_handler(redis.TimeoutError, _redis_unreachable)
    predict_limiter = anyio.CapacityLimiter(PREDICT_THREADS)

    @app.get("/health")
    def health() -> dict:
        """200 even without Redis: Label Studio then calls /setup, whose 503 it shows as the reason."""
        redis_ok = backend.store.ping()
        state = {"status": "UP" if redis_ok else "DEGRADED", "model_class": backend.model_class,
                 "model_loaded": backend.model_loaded, "redis": "ok" if redis_ok else "unreachable",
                 "demo_model": backend.demo}
        if backend.demo:
            state["warning"] = DEMO_WARNING
        return state

    @app.post("/setup")
    async def setup(body: SetupRequest) -> JSONResponse:
        try:
            version = await _call(backend.setup, body.project, body.schema_, body.extra_params)
        except ProjectUnservable as exc:
            # Label Studio keeps only requests' error line ("422 Client Error: ... for url: URL"), never
            # the body, so the fix travels in the URL it is redirected to (307 keeps the POST).
            log.warning("project %s cannot be served: %s", body.project, exc.reason)
            return JSONResponse({"detail": f"{exc.reason}; {exc.fix}"}, status_code=307,
                                headers={"Location": f"setup-refused/{slug('annotations-unusable-' + exc.fix)}"})
        return JSONResponse({"model_version": version})

    @app.post("/setup-refused/{fix}", status_code=422)
    async def setup_refused(fix: str) -> JSONResponse:
        """Where a refused /setup points; the path says the fix (see /setup)."""
        return JSONResponse({"detail": fix.replace("-", " ")}, status_code=422)

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict:
        context = body.params.context if body.params else None
        tasks = [task.model_dump() for task in body.tasks]
        results = await _call(partial(backend.predict, tasks, context, project=body.project,
                                      label_config=body.label_config), limiter=predict_limiter)
        return {"results": results, "model_version": results[0]["model_version"]}

    @app.post("/webhook")
    async def webhook(body: WebhookRequest, background: BackgroundTasks) -> JSONResponse:
        data = body.model_dump(exclude={"action"})
        if body.action in PROMPT_EVENTS or body.action == "START_TRAINING":
            project = body.project.get("id") if isinstance(body.project, dict) else body.project
            try:
                project_key(project)
                data = checked_event(body.action, data)
            except ValueError as exc:
                raise HTTPException(422, f"{body.action}: {exc}") from None
        if body.action in PROMPT_EVENTS:
            background.add_task(_apply_event, backend, body.action, data)
            return JSONResponse({"status": "accepted", "action": body.action})
        result = await _call(backend.fit, body.action, data)
        return JSONResponse(result, status_code=201 if body.action == "START_TRAINING" else 200)

    @app.get("/versions")
    async def versions(project: str | None = None) -> dict:
        try:
            keys = [project_key(project)] if project else None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        found = await _call(lambda: [backend.model_version(k) for k in keys or backend.store.projects()])
        return {"versions": found}

    @app.post("/projects/{project}/prelabel", status_code=202)
    async def prelabel(project: str, body: PrelabelRequest | None = None) -> dict:
        """Queue pre-labeling of the whole project (or join the one under way): not bound by /predict's 100 s."""
        key = project_or_422(project)
        job, created = await _call(backend.jobs.submit, key, "prelabel", (body or PrelabelRequest()).model_dump())
        return {**job, "joined": not created}

    @app.get("/projects/{project}/jobs")
    async def project_jobs(project: str) -> dict:
        return {"jobs": await _call(backend.jobs.jobs, project_or_422(project))}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict:
        record = await _call(backend.jobs.get, job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return record

    app.include_router(state_routes(backend, _call))
    app.include_router(tuning_routes(backend, _call))
    return app



async def _call(fn: Callable[..., Any], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> Any:
    """Run ``fn`` in a worker thread and turn its failures into short HTTP errors.

    Unexpected exceptions become a generic 500; their traceback goes to the log only at
    debug level, since messages can carry URLs or other request details.
    """
    try:
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=limiter)
    except LabelConfigError as exc:
        raise HTTPException(422, f"label config cannot be served: {exc}") from None
    except WeightsError as exc:
        log.error("SegGPT weights cannot be loaded: %s", exc)
        raise HTTPException(503, "the SegGPT weights cannot be loaded; see the server log") from None
    except (HTTPException, ProjectUnservable, redis.ConnectionError, redis.TimeoutError):
        raise  # answered as they are / by _redis_unreachable
    except redis.RedisError as exc:
        log.error("prompt store unavailable: %s", type(exc).__name__)
        raise HTTPException(503, "the prompt store (Redis) is unavailable") from None
    except Exception as exc:
        log.error("request failed: %s in %s", type(exc).__name__, getattr(fn, "__name__", "handler"))
        log.debug("traceback", exc_info=True)
        raise HTTPException(500, "internal error; see the server log") from None


def _apply_event(backend: SegGPTBackend, action: str, data: dict) -> None:
    """Apply an annotation webhook after it was answered; failures are only logged."""
    try:
        result = backend.fit(action, data)
        log.info("%s applied: %s", action, result.get("status"))
    except ValueError as exc:  # MediaError included: bad payload, unreadable image
        log.warning("%s not applied: %s", action, exc)
    except Exception as exc:
        log.error("%s failed: %s", action, type(exc).__name__)
        log.debug("traceback", exc_info=True)


async def _redis_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """503 with a short reason; the client reconnects by itself once Redis is back."""
    log.error("prompt store (Redis) unreachable: %s on %s", type(exc).__name__, request.url.path)
    return JSONResponse({"detail": "the prompt store (Redis) is unreachable; retry shortly"}, status_code=503)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One short line per problem instead of pydantic's nested structures; 400 for broken JSON."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (media_type == "application/json" or media_type.endswith("+json")) and any(
            tuple(e.get("loc", ())) == ("body",) and e.get("type") != "missing" for e in errors):
        return JSONResponse({"detail": f"send the body as JSON (Content-Type: application/json), "
                                       f"not {media_type[:60] or 'without a Content-Type'}"}, status_code=415)
    problems = []
    for error in errors[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

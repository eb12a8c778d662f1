"""HTTP routes over a project's shared prompt state: history, rollback, prompt packs.

``GET /projects/{id}/versions`` lists the kept versions, ``POST /projects/{id}/rollback``
``{"version": N}`` makes a new version equal to N, ``GET /projects/{id}/pack`` downloads the
current state as a prompt pack and ``POST /projects/{id}/pack`` replaces it by one (the zip
as the raw body, or as the ``file`` field of a multipart form).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from backend.model import SegGPTBackend, project_key
from backend.packs import MAX_UNPACKED_BYTES, ModelIdentity, export_pack, import_pack
from backend.store import UnknownVersion, model_version
from seggpt_model import WeightsError

MAX_UPLOAD_BYTES = MAX_UNPACKED_BYTES + (1 << 20)  # a pack, and room for multipart framing

Call = Callable[..., Awaitable[Any]]  # app._call: runs a function in a thread, maps errors to HTTP


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


def state_routes(backend: SegGPTBackend, call: Call) -> APIRouter:
    router = APIRouter()
    store = backend.store

    @router.get("/projects/{project}/versions")
    async def versions(project: str) -> dict:
        key = project_or_422(project)
        history = await call(store.history, key)
        current = history[0]["version"] if history else await call(store.version, key)
        return {"project": key, "version": current, "model_version": model_version(backend.fingerprint, current),
                "keep_versions": store.keep_versions,
                "versions": [{**v, "model_version": model_version(backend.fingerprint, v["version"])}
                             for v in history]}

    @router.get("/projects/{project}/problems")
    async def problems(project: str) -> dict:
        """Annotations that could not become prompts, and why (cleared once used, deleted or retried)."""
        key = project_or_422(project)
        found = await call(store.problems, key)
        return {"project": key, "problems": found, "count": len(found)}

    @router.post("/projects/{project}/rollback")
    async def rollback(project: str, body: RollbackRequest) -> dict:
        key = project_or_422(project)
        version = await call(_client_errors(store.rollback), key, body.version)
        current = version if version is not None else await call(store.version, key)
        return {"status": "rolled_back" if version is not None else "unchanged", "restored": body.version,
                "version": current, "model_version": model_version(backend.fingerprint, current)}

    @router.get("/projects/{project}/pack")
    async def download(project: str) -> Response:
        key = project_or_422(project)
        data, version = await call(_client_errors(lambda: export_pack(store, key, _identity(backend))))
        name = f"seggpt-project-{key}-v{version}.zip"
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @router.post("/projects/{project}/pack")
    async def upload(project: str, request: Request) -> dict:
        key = project_or_422(project)
        data = await _pack_bytes(request)
        result = await call(_client_errors(lambda: import_pack(store, key, data, _identity(backend))))
        return {"status": "imported", "project": key, **result}

    return router


def _identity(backend: SegGPTBackend) -> ModelIdentity:
    return ModelIdentity(backend.fingerprint, backend.model_config())


def project_or_422(project: str) -> str:
    """``project_key`` for a path parameter: a bad id is a 422 naming the problem."""
    try:
        return project_key(project)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _client_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its refusals as 4xx: an unknown version 404, bad input 422."""
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except WeightsError:
            raise  # the server's problem, not the request's
        except UnknownVersion as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    return run


async def _pack_bytes(request: Request) -> bytes:
    """The uploaded pack: the raw body, or the ``file`` part of a multipart form; 413 when too large."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"a prompt pack may have at most {MAX_UPLOAD_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"a prompt pack may have at most {MAX_UPLOAD_BYTES} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            raise HTTPException(422, "no prompt pack: send the zip as the request body or as the form field 'file'")
        return bytes(body)

    async def once() -> AsyncIterator[bytes]:
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise HTTPException(422, f"multipart body: {exc.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(422, "no prompt pack: the multipart form has no file field 'file'")
    try:
        return await upload.read()
    finally:
        await form.close()

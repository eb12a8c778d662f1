"""A small Label Studio API client that works with both kinds of API key.

Label Studio 1.23 gives new organisations personal access tokens (PATs) only: a PAT is a
JWT *refresh* token that must be exchanged at ``/api/token/refresh/`` for a 5-minute
access token. Legacy keys go out as ``Token <key>``. Errors never include either.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any, Iterator

import httpx

_REFRESH_MARGIN_S = 30.0  # refresh this long before the access token expires
_FALLBACK_LIFETIME_S = 60.0  # for access tokens without an ``exp`` claim
# Data Manager filter: only tasks with at least one annotation (SDK ``only_annotated`` does not filter in 1.23).
_ANNOTATED_QUERY = json.dumps(
    {
        "filters": {
            "conjunction": "and",
            "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}
            ],
        }
    }
)


class LabelStudioError(RuntimeError):
    """A failed Label Studio call; ``status`` is the HTTP status when there was a response."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The unverified claims of a JWT, or None when ``token`` is not shaped like one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioClient:
    """Label Studio REST calls with the right ``Authorization`` header, refreshed as needed."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 30.0):
        if not url or not api_key:
            raise ValueError("LabelStudioClient needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        self.url = url.rstrip("/")
        self._key = api_key.strip()
        claims = jwt_claims(self._key)
        self._is_pat = bool(claims) and claims.get("token_type") == "refresh"
        self._scheme = "Bearer" if claims else "Token"
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LabelStudioClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def auth_headers(self) -> dict[str, str]:
        """Headers for Label Studio requests (API and ``/data/...`` media alike)."""
        token = self._access_token() if self._is_pat else self._key
        return {"Authorization": f"{self._scheme} {token}"}

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", path, params=params)

    def get(self, path: str, **params: Any) -> Any:
        return self.get_json(path, params)

    def get_project(self, project_id: int) -> dict:
        return self.get_json(f"/api/projects/{int(project_id)}/")

    def get_task(self, task_id: int) -> dict:
        """One task with annotations and predictions.

        Label Studio may ask the ML backend to predict a task fetched this way when it has
        no predictions yet, so avoid calling it while serving that task's ``/predict``.
        """
        return self.get_json(f"/api/tasks/{int(task_id)}/")

    def iter_tasks(self, project_id: int, *, annotated_only: bool = True, page_size: int = 100,
                   full: bool = True) -> Iterator[dict]:
        """Tasks of a project with their annotations, page by page.

        With ``annotated_only`` only tasks with at least one non-cancelled annotation are
        yielded (filtered server-side where supported and checked again here). ``full=False``
        asks for Label Studio's light view: no annotation or prediction bodies, but the
        counters (``total_annotations`` counts non-cancelled annotations).
        """
        params: dict[str, Any] = {"project": int(project_id), "page_size": page_size}
        if full:
            params["fields"] = "all"
        if annotated_only:
            params["query"] = _ANNOTATED_QUERY
        page, seen = 1, 0
        while True:
            try:
                body = self.get_json("/api/tasks/", {**params, "page": page})
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            for task in tasks:
                if not annotated_only or any(not a.get("was_cancelled") for a in task.get("annotations") or []):
                    yield task
            seen += len(tasks)
            if not tasks or not isinstance(body, dict) or seen >= body.get("total", 0):
                return
            page += 1

    def create_prediction(self, task_id: int, result: list[dict], score: float, model_version: str) -> dict:
        """Store a prediction directly, bypassing the 100 s ``/predict`` limit for large batches."""
        body = {"task": int(task_id), "result": result, "score": float(score), "model_version": model_version}
        return self._request("POST", "/api/predictions/", json=body)

    def _request(self, method: str, path: str, *, params: dict | None = None, json: Any = None) -> Any:
        url = f"{self.url}/{path.lstrip('/')}"
        for attempt in range(2):
            try:
                response = self._http.request(method, url, params=params, json=json, headers=self.auth_headers())
            except httpx.HTTPError as exc:
                raise LabelStudioError(f"{method} {path}: cannot reach Label Studio at LABEL_STUDIO_URL "
                                       f"({type(exc).__name__})") from None
            if response.status_code == 401 and self._is_pat and attempt == 0:
                self._drop_access_token()  # revoked or expired early: refresh once and retry
                continue
            break
        if not response.is_success:
            hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
            raise LabelStudioError(f"{method} {path} failed: HTTP {response.status_code}: "
                                   f"{self._detail(response)}{hint}", response.status_code)
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(f"{method} {path}: Label Studio answered with non-JSON content") from None

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or time.time() >= self._access_expires - _REFRESH_MARGIN_S:
                self._access, self._access_expires = self._refresh()
            return self._access

    def _drop_access_token(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self) -> tuple[str, float]:
        try:
            response = self._http.post(f"{self.url}/api/token/refresh/", json={"refresh": self._key})
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"token refresh: cannot reach Label Studio at LABEL_STUDIO_URL "
                                   f"({type(exc).__name__})") from None
        if not response.is_success:
            raise LabelStudioError(
                f"token refresh failed: HTTP {response.status_code}: {self._detail(response)} "
                "(is LABEL_STUDIO_API_KEY a valid personal access token?)",
                response.status_code,
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise LabelStudioError("token refresh: the answer holds no access token") from None
        if not isinstance(access, str) or not access:
            raise LabelStudioError("token refresh: the answer holds no access token")
        expires = (jwt_claims(access) or {}).get("exp")
        return access, float(expires) if isinstance(expires, (int, float)) else time.time() + _FALLBACK_LIFETIME_S

    def _detail(self, response: httpx.Response) -> str:
        """A short, token-free description of an error response."""
        try:
            body = response.json()
            text = str(body.get("detail", body)) if isinstance(body, dict) else str(body)
        except ValueError:
            text = response.text
        for secret in (self._key, self._access):
            if secret:
                text = text.replace(secret, "***")
        return " ".join(text.split())[:300] or response.reason_phrase

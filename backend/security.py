"""Guards in front of every endpoint: HTTP basic auth and a request-body size limit.

They are ASGI middleware rather than FastAPI dependencies so that they run before
anything reads the request: a client without credentials learns nothing (not even
whether its JSON parses), routes added later are covered without opting in, and an
oversized body is refused before it is buffered and parsed.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BasicAuthMiddleware:
    """401 for any HTTP request without the configured user and password.

    Both parts are always compared, in constant time, so response timing tells an
    attacker neither which part was wrong nor how much of it matched.
    """

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self._user = user.encode()
        self._password = password.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _reply(send, 401, "authentication required", [(b"www-authenticate", b"Basic")])

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        try:
            decoded = base64.b64decode(token.strip(), validate=True) if scheme.lower() == b"basic" else None
        except (binascii.Error, ValueError):
            decoded = None
        user, sep, password = (decoded or b"").partition(b":")
        user_ok = secrets.compare_digest(user, self._user)
        password_ok = secrets.compare_digest(password, self._password)
        return bool(decoded is not None and sep and user_ok and password_ok)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, declared or streamed (chunked).

    The body is read here, up to the limit, and handed on in one piece; the endpoints
    would buffer it whole anyway to parse the JSON.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await _reply(send, 413, f"request body is larger than MAX_REQUEST_BYTES ({self.max_bytes} bytes)",
                     [(b"connection", b"close")])


async def _reply(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})

"""A real HTTP server on 127.0.0.1, and a Label Studio 1.23 look-alike built on it.

Tests register handlers per path; every request is recorded with its headers so
tests can check, for example, that credentials never reached a foreign host.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from backend.ls_client import jwt_claims


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes

    @classmethod
    def json(cls, data, status: int = 200) -> "Reply":
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


Handler = Callable[[Request], Reply]


class LocalServer:
    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[Request] = []
        server = self

        class _Handler(BaseHTTPRequestHandler):
            def _serve(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command, parts.path, parse_qs(parts.query), dict(self.headers), self.rfile.read(length)
                )
                server.requests.append(request)
                handler = server.routes.get((self.command, parts.path))
                reply = handler(request) if handler else Reply(404, b"not found")
                self.send_response(reply.status)
                headers = {"Content-Length": str(len(reply.body))} if reply.send_length else {}
                headers.update(reply.headers)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up early, as size limits make it do

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer((host, 0), _Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def route(self, method: str, path: str, handler: Handler | Reply) -> None:
        self.routes[(method, path)] = handler if callable(handler) else (lambda _request: handler)

    def hits(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server():
    with LocalServer() as s:
        yield s


@pytest.fixture
def other_server():
    """A second server, reached as ``localhost`` so that it is a different host from ``server``."""
    with LocalServer() as s:
        s.host = "localhost"
        yield s


SIGNING_KEY = "test-signing-key-for-the-fake-label-studio"
LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"


def make_jwt(token_type: str, lifetime: float, jti: str) -> str:
    now = time.time()
    claims = {"token_type": token_type, "exp": int(now + lifetime), "iat": int(now), "jti": jti, "user_id": 1}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


class FakeLabelStudio:
    """Token refresh, auth checks, paginated tasks and predictions, as Label Studio answers them."""

    def __init__(self, server, tasks=(), access_lifetime=300.0, legacy_enabled=True):
        self.server = server
        self.pat = make_jwt("refresh", 200 * 365 * 86400, "pat")
        self.access_lifetime = access_lifetime
        self.legacy_enabled = legacy_enabled
        self.valid_access: set[str] = set()
        self.refreshes = 0
        self.tasks = list(tasks)
        self.predictions: list[dict] = []
        self._ids = itertools.count(1)
        server.route("POST", "/api/token/refresh/", self.refresh)
        server.route("GET", "/api/tasks/", self.authed(self.list_tasks))
        server.route("GET", "/api/tasks/2/", self.authed(lambda r: Reply.json(self.tasks[1])))
        server.route("GET", "/api/projects/1/", self.authed(lambda r: Reply.json({"id": 1, "title": "p"})))
        server.route("POST", "/api/predictions/", self.authed(self.create_prediction))
        server.route(
            "GET", "/api/echo-auth/", lambda r: Reply.json({"detail": f"bad {r.headers.get('Authorization')}"}, 500)
        )
        server.route("GET", "/api/not-json/", self.authed(lambda r: Reply(200, b"<html>")))

    def serve(self, path: str, reply: Reply) -> None:
        """Serve ``reply`` at ``path`` to authenticated requests only, like ``/data/upload/``."""
        self.server.route("GET", path, self.authed(lambda _request: reply))

    def refresh(self, request):
        self.refreshes += 1
        if request.json().get("refresh") != self.pat:
            return Reply.json({"detail": "Token is invalid or expired", "code": "token_not_valid"}, 401)
        access = make_jwt("access", self.access_lifetime, f"a{next(self._ids)}")
        self.valid_access.add(access)
        return Reply.json({"access": access})

    def authed(self, handler):
        def check(request):
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            legacy_ok = self.legacy_enabled and scheme == "Token" and token == LEGACY_KEY
            bearer_ok = scheme == "Bearer" and token in self.valid_access and jwt_claims(token)["exp"] > time.time()
            if not (legacy_ok or bearer_ok):
                return Reply.json({"detail": "Authentication credentials were not provided."}, 401)
            return handler(request)

        return check

    def list_tasks(self, request):
        page, size = int(request.query["page"][0]), int(request.query["page_size"][0])
        with_annotations = request.query.get("fields") == ["all"]
        chunk = self.tasks[(page - 1) * size : page * size]
        if page > 1 and not chunk:
            return Reply.json({"detail": "Invalid page."}, 404)
        tasks = [t if with_annotations else {k: v for k, v in t.items() if k != "annotations"} for t in chunk]
        return Reply.json({"total_annotations": 0, "total_predictions": 0, "total": len(self.tasks), "tasks": tasks})

    def create_prediction(self, request):
        body = request.json()
        self.predictions.append(body)
        return Reply.json({"id": len(self.predictions), **body}, 201)


class TrickleServer:
    """A slow-loris server: answers every connection with ``head`` at once, then ``response``
    ``chunk`` bytes every ``delay`` s."""

    def __init__(self, response: bytes, chunk: int = 1, delay: float = 0.05, head: bytes = b""):
        self.response, self.chunk, self.delay, self.head = response, chunk, delay, head
        self.connections = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/x.png") -> str:
        return f"http://{self.host}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # timeout, or closed
                continue
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.head)
                for start in range(0, len(self.response), self.chunk):
                    if self._stop.wait(self.delay):
                        return
                    conn.sendall(self.response[start:start + self.chunk])
            except OSError:  # the client hung up: what a deadline does
                pass

    def __enter__(self) -> "TrickleServer":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()

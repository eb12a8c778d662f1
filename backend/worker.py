"""``seggpt-backend worker``: an RQ worker for the backend's jobs, and the one ``serve`` starts itself.

Any number of workers, on any machine that reaches REDIS_URL, share the queue. With the
embedded Redis (no REDIS_URL) the server lives inside the ``serve`` process, so ``serve``
starts one worker process and hands it the server's unix socket.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import redis
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.jobs import JobQueue, rq_connection
from backend.settings import Settings
from backend.store import PromptStore, connect

log = logging.getLogger(__name__)

STOP_WAIT_S = 10  # how long ``serve`` waits for its worker at each shutdown step
RECONNECT_S = 1.0  # how often a worker that lost Redis tries it again


PUBSUB_WAKE_S = 1.0  # how often the command-channel thread wakes; its exit waits for it


class _Worker(Worker):
    """RQ's worker with a command-channel thread that wakes every second instead of every 60 s:
    closing the channel at shutdown waits for the thread's read, so after a job a SIGTERM took
    about a minute to stop the worker."""

    def subscribe(self) -> None:
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=PUBSUB_WAKE_S, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> bool:
    """Work the job queue until stopped (or, with ``burst``, until it is empty).

    SIGTERM lets the current job finish; a second one stops it (it resumes when triggered again).
    Redis lost during a job ends that job (it is marked failed); the worker waits for Redis and works on.
    """
    client = connect(settings)  # with the embedded Redis: start it, or join the one serve runs
    connection = (redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5) if settings.redis_url
                  else rq_connection(client))
    queue = JobQueue(PromptStore(connection), connection).queue
    while True:
        worker = _Worker([queue], connection=connection, name=name, serializer=JSONSerializer,
                        work_horse_killed_handler=_horse_killed)
        try:
            return worker.work(burst=burst, logging_level=settings.log_level)
        except redis.ConnectionError as exc:
            # RQ retries a lost Redis while idle but quits when it is lost during a job: wait and work on
            log.warning("lost the connection to Redis (%s); working again once it answers", type(exc).__name__)
            _wait_for_redis(connection)
            with contextlib.suppress(redis.RedisError):
                worker.register_death()  # frees the name for the next registration


def _wait_for_redis(connection: redis.Redis) -> None:
    """Block until Redis answers; SIGTERM/SIGINT stop the process meanwhile (no job is running)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        try:
            if connection.ping():
                return
        except redis.RedisError:
            time.sleep(RECONNECT_S)


def _horse_killed(job: Job, pid: int, status: int, rusage: object) -> None:
    """The process running a job died (OOM killer, kill -9): record it at once, not after the heartbeat."""
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    how = f"was killed by signal {signum}" if signum else f"exited with status {os.WEXITSTATUS(status)}"
    JobQueue(PromptStore(job.connection), job.connection).fail(
        job.id, f"the process running this job {how} (out of memory?); trigger it again to resume")


@contextlib.contextmanager
def embedded_worker(settings: Settings) -> Iterator[subprocess.Popen | None]:
    """With the embedded Redis, run one worker process for as long as the block runs."""
    if settings.redis_url:
        yield None
        return
    client = connect(settings)
    env = {**os.environ, "REDIS_URL": f"unix://{client.socket_file}"}
    proc = subprocess.Popen([sys.executable, "-m", "backend", "worker"], env=env)
    log.info("started job worker (pid %s) on the embedded Redis", proc.pid)
    # uvicorn re-raises SIGTERM once it has shut down: exit through this block, not around it
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield proc
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen) -> None:
    """Warm stop (the job finishes), then cold (the job is stopped), then kill."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            continue

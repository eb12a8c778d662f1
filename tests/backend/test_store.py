"""PromptStore on a real (embedded) Redis: entries, versions, atomicity, jobs, connect()."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from backend.settings import Settings
from backend.store import PromptEntry, PromptStore, connect, model_version


def entry(task: int, annotation: int | None = None, at: float = 100.0, controls=("tag",)) -> PromptEntry:
    return PromptEntry(task_id=task, annotation_id=annotation if annotation is not None else task * 10,
                       updated_at=at, images={"image": f"jpeg-{task}-{at}".encode()},
                       label_maps={c: f"png-{task}-{c}-{at}".encode() for c in controls})


def test_connect_embedded_keeps_data_under_model_dir(tmp_path: Path) -> None:
    client = connect(Settings(model_dir=tmp_path / "models"))
    try:
        PromptStore(client).put_entry("1", entry(1))
        assert Path(client.db).parent == tmp_path / "models"
        # the same server is reachable through REDIS_URL, like a second replica would be
        other = PromptStore(connect(Settings(redis_url=f"unix://{client.socket_file}")))
        assert other.version("1") == 1 and other.entry("1", 1) == PromptStore(client).entry("1", 1)
    finally:
        client._cleanup()


def test_embedded_redis_writes_each_change_to_disk_at_once(tmp_path: Path) -> None:
    """Acknowledged bank changes are in the append-only file before the call returns."""
    client = connect(Settings(model_dir=tmp_path))
    try:
        PromptStore(client).put_entry("1", entry(1))
        assert b"jpeg-1-100.0" in (tmp_path / "prompt-state.aof").read_bytes()
    finally:
        client._cleanup()


def test_put_entry_round_trips_bytes_and_bumps_version(store: PromptStore) -> None:
    assert store.version("7") == 0
    stored = entry(3, controls=("tag", "poly"))
    assert store.put_entry("7", stored) == 1
    assert store.entry("7", 3) == stored
    assert store.version("7") == 1 and store.entry_count("7") == 1
    assert store.projects() == ["7"]
    assert store.version("8") == 0  # projects are separate


def test_snapshot_is_newest_first_per_control_and_limited(store: PromptStore) -> None:
    store.put_entry("1", entry(1, at=10.0, controls=("tag",)))
    store.put_entry("1", entry(2, at=30.0, controls=("tag", "poly")))
    store.put_entry("1", entry(3, at=20.0, controls=("poly",)))
    version, picked = store.snapshot("1", ["tag", "poly", "rect"], k=5)
    assert version == 3
    assert [e.task_id for e in picked["tag"]] == [2, 1]
    assert [e.task_id for e in picked["poly"]] == [2, 3]
    assert picked["rect"] == []
    _, top1 = store.snapshot("1", ["tag"], k=1)
    assert [e.task_id for e in top1["tag"]] == [2]


def test_older_or_repeated_annotations_do_not_replace_newer(store: PromptStore) -> None:
    assert store.put_entry("1", entry(5, annotation=50, at=200.0)) == 1
    assert store.put_entry("1", entry(5, annotation=50, at=200.0)) is None  # replay: unchanged
    assert store.put_entry("1", entry(5, annotation=51, at=150.0)) is None  # older annotation
    assert store.entry("1", 5).annotation_id == 50
    newer = entry(5, annotation=51, at=300.0, controls=("poly",))
    assert store.put_entry("1", newer) == 2
    assert store.entry("1", 5) == newer
    _, picked = store.snapshot("1", ["tag", "poly"], k=4)
    assert picked["tag"] == [] and [e.annotation_id for e in picked["poly"]] == [51]
    # the replaced annotation no longer maps to the task: deleting it changes nothing
    assert store.remove_annotations("1", [50]) is None and store.entry("1", 5) == newer


def test_deleted_annotations_stay_deleted(store: PromptStore) -> None:
    store.put_entry("1", entry(1, annotation=11))
    store.put_entry("1", entry(2, annotation=22))
    assert store.remove_annotations("1", [11, 999]) == 3
    assert store.entry("1", 1) is None and store.entry_count("1") == 1
    assert store.remove_annotations("1", [11]) is None
    # a late webhook (or a backfill) for the deleted annotation does not resurrect it
    assert store.put_entry("1", entry(1, annotation=11, at=500.0)) is None
    # an annotation deleted before its creation was processed is refused as well
    assert store.put_entry("1", entry(3, annotation=999)) is None
    assert store.version("1") == 3


def test_cancelled_annotation_can_come_back(store: PromptStore) -> None:
    store.put_entry("1", entry(1, annotation=11, at=1.0))
    assert store.remove_annotations("1", [11], forget=False) == 2
    assert store.put_entry("1", entry(1, annotation=11, at=2.0)) == 3


def test_remove_tasks(store: PromptStore) -> None:
    store.put_entry("1", entry(1, controls=("tag", "poly")))
    store.put_entry("1", entry(2))
    assert store.remove_tasks("1", [1, 42]) == 3
    assert store.remove_tasks("1", [42]) is None
    _, picked = store.snapshot("1", ["tag", "poly"], k=4)
    assert [e.task_id for e in picked["tag"]] == [2] and picked["poly"] == []


def test_two_replicas_never_lose_a_version_bump(redis_client: redis.Redis) -> None:
    """Two connections (as two replicas would hold) write the same project concurrently."""
    replicas = [PromptStore(redis.Redis(unix_socket_path=redis_client.socket_file)) for _ in range(2)]
    returned: list[list[int]] = [[], []]

    def write(i: int) -> None:
        for n in range(50):
            returned[i].append(replicas[i].put_entry("1", entry(i * 1000 + n, at=float(n))))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = returned[0] + returned[1]
    assert sorted(versions) == list(range(1, 101))  # every change got its own version
    assert replicas[0].version("1") == 100 and replicas[1].entry_count("1") == 100


def test_concurrent_updates_of_one_task_keep_the_newest(redis_client: redis.Redis) -> None:
    replicas = [PromptStore(redis.Redis(unix_socket_path=redis_client.socket_file)) for _ in range(2)]
    accepted: list[int] = []

    def write(i: int) -> None:
        for n in range(50):
            version = replicas[i].put_entry("1", entry(1, annotation=n * 2 + i, at=float(n * 2 + i)))
            if version is not None:
                accepted.append(version)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(accepted) == list(range(1, len(accepted) + 1))
    assert replicas[0].version("1") == len(accepted)
    assert replicas[0].entry("1", 1).updated_at == 99.0  # the newest write won


def test_snapshot_never_mixes_versions(redis_client: redis.Redis) -> None:
    """While another replica adds entries, every snapshot holds exactly ``version`` entries."""
    writer = PromptStore(redis.Redis(unix_socket_path=redis_client.socket_file))
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
        seen.append((version, len(picked["tag"])))
    thread.join()
    assert all(version == count for version, count in seen)
    assert reader.snapshot("1", ["tag"], k=1000)[0] == 60


def test_backfill_claim_is_exclusive(store: PromptStore) -> None:
    assert not store.is_backfilled("2")
    assert store.claim_backfill("2") is True
    assert store.claim_backfill("2") is False
    store.mark_backfilled("2")
    assert store.is_backfilled("2") and not store.is_backfilled("3")


def test_model_version_string() -> None:
    assert model_version("0123456789abcdef", 12) == "seggpt-01234567-v12"


def test_ping_reports_a_dead_server(tmp_path: Path) -> None:
    dead = PromptStore(connect(Settings(redis_url=f"unix://{tmp_path / 'none.sock'}")))
    assert dead.ping() is False
    with pytest.raises(redis.ConnectionError):
        dead.version("1")

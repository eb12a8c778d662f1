"""Shared prompt state on a real redis-server: the cost of a version and of reading one, by
bank size, and 2 x N concurrent changes of one project from two processes (no lost update).

Entries are the size the bank stores (a 896x672 JPEG, a PNG label map, an embedding in the
metadata). Every change rewrites the project's manifest, so its cost grows with the bank.

    .venv/bin/python benchmarks/prompt_state.py [--sizes 10,100,500] [--changes 100] [--keep 20]
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.bank import encode_embedding  # noqa: E402
from backend.store import PromptEntry, PromptStore  # noqa: E402
from tests.backend.redis_process import RedisProcess  # noqa: E402


def payloads(seed: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    image, label_map = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (672, 896, 3), dtype=np.uint8)).save(image, format="JPEG", quality=92)
    labels = np.zeros((672, 896), np.uint8)
    labels[100:400, 200:600] = 1
    Image.fromarray(labels).save(label_map, format="PNG")
    return image.getvalue(), label_map.getvalue()


def entry(task: int, image: bytes, label_map: bytes) -> PromptEntry:
    embedding = encode_embedding(np.random.default_rng(task).random(160, np.float32))
    return PromptEntry(task, task, float(task), {"image": image + task.to_bytes(4, "little")}, {"tag": label_map},
                       meta={"original_sizes": {"image": [1792, 1344]}, "embeddings": {"image": embedding}})


def writer(url: str, who: int, changes: int, keep: int) -> tuple[list[int], float]:
    store = PromptStore(redis.Redis.from_url(url), keep_versions=keep)
    image, label_map = payloads(who)
    store.redis.incr("ready")
    while int(store.redis.get("ready")) < 2:
        time.sleep(0.001)
    started = time.perf_counter()
    versions = [store.put_entry("race", entry(who * 100_000 + n, image, label_map)) for n in range(changes)]
    return versions, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500", help="bank sizes to time (entries)")
    parser.add_argument("--changes", type=int, default=100, help="changes per process in the race")
    parser.add_argument("--keep", type=int, default=20, help="KEEP_VERSIONS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp) / "redis", appendonly=True).start()  # fsync always: the slow case
        try:
            store = PromptStore(redis.Redis.from_url(server.url), keep_versions=args.keep)
            image, label_map = payloads(0)
            print(f"redis-server (AOF, appendfsync always), KEEP_VERSIONS={args.keep}")
            print("entries  change ms (median)  snapshot k=4 ms  history ms  manifest KiB  used MiB")
            filled = 0
            for size in map(int, args.sizes.split(",")):
                while filled < size - 20:
                    store.put_entry("p", entry(filled, image, label_map))
                    filled += 1
                change = []
                while filled < size:
                    started = time.perf_counter()
                    store.put_entry("p", entry(filled, image, label_map))
                    change.append(time.perf_counter() - started)
                    filled += 1
                read = []
                for _ in range(20):
                    started = time.perf_counter()
                    store.snapshot("p", ["tag"], 4)
                    read.append(time.perf_counter() - started)
                started = time.perf_counter()
                store.history("p")
                history = time.perf_counter() - started
                manifest = store.redis.strlen(f"seggpt:p:p:manifest:{store.version('p')}") / 1024
                used = store.redis.info("memory")["used_memory"] / 2**20
                print(f"{size:7d}  {statistics.median(change) * 1e3:17.1f}  {statistics.median(read) * 1e3:15.1f}"
                      f"  {history * 1e3:10.1f}  {manifest:12.0f}  {used:8.0f}")

            with multiprocessing.get_context("spawn").Pool(2) as pool:
                results = pool.starmap(writer, [(server.url, who, args.changes, args.keep) for who in (0, 1)])
            versions = sorted(v for vs, _ in results for v in vs)
            final = store.version("race")
            print(f"race: 2 processes x {args.changes} changes of one project -> final version {final}, "
                  f"{len(set(versions))} distinct versions returned, lost: {2 * args.changes - final}, "
                  f"wall {max(t for _, t in results):.2f} s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()

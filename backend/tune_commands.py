"""The ``tune`` and ``report`` commands of ``seggpt-backend``.

``tune`` queues (or joins) a project's tune job and follows it with a progress bar; its
exit status is 0 when the job finished (promoted or kept) and 1 when it failed.
``report`` prints the pre-label quality per model version and can write JSON and PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from backend.jobs import JobQueue
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.job_commands import follow_job, project_arg
from backend.quality import project_report, report_chart
from backend.settings import Settings
from backend.store import PromptStore
from backend.tuning import loss_chart_key



def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``tune`` and ``report``; each sets ``run(settings, args) -> exit status``."""
    tune = commands.add_parser("tune", help="tune a project's prompt now (promoted only if it labels better)")
    tune.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    tune.add_argument("--label-config", type=Path, help="the project's label config XML (default: read from "
                                                         "Label Studio)")
    tune.add_argument("--inline", action="store_true", help="run here instead of on a worker")
    tune.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    tune.add_argument("--out", type=Path, help="write the job's result.json and loss.png into this folder")
    tune.set_defaults(run=_tune)

    report = commands.add_parser("report", help="pre-label quality per model version, from Label Studio")
    report.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    report.add_argument("--out", type=Path, help="write report.json and report.png into this folder")
    report.set_defaults(run=_report)



def _tune(settings: Settings, args: argparse.Namespace) -> int:
    params = {"trigger": "cli"}
    if args.label_config:
        params["label_config"] = args.label_config.read_text()
    store = PromptStore.from_settings(settings)
    jobs = JobQueue(store)
    record, created = jobs.submit(args.project, "tune", params, inline=args.inline)
    if not created:
        print(f"{record['id']} is already {record['status']} for project {args.project}; following it",
              file=sys.stderr)
    elif args.no_follow:
        print(record["id"])
        return 0
    with tqdm(desc=record["id"], unit="step", total=settings.tune_steps, file=sys.stderr) as bar:
        def show(update: dict) -> None:
            if update.get("total"):
                bar.total, bar.n = update["total"], update.get("done", 0)
            bar.set_postfix_str(str(update.get("message", ""))[:60], refresh=False)
            bar.refresh()

        if created and args.inline:
            record = jobs.run(record["id"], settings, hook=show) or record
        else:
            record = follow_job(jobs, record["id"], show)
    result = record.get("result") or {}
    print(f"{record['id']}: {record['status']}: {record.get('reason') or record.get('message', '')}")
    for name, c in result.get("controls", {}).items():
        if "iou_after" in c:
            print(f"  {name}: held-out mean IoU {c['iou_before']:.3f} -> {c['iou_after']:.3f} "
                  f"({c['train']} train / {c['held_out']} held-out tasks, {c['steps']} steps)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(record, indent=2))
        png = store.redis.get(loss_chart_key(store, record["id"]))
        if png:
            (args.out / "loss.png").write_bytes(png)
    return 0 if record["status"] == "finished" else 1


def _report(settings: Settings, args: argparse.Namespace) -> int:
    if not (settings.label_studio_url and settings.label_studio_api_key):
        print("seggpt-backend: report needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    try:
        with LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key) as client:
            report = project_report(client, int(args.project))
    except (LabelStudioError, ValueError) as exc:
        print(f"seggpt-backend: {exc}", file=sys.stderr)
        return 1
    print(f"project {args.project}: {report['annotated_tasks']} annotated tasks")
    print(f"{'model version':<28} {'tasks':>5} {'mean IoU':>9} {'accepted':>9}")
    for row in report["versions"]:
        share = f"{row['accepted_share']:.1%}" if row["accepted_share"] is not None else "-"
        print(f"{row['model_version']:<28} {row['tasks']:>5} {row['mean_iou']:>9.3f} {share:>9}")
    left_out = report.get("left_out") or {}
    if any(left_out.values()):
        print(f"left out: {left_out.get('after_annotation', 0)} pre-labels made after their annotation was started, "
              f"{left_out.get('undated', 0)} without a readable time")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2))
        (args.out / "report.png").write_bytes(report_chart(report, f"pre-label quality, project {args.project}"))
    return 0

"""``seggpt-backend serve``: run the ML backend that Label Studio connects to (and the other commands)."""
from __future__ import annotations

import argparse
import logging
import os
import signal

# Who started this process, read before the slow imports below: a long-running command arms the
# parent-death signal later and must notice a parent that died in between (see guard.py).
STARTED_BY = os.getppid()

import torch  # noqa: E402
import uvicorn  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.job_commands import add_commands as add_job_commands  # noqa: E402
from backend.pack_commands import add_commands as add_pack_commands  # noqa: E402
from backend.quickstart.guard import arm_parent_death_signal, stop_embedded_redis  # noqa: E402
from backend.quickstart.runner import add_command as add_quickstart_command, quickstart  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.store import STARTED_EMBEDDED, connect  # noqa: E402
from backend.tune_commands import add_commands as add_tune_commands  # noqa: E402
from backend.worker import embedded_worker  # noqa: E402
from seggpt_model import WeightsError  # noqa: E402

LONG_RUNNING = ("serve", "quickstart", "worker")
STOP_WITH_PARENT = "SEGGPT_STOP_WITH_PARENT"  # quickstart sets it for the worker it starts


def without_traceback(record: logging.LogRecord) -> bool:
    """Keep a record's message and its exception's type, drop the traceback: logs carry none above DEBUG.

    Libraries log some failures with ``exc_info`` (RQ when Redis is lost between two jobs, say);
    every process the CLI starts logs through the root handler, so this one filter covers them all.
    """
    if record.exc_info:
        exc = record.exc_info[1]
        record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__})", ()
        record.exc_info, record.exc_text = None, None
    return True


def stops_with_parent(command: str) -> bool:
    """Whether this process arms the parent-death signal (SIGTERM when the process that started it exits).

    quickstart always (it owns Label Studio and everything else it started); serve and worker when
    a make recipe started them (``make run``: MAKELEVEL is set) or a quickstart did. A plain
    ``seggpt-backend serve`` keeps outliving its shell as before (``setsid -f``, ``& disown``), and
    nothing is armed under ``nohup`` (SIGHUP ignored): that asks to outlive the parent.
    """
    if command not in LONG_RUNNING or signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return False
    return command == "quickstart" or bool(os.environ.get("MAKELEVEL")) or os.environ.get(STOP_WITH_PARENT) == "1"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``seggpt-backend`` console script and ``python -m backend``."""
    parser = argparse.ArgumentParser(prog="seggpt-backend",
                                     description="SegGPT ML backend for Label Studio (settings from env vars)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve /health, /setup, /predict, /webhook and /versions")
    serve.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on (default: 9090)")
    add_quickstart_command(commands)
    add_job_commands(commands)
    add_pack_commands(commands)
    add_tune_commands(commands)
    args = parser.parse_args(argv)
    if stops_with_parent(args.command):
        arm_parent_death_signal(STARTED_BY)
    if args.command == "quickstart" and not os.environ.get("LOG_LEVEL", "").strip():
        os.environ["LOG_LEVEL"] = "WARNING"  # keep the ready block in view; LOG_LEVEL=INFO shows more

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        parser.exit(2, f"seggpt-backend: bad configuration: {exc}\n")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.addFilter(without_traceback)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # job processes fork from here and inherit it
    if args.command == "quickstart":
        parser.exit(quickstart(args))
    if args.command != "serve":
        try:
            code = args.run(settings, args)
        finally:  # a short command does not leave behind an embedded redis-server it started
            for client in STARTED_EMBEDDED:
                stop_embedded_redis(client)
        parser.exit(code)
    try:
        app = create_app(settings)
    except WeightsError as exc:
        parser.exit(2, f"seggpt-backend: {exc}\n")
    # the embedded redis-server daemonizes: nothing stops it when this process ends unless we do
    embedded = connect(settings) if not settings.redis_url else None
    try:
        with embedded_worker(settings):  # only with the embedded Redis; REDIS_URL deployments run their own
            uvicorn.run(app, host=args.host, port=args.port, log_level=settings.log_level.lower(), log_config=None)
    finally:
        if embedded is not None:
            stop_embedded_redis(embedded)

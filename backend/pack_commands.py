"""The prompt-state commands of ``seggpt-backend``: export, import, versions, rollback.

They talk to the same Redis as the service (REDIS_URL, else the embedded one under
MODEL_DIR) and read the model's identity off SEGGPT_WEIGHTS without loading it. Each
prints JSON and exits non-zero with a one-line reason when refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import redis

from backend.job_commands import project_arg
from backend.model import weights_fingerprint
from backend.packs import ModelIdentity, export_pack, import_pack
from backend.settings import Settings
from backend.store import PromptStore, UnknownVersion, model_version
from seggpt_model.weights import DEMO_WEIGHTS, read_config, resolve_source

log = logging.getLogger(__name__)
DEMO_PACKS = ("SEGGPT_WEIGHTS=demo (the default when unset): packs are written for and checked against the small "
              "bundled demo model; set SEGGPT_WEIGHTS to the weights your server uses to exchange packs with it")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the subcommands; each sets ``run(settings, args) -> exit status``."""
    export = commands.add_parser("export", help="write a project's prompt state as a prompt pack (zip)")
    export.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    export.add_argument("--out", required=True, type=Path, help="pack file to write")
    export.set_defaults(run=_export)

    load = commands.add_parser("import", help="make a prompt pack a project's prompt state (one new version)")
    load.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    load.add_argument("file", type=Path, help="pack file to read")
    load.set_defaults(run=_import)

    versions = commands.add_parser("versions", help="list a project's kept prompt-state versions, newest first")
    versions.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    versions.set_defaults(run=_versions)

    rollback = commands.add_parser("rollback", help="make a new version equal to a kept one")
    rollback.add_argument("--project", required=True, type=project_arg, help="Label Studio project id")
    rollback.add_argument("--version", required=True, type=int, help="the version to restore")
    rollback.set_defaults(run=_rollback)


def _export(settings: Settings, args: argparse.Namespace) -> int:
    def run() -> dict:
        model = _identity(settings)
        data, version = export_pack(PromptStore.from_settings(settings), args.project, model)
        partial = args.out.with_name(args.out.name + ".part")  # never a half-written pack under the name
        partial.write_bytes(data)
        os.replace(partial, args.out)
        return {"project": args.project, "version": version, "model_version": model_version(model.fingerprint, version),
                "file": str(args.out), "bytes": len(data)}

    return _answer(run)


def _import(settings: Settings, args: argparse.Namespace) -> int:
    def run() -> dict:
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {args.file}: {exc.strerror}") from None
        return {"project": args.project, **import_pack(PromptStore.from_settings(settings), args.project, data,
                                                       _identity(settings))}

    return _answer(run)


def _versions(settings: Settings, args: argparse.Namespace) -> int:
    return _answer(lambda: {"project": args.project, "versions": PromptStore.from_settings(settings).history(
        args.project)})


def _rollback(settings: Settings, args: argparse.Namespace) -> int:
    def run() -> dict:
        store = PromptStore.from_settings(settings)
        version = store.rollback(args.project, args.version)
        return {"project": args.project, "status": "rolled_back" if version else "unchanged",
                "version": version or store.version(args.project)}

    return _answer(run)


def _identity(settings: Settings) -> ModelIdentity:
    """The configured model's identity; a pack is tied to it, so the demo default is announced."""
    if resolve_source(settings.seggpt_weights) == DEMO_WEIGHTS:
        log.warning(DEMO_PACKS)
    return ModelIdentity(weights_fingerprint(settings.seggpt_weights), read_config(settings.seggpt_weights).to_dict())


def _answer(run) -> int:
    """Print ``run()``'s JSON; a refusal is one line on stderr and exit status 1."""
    try:
        print(json.dumps(run(), indent=1))
        return 0
    except (ValueError, UnknownVersion) as exc:  # WeightsError included
        print(f"seggpt-backend: {exc}", file=sys.stderr)
    except redis.RedisError as exc:
        print(f"seggpt-backend: the prompt store (Redis) is unavailable ({type(exc).__name__})", file=sys.stderr)
    return 1


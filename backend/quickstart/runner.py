"""``seggpt-backend quickstart``: Label Studio, the backend and a pre-labelled demo project, on one machine.

One process holds it all: it starts Label Studio (a child in its own process group), serves the
backend with uvicorn in a thread (the embedded Redis and job worker as ``serve`` runs them), sets
up the demo project once, pre-labels it, prints one block saying where to go, and on Ctrl-C,
SIGTERM or SIGHUP stops everything it started.

When pre-labelling fails on the run that created the demo project, the command stops with the
reason: the demo is known-good, so that is a fault. On later runs the project is the user's (they
may have deleted annotations or changed the config), so a failure there is printed in the ready
block and the services stay up, so that it can be fixed in Label Studio.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Callable

import httpx

from backend.quickstart import demo
from backend.quickstart.guard import stop_embedded_redis
from backend.quickstart.labelstudio import (Api, LabelStudioProcess, create_token, ensure_installed,
                                            label_studio_env, whoami)
from backend.quickstart.state import (InstanceLock, Layout, Login, QuickstartError, bind_listener, check_port_free,
                                      check_state, parse_port, write_login)

log = logging.getLogger(__name__)

ADMIN_EMAIL = "admin@localhost"
PROMPTS_TIMEOUT_S = 120.0
PRELABEL_TIMEOUT_S = 1800.0  # the demo model takes seconds; SegGPT ViT-L on a CPU, minutes
READY_BANNER = "SegGPT quickstart is ready"
LOCAL_HOSTS = {"", "0.0.0.0", "::", "127.0.0.1", "localhost", "::1"}


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """The first stop signal interrupts whatever the main thread does; later ones are ignored, so
    that the shutdown they asked for is not itself cut short (``make`` forwards SIGTERM, and the
    parent-death signal follows when make exits)."""

    STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._stopping = False
        # under nohup SIGHUP stays ignored: closing the terminal is not a stop request then
        self._watched = [s for s in self.STOP if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)]

    def install(self) -> None:
        for sig in self._watched:
            signal.signal(sig, self._handle)

    def quiet(self) -> None:
        """From now on (the shutdown), signals change nothing."""
        self._stopping = True

    def _handle(self, signum: int, frame: object) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.received = signum
        raise Interrupted(signum)


def say(message: str) -> None:
    print(f"quickstart: {message}", flush=True)


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quickstart", help="run Label Studio, this backend and a pre-labelled demo project on this machine",
        description="Install and start Label Studio 1.23.2 (its own virtualenv), serve the backend, create a demo "
                    "project once and pre-label it; Ctrl-C stops everything. State lives under "
                    "MODEL_DIR/label-studio (login.json holds the generated login).")
    parser.add_argument("--host", default=None, help="backend interface (default: $HOST, else 127.0.0.1)")
    parser.add_argument("--port", default=None, help="backend port (default: $PORT, else 9090)")
    parser.add_argument("--ls-port", default=None, help="Label Studio port (default: $LS_PORT, else 8080)")
    parser.set_defaults(run=None)


def quickstart(args: argparse.Namespace) -> int:
    """The command; returns the exit status (0 after a requested stop, 1 with a one-line reason)."""
    signals = Signals()
    signals.install()
    try:
        return _run(args, signals)
    except QuickstartError as exc:
        print(f"seggpt-backend quickstart: {exc}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as stop:
        say(f"stopped ({stop}); everything it started is down")
        return 0


def _run(args: argparse.Namespace, signals: Signals) -> int:
    started = time.monotonic()
    env = dict(os.environ)
    model_dir = Path(env.get("MODEL_DIR", "").strip() or "./model_dir").absolute()
    layout = Layout.under(model_dir)
    ls_port = parse_port(args.ls_port if args.ls_port is not None else env.get("LS_PORT"), "LS_PORT", 8080)
    port = parse_port(args.port if args.port is not None else env.get("PORT"), "PORT", 9090)
    host = (args.host or env.get("HOST", "").strip() or "127.0.0.1").strip("[]")
    if ls_port == port:
        raise QuickstartError(f"LS_PORT and PORT are both {port}: Label Studio and the backend need a port each")
    if env.get("LABEL_STUDIO_URL", "").strip():
        say("LABEL_STUDIO_URL is set, but quickstart runs its own Label Studio and ignores it "
            "(`seggpt-backend serve` serves the one it names)")
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.root.chmod(0o700)  # Label Studio's database and secret key, and login.json, live here
    except OSError as exc:
        raise QuickstartError(f"cannot use {layout.root} ({exc.strerror or exc}); check MODEL_DIR") from None

    stack = ExitStack()
    try:
        lock = InstanceLock(layout.lock_file)
        lock.acquire()
        stack.callback(lock.release)
        saved = check_state(layout)
        listener = bind_listener(host, port, "PORT")  # held from now on: the backend serves on it
        stack.callback(listener.close)
        check_port_free(ls_port, "LS_PORT")
        venv = ensure_installed(env, layout.install_log, say)

        ls_url = f"http://127.0.0.1:{ls_port}"
        login = replace(saved, url=ls_url) if saved else Login(url=ls_url, email=ADMIN_EMAIL,
                                                               password=secrets.token_urlsafe(18))
        write_login(layout.login_file, login)  # before Label Studio sees the password: it is never lost
        cold = not layout.database.exists()
        check_port_free(ls_port, "LS_PORT")  # once more: installing took a while
        ls = LabelStudioProcess(venv, layout.data_dir, ls_port, layout.ls_log,
                                label_studio_env(env, layout.data_dir, ls_url, login.email, login.password))
        say(f"starting Label Studio on {ls_url}" + (" (first start: it creates its database, 30-60 s)" if cold else ""))
        ls.start()
        stack.callback(ls.stop)
        ls.wait_ready(timeout=600 if cold else 180, say=say)
        login = _with_token(login, ls, ls_port, layout)

        settings, basic_auth = _backend_settings(login)
        backend_url = _reachable_url(host, port)
        backend = _start_backend(settings, listener, stack, signals)
        stack.callback(ls.terminate)  # runs first on the way out: Label Studio stops while the rest does
        say(f"backend serving on {backend_url} (SEGGPT_WEIGHTS={settings.seggpt_weights})")

        with Api(ls_url, login.token) as api, httpx.Client(base_url=backend_url, timeout=30,
                                                            auth=basic_auth) as own:
            project, created = _project(api, login.project_id)
            demo.connect_backend(api, project, backend_url, basic_auth, login.backend_url)
            login = replace(login, project_id=project, backend_url=backend_url)
            write_login(layout.login_file, login)
            note = _prelabel(api, own, project, strict=created)
        _ready_block(login, layout, time.monotonic() - started, settings.seggpt_weights, note)
        while True:  # serve until a signal arrives (it raises Interrupted here)
            if ls.proc.poll() is not None:
                raise QuickstartError(f"Label Studio exited with status {ls.proc.returncode}: {ls.log_reason()}; "
                                      f"see {layout.ls_log}")
            if not backend.is_alive():
                raise QuickstartError("the backend stopped unexpectedly; see the log above")
            time.sleep(0.5)
    finally:
        signals.quiet()
        stack.close()


def _with_token(login: Login, ls: LabelStudioProcess, ls_port: int, layout: Layout) -> Login:
    """A working personal access token of our superuser (saved), and proof that this is our Label Studio."""
    email = whoami(ls.url, login.token) if login.token else None
    if login.token and email is None:
        say("the saved access token was refused (revoked?); making a new one")
    if email is None:
        login = replace(login, token=create_token(ls.url, login.email, login.password))
        write_login(layout.login_file, login)  # at once: Label Studio gives a user one token only
        email = whoami(ls.url, login.token)
    if email != login.email or ls.proc.poll() is not None:
        raise QuickstartError(f"the Label Studio answering on LS_PORT={ls_port} is not the one this command "
                              f"started; stop whatever else uses port {ls_port}")
    return login


def _backend_settings(login: Login):
    """Settings from the environment plus the local Label Studio; the worker process inherits them."""
    from backend.settings import Settings

    os.environ["LABEL_STUDIO_URL"] = login.url
    os.environ["LABEL_STUDIO_API_KEY"] = login.token
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as exc:
        raise QuickstartError(f"bad configuration: {exc}") from None
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    return settings, auth


def _reachable_url(host: str, port: int) -> str:
    """How Label Studio (on this machine) reaches the backend."""
    if host in LOCAL_HOSTS:
        return f"http://127.0.0.1:{port}"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _BackendThread:
    """uvicorn in a thread (signals stay with the main thread), on the socket bound up front."""

    def __init__(self, app, listener: socket.socket, log_level: str) -> None:
        import uvicorn

        config = uvicorn.Config(app, log_level=log_level.lower(), log_config=None, timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]},
                                       name="backend-server", daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise QuickstartError("the backend did not start; see the log above")
            time.sleep(0.05)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(8)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(3)


def _start_backend(settings, listener: socket.socket, stack: ExitStack, signals: Signals) -> _BackendThread:
    from backend.app import create_app
    from backend.store import connect
    from backend.worker import embedded_worker
    from seggpt_model import WeightsError

    if not settings.redis_url:  # the embedded Redis daemonizes: stop it ourselves, after everything using it
        stack.callback(stop_embedded_redis, connect(settings))
    try:
        app = create_app(settings)
    except WeightsError as exc:
        raise QuickstartError(str(exc)) from None
    # The worker inherits an ignored SIGINT: Ctrl-C in the terminal (the whole group) would otherwise
    # break its start-up imports with a traceback; it is stopped in order below, and RQ takes SIGINT
    # over once it runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["SEGGPT_STOP_WITH_PARENT"] = "1"  # the worker dies with this process (backend.cli)
    stack.enter_context(embedded_worker(settings))
    signals.install()  # back to ours; the worker block also put its own SIGTERM handler in
    server = _BackendThread(app, listener, settings.log_level)
    stack.callback(server.stop)
    server.start()
    return server


def _project(api: Api, saved: int | None) -> tuple[int, bool]:
    """The demo project: the saved one when Label Studio still has it, else a new one."""
    if saved is not None:
        if demo.project_exists(api, saved):
            say(f"reusing the demo project {saved}")
            return saved, False
        say(f"the demo project {saved} is gone from Label Studio; creating a new one")
    return demo.create_project(api, say), True


def _prelabel(api: Api, own: httpx.Client, project: int, strict: bool) -> str:
    """Wait for the annotations to become prompts, pre-label the rest and check it in Label Studio.

    Returns a note for the ready block ("" when all is well); raises QuickstartError when
    ``strict``, else turns a failure into the note.
    """
    annotated, unlabelled = demo.task_counts(api, project)
    if not annotated:
        return "the project has no annotations: annotate a task or two, then press Retrieve predictions"
    try:
        _wait_for_prompts(own, project, need=len(annotated) if strict else 1)
        version = _backend_json(own, "GET", f"/projects/{project}/versions")["model_version"]
        missing = demo.unpredicted(api, unlabelled, version)  # a restart usually finds them all done
        if missing:
            version = _run_prelabel(own, project)
            missing = demo.unpredicted(api, unlabelled, version)
        if missing:
            raise QuickstartError(f"{len(missing)} of {len(unlabelled)} unlabelled tasks hold no pre-label of "
                                  f"{version} with any region (tasks {', '.join(map(str, missing[:10]))})")
    except QuickstartError as exc:
        if strict:
            raise
        return f"pre-labelling did not complete: {exc}"
    say(f"{len(unlabelled)} unlabelled tasks hold pre-labels of {version}")
    return ""


def _backend_json(own: httpx.Client, method: str, path: str, **kwargs) -> dict:
    try:
        response = own.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise QuickstartError(f"backend: {method} {path} failed ({type(exc).__name__})") from None
    if response.status_code >= 400:
        raise QuickstartError(f"backend: {method} {path} answered HTTP {response.status_code}: "
                              f"{' '.join(response.text.split())[:200]}")
    return response.json()


def _wait_for_prompts(own: httpx.Client, project: int, need: int, timeout: float = PROMPTS_TIMEOUT_S) -> None:
    say("waiting for the backend to read the annotations as prompts")
    deadline = time.monotonic() + timeout
    path = f"/projects/{project}/versions"
    while True:
        history = _backend_json(own, "GET", path).get("versions") or []
        entries = int(history[0].get("entries", 0)) if history else 0
        if entries >= need:
            return
        if time.monotonic() > deadline:
            problems = _backend_json(own, "GET", f"/projects/{project}/problems").get("problems") or []
            why = f": {problems[-1]['reason']}" if problems else "; see the backend's warnings above"
            raise QuickstartError(f"the backend did not turn the project's annotations into prompts within "
                                  f"{timeout:.0f} s ({entries} of {need}){why}")
        time.sleep(0.5)


def _run_prelabel(own: httpx.Client, project: int, timeout: float = PRELABEL_TIMEOUT_S) -> str:
    """Run the backend's pre-labelling job to the end; returns the model_version it predicted with."""
    job = _backend_json(own, "POST", f"/projects/{project}/prelabel", json={})
    deadline, shown = time.monotonic() + timeout, None
    while job.get("status") in ("queued", "running"):
        message = job.get("message")
        if message and message != shown and job.get("status") == "running":
            say(f"  pre-labelling: {message}")
            shown = message
        if time.monotonic() > deadline:
            raise QuickstartError(f"pre-labelling job {job.get('id')} did not finish within {timeout:.0f} s")
        time.sleep(0.5)
        job = _backend_json(own, "GET", f"/jobs/{job['id']}")
    if job.get("status") != "finished":
        raise QuickstartError(f"pre-labelling failed: {job.get('reason') or job.get('status')}")
    result = job.get("result") or {}
    version = result.get("model_version")
    if not version:
        version = _backend_json(own, "GET", f"/projects/{project}/versions")["model_version"]
    return version


def _ready_block(login: Login, layout: Layout, elapsed: float, weights: str | None, note: str) -> None:
    url = f"{login.url}/projects/{login.project_id}/data"
    model = "the small demo model" if weights == "demo" else weights
    try:
        saved = layout.login_file.relative_to(Path.cwd())
    except ValueError:
        saved = layout.login_file
    lines = [
        f"{READY_BANNER} ({elapsed:.0f} s)",
        "",
        f"  Label Studio  {url}",
        f"  Log in        {login.email}   password: {login.password}",
        f"  Backend       {login.backend_url}   ({model})",
        "",
        "  Open the link and log in. The unlabelled tasks carry SegGPT pre-labels; open one to see its",
        "  regions, fix it and submit, or annotate another task: each annotation becomes a prompt. Then",
        "  select tasks and choose Actions > Retrieve Predictions to pre-label them again with the new prompts.",
        "",
        f"  Login and token saved in {saved} (mode 600). Ctrl-C stops everything.",
    ]
    if note:
        lines[1:1] = ["", f"  Note: {note}"]
    rule = "=" * 100
    print("\n".join(["", rule, *lines, rule, ""]), flush=True)

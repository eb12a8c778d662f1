"""Label Studio 1.23.2 for the quickstart: find or install it, run it, log in, call its API.

Label Studio pins its own Django/numpy/pandas stack, so it lives in a virtualenv of its own
(``LS_VENV``; from a checkout ``<repo>/.ls-venv``, made by ``scripts/install_label_studio.sh``),
never in the backend's environment. It runs as a child process in its own process group,
stopped with the group, and it dies with this process even when that is killed outright.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.quickstart.state import QuickstartError

LS_VERSION = "1.23.2"
INSTALL_SCRIPT = "scripts/install_label_studio.sh"
STOP_WAIT_S = 8.0
# Bare names Label Studio reads as fallbacks for its own settings (USERNAME, PORT, ...), and this
# backend's own settings, which are none of its business.
SCRUBBED_ENV = ("USERNAME", "PASSWORD", "USER_TOKEN", "HOST", "PORT", "LOG_LEVEL", "DEBUG",
                "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS")
# Runs first in the child: arm the parent-death signal (it survives exec), then become Label Studio.
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 15, 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit('label-studio: the quickstart that started it is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

Say = Callable[[str], None]


def checkout_root() -> Path | None:
    """The repository this package runs from, when it runs from a checkout (not an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / INSTALL_SCRIPT).is_file() else None


def default_venv(env: Mapping[str, str]) -> Path | None:
    if env.get("LS_VENV", "").strip():
        return Path(env["LS_VENV"].strip()).expanduser().absolute()
    root = checkout_root()
    return root / ".ls-venv" if root else None


def installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "label-studio").is_file() or not python.is_file():
        return None
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def ensure_installed(env: Mapping[str, str], log_path: Path, say: Say) -> Path:
    """The virtualenv holding Label Studio 1.23.2, installing it first when run from a checkout."""
    venv = default_venv(env)
    found = installed_version(venv) if venv else None
    if found == LS_VERSION:
        return venv
    root = checkout_root()
    if found and env.get("LS_VENV", "").strip():  # someone else's Label Studio: not ours to change
        raise QuickstartError(f"LS_VENV={venv} holds label-studio {found}, quickstart needs {LS_VERSION}: run "
                              f"`{venv}/bin/pip install label-studio=={LS_VERSION}`, or point LS_VENV elsewhere")
    if root is None:  # an installed wheel: the install script is not part of it
        pip = f"python3 -m venv {venv or '~/.ls-venv'} && {venv or '~/.ls-venv'}/bin/pip install label-studio=={LS_VERSION}"
        where = f"{venv} has label-studio {found}" if found else (
            f"{venv} holds no Label Studio" if venv else "no Label Studio virtualenv is set (LS_VENV)")
        raise QuickstartError(f"Label Studio {LS_VERSION} is needed and {where}: run `{pip}` and start again"
                              f"{'' if venv else ' with LS_VENV=~/.ls-venv'}")
    say(f"installing Label Studio {LS_VERSION} into {venv} (its own virtualenv; about a minute)")
    _run_install(root, venv, env, log_path, say)
    found = installed_version(venv)
    if found != LS_VERSION:
        raise QuickstartError(f"installing Label Studio left {venv} with label-studio {found or 'missing'}; "
                              f"see {log_path}")
    return venv


def _run_install(root: Path, venv: Path, env: Mapping[str, str], log_path: Path, say: Say) -> None:
    cmd = ["bash", str(root / INSTALL_SCRIPT), "--venv-only"]
    started = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env={**env, "LS_VENV": str(venv)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        last_line, last_said = "", time.monotonic()
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    if proc.poll() is not None:
                        break  # it exited; a straggler still holding its output is stopped below
                    if time.monotonic() - last_said >= 15:
                        say(f"  still installing Label Studio ({time.monotonic() - started:.0f} s)")
                        last_said = time.monotonic()
                    continue
                if line is None:
                    break
                log.write(line)
                text = line.decode(errors="replace").strip()
                if text:
                    last_line = text
                    if text.startswith("[install_label_studio]"):
                        say("  " + text.removeprefix("[install_label_studio]").strip())
                        last_said = time.monotonic()
            rc = proc.wait()
        finally:
            _kill_group(proc, signal.SIGTERM)  # interrupted, or something it started is still there
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    if rc != 0:
        raise QuickstartError(f"installing Label Studio {LS_VERSION} failed ({INSTALL_SCRIPT} exited with {rc}: "
                              f"{last_line[:200] or 'no output'}); see {log_path}")


def _pump(stream, lines: "queue.Queue[bytes | None]") -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def label_studio_env(base: Mapping[str, str], data_dir: Path, url: str, email: str, password: str) -> dict[str, str]:
    """The environment Label Studio runs in: a local backend allowed, nothing sent out, no sign-ups."""
    env = {k: v for k, v in base.items() if k not in SCRUBBED_ENV}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_HOST": url,
        # the superuser: created on the first start, "already exists" afterwards
        "LABEL_STUDIO_USERNAME": email,
        "LABEL_STUDIO_PASSWORD": password,
        # 1.23.1+ refuses ML backends and webhooks on 127.0.0.1 unless both are off
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    })
    return env


class LabelStudioProcess:
    """``label-studio start`` on 127.0.0.1:port in its own process group, output to a log file."""

    def __init__(self, venv: Path, data_dir: Path, port: int, log_path: Path, env: Mapping[str, str]) -> None:
        self.venv, self.data_dir, self.port, self.log_path = venv, data_dir, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._env = dict(env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", str(self.data_dir), "--log-level", "WARNING"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *cmd], env=self._env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def wait_ready(self, timeout: float, say: Say, slow_note: str = "") -> None:
        """Until ``/health`` answers on our port; QuickstartError when the process exits or time runs out."""
        started = last_said = time.monotonic()
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise QuickstartError(f"Label Studio exited with status {self.proc.returncode if self.proc else '?'} "
                                      f"before it was ready: {self.log_reason()}; see {self.log_path}")
            if f"Port {self.port} is in use" in self._this_start():  # it moved to another port
                raise QuickstartError(f"LS_PORT={self.port} is taken: something took port {self.port} while "
                                      "Label Studio started; stop it or choose another LS_PORT")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            waited = time.monotonic() - started
            if waited > timeout:
                raise QuickstartError(f"Label Studio did not answer on {self.url} within {timeout:.0f} s; "
                                      f"see {self.log_path}")
            if time.monotonic() - last_said >= 15:
                say(f"  still starting Label Studio ({waited:.0f} s{slow_note})")
                last_said = time.monotonic()
            time.sleep(0.5)

    def log_reason(self) -> str:
        """The last telling line of Label Studio's log (an exception, an error), for one-line messages."""
        lines = [ln.strip() for ln in self._this_start().splitlines() if ln.strip()]
        for line in reversed(lines):  # an exception's last line, or an error message
            if any(word in line for word in ("Error", "error", "Exception", "refused")) and "[INFO]" not in line:
                return line[:200]
        return lines[-1][:200] if lines else "no output"

    def _this_start(self) -> str:
        """What Label Studio logged since this start."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text.rsplit("\n=== ", 1)[-1].partition("\n")[2]

    def terminate(self) -> None:
        """SIGTERM to the whole group (Label Studio may have children); does not wait."""
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(self.proc, signal.SIGKILL)  # whatever of the group is left, the leader included
        self.proc.wait()


def create_token(url: str, email: str, password: str) -> str:
    """Log in through the form and create a personal access token.

    Label Studio 1.23 turns legacy tokens off in new organizations, so the API is used with a PAT:
    a JWT refresh token exchanged for 5-minute access tokens (``LabelStudioClient`` does that).
    """
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            client.get("/user/login/").raise_for_status()
            csrf = client.cookies.get("csrftoken")
            login = client.post("/user/login/", headers={"Referer": f"{url}/user/login/"},
                                data={"email": email, "password": password, "csrfmiddlewaretoken": csrf or ""})
            if login.status_code != 302:
                raise QuickstartError(f"logging in to Label Studio as {email} failed (HTTP {login.status_code}): "
                                      "the password in login.json does not match its database")
            response = client.post("/api/token/", headers={"X-CSRFToken": client.cookies.get("csrftoken") or ""})
            if response.status_code == 409:  # one per user: made by a start cut short before saving it
                raise QuickstartError(f"Label Studio already holds an access token for {email} that login.json "
                                      "does not have; revoke it in Label Studio (Account & Settings > Personal "
                                      "Access Token) and start again")
            if response.status_code != 201:
                raise QuickstartError(f"Label Studio refused to create an access token (HTTP {response.status_code})")
            return response.json()["token"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise QuickstartError(f"logging in to Label Studio at {url} failed ({type(exc).__name__})") from None


def whoami(url: str, token: str) -> str | None:
    """The email of the token's user; None when this Label Studio refuses the token."""
    with LabelStudioClient(url, token) as client:
        try:
            return client.get_json("/api/current-user/whoami").get("email")
        except LabelStudioError as exc:
            if exc.status in (401, 403):
                return None
            raise QuickstartError(f"Label Studio at {url} did not answer who its token belongs to: {exc}") from None


class Api:
    """The Label Studio REST calls the quickstart makes, with the PAT; errors are QuickstartError."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url = url
        self._auth = LabelStudioClient(url, token)
        self._http = httpx.Client(base_url=url, timeout=timeout)

    def close(self) -> None:
        self._http.close()
        self._auth.close()

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 204), **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, headers=self._auth.auth_headers(), **kwargs)
        except (httpx.HTTPError, LabelStudioError) as exc:
            raise QuickstartError(f"Label Studio: {method} {path} failed ({exc if isinstance(exc, LabelStudioError) else type(exc).__name__})") from None
        if response.status_code not in ok:
            raise QuickstartError(f"Label Studio: {method} {path} answered HTTP {response.status_code}: "
                                  f"{' '.join(response.text.split())[:200]}")
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise QuickstartError(f"Label Studio: {method} {path} answered with non-JSON content") from None

    def status(self, method: str, path: str) -> int:
        try:
            return self._http.request(method, path, headers=self._auth.auth_headers()).status_code
        except (httpx.HTTPError, LabelStudioError) as exc:
            raise QuickstartError(f"Label Studio: {method} {path} failed ({type(exc).__name__})") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params or None)

    def tasks(self, project: int) -> list[dict]:
        """Every task of ``project``, light view (data and the annotation counters)."""
        out: list[dict] = []
        page = 1
        while True:
            body = self.call("GET", "/api/tasks/", ok=(200, 404),
                             params={"project": project, "page": page, "page_size": 100})
            tasks = (body or {}).get("tasks", []) if isinstance(body, dict) else []
            out += tasks
            if not tasks or len(out) >= body.get("total", 0):
                return out
            page += 1

"""What ``seggpt-backend quickstart`` keeps on disk, and the checks made before anything starts.

Everything lives under ``MODEL_DIR/label-studio``:

- ``data/``: Label Studio's data dir (its SQLite database ``label_studio.sqlite3``, uploads, secret key);
- ``login.json`` (mode 0600): how to log in and what was set up — ``url``, ``email``, ``password``,
  ``token`` (a personal access token), ``project_id`` (the demo project), ``backend_url``. It is
  written before Label Studio first starts, with ``token`` and ``project_id`` null, so the generated
  password is never lost; a null means that step is still to be done;
- ``quickstart.lock``: held (``flock``) by the running quickstart, holding its pid;
- ``label-studio.log``, ``install.log``: Label Studio's own output and the install's.

A damaged state is refused with the file named and the way out, never papered over with a new
user or project: a fresh superuser on top of an old database would lock the user out of it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

LOGIN_KEYS = ("url", "email", "password", "token", "project_id", "backend_url")
DB_NAME = "label_studio.sqlite3"


class QuickstartError(RuntimeError):
    """A condition the user must act on; the message is one line that says what and how."""


@dataclass(frozen=True)
class Login:
    url: str
    email: str
    password: str
    token: str | None = None
    project_id: int | None = None
    backend_url: str | None = None


@dataclass(frozen=True)
class Layout:
    """The paths of one MODEL_DIR's quickstart state."""

    root: Path

    @classmethod
    def under(cls, model_dir: Path) -> "Layout":
        return cls(Path(model_dir).absolute() / "label-studio")

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def database(self) -> Path:
        return self.data_dir / DB_NAME

    @property
    def login_file(self) -> Path:
        return self.root / "login.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "quickstart.lock"

    @property
    def ls_log(self) -> Path:
        return self.root / "label-studio.log"

    @property
    def install_log(self) -> Path:
        return self.root / "install.log"

    def start_over(self) -> str:
        return f"delete {self.root} to start over (this deletes the demo project and everything labelled in it)"


def read_login(path: Path) -> Login | None:
    """The saved login, None when there is none yet; QuickstartError when it is damaged."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise QuickstartError(f"{path} cannot be read ({_reason(exc)}); {_start_over(path)}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise QuickstartError(f"{path} is damaged (not JSON); {_start_over(path)}") from None
    if not isinstance(data, dict):
        raise QuickstartError(f"{path} is damaged (not a JSON object); {_start_over(path)}")
    missing = [key for key in LOGIN_KEYS if key not in data]
    if missing:
        raise QuickstartError(f"{path} is damaged (missing {', '.join(missing)}); {_start_over(path)}")
    problems = [key for key in ("url", "email", "password") if not isinstance(data[key], str) or not data[key]]
    problems += [key for key in ("token", "backend_url") if data[key] is not None and not isinstance(data[key], str)]
    project = data["project_id"]
    if project is not None and (isinstance(project, bool) or not isinstance(project, int) or project < 1):
        problems.append("project_id")
    if problems:
        raise QuickstartError(f"{path} is damaged (bad {', '.join(problems)}); {_start_over(path)}")
    return Login(**{key: data[key] for key in LOGIN_KEYS})


def write_login(path: Path, login: Login) -> None:
    """Replace ``path`` atomically with a file only its owner can read, at no moment readable by others."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only take bits away; this also restores the owner's
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            json.dump(asdict(login), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def check_state(layout: Layout) -> Login | None:
    """The saved login when MODEL_DIR's state is whole, None for a fresh start; else QuickstartError.

    - no login.json: the data dir must be absent or empty (otherwise its superuser's password is
      unknown);
    - a login.json without a token (the first start did not finish): carried on from where it stopped;
    - a finished one: the database must be a readable Label Studio database holding its user.
    """
    login = read_login(layout.login_file)
    data = layout.data_dir
    if login is None:
        if data.exists() and any(data.iterdir()):
            raise QuickstartError(f"{data} exists but {layout.login_file} is missing, so the password of its "
                                  f"Label Studio user is unknown; {layout.start_over()}")
        return None
    if login.token is None:
        return login
    db = layout.database
    if not db.is_file():
        raise QuickstartError(f"Label Studio's database {db} is missing although {layout.login_file} says it "
                              f"was set up; restore it, or {layout.start_over()}")
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT 1 FROM htx_user WHERE email = ?", (login.email,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise QuickstartError(f"Label Studio's database {db} is damaged ({_reason(exc)}); restore it, or "
                              f"{layout.start_over()}") from None
    if not found:
        raise QuickstartError(f"Label Studio's database {db} has no user {login.email}, so it does not belong "
                              f"with {layout.login_file}; {layout.start_over()}")
    return login


class InstanceLock:
    """One quickstart per MODEL_DIR: an exclusive ``flock`` on a file that names the holder's pid."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise QuickstartError(f"cannot lock {self.path} ({_reason(exc)})") from None
            raise QuickstartError(f"another quickstart is already running on {self.path.parent.parent} "
                                  f"(pid {holder}); stop it first, or use another MODEL_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "InstanceLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def parse_port(value: str | int | None, name: str, default: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise QuickstartError(f"{name} must be a port number, got {str(value)[:40]!r}") from None
    if not 1 <= port <= 65535:
        raise QuickstartError(f"{name} must be a port number between 1 and 65535, got {port}")
    return port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port`` (how Label Studio decides to move on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def check_port_free(port: int, name: str, host: str = "127.0.0.1") -> None:
    """Refuse a port that is taken: Label Studio would silently move to the next one."""
    taken = port_in_use(port, host)
    if not taken:
        try:
            bind_listener(host, port, name).close()
        except QuickstartError:
            taken = True
    if taken:
        raise QuickstartError(f"{name}={port} is taken: something already listens on port {port}; "
                              f"stop it or choose another {name}")


def bind_listener(host: str, port: int, name: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (handed to the server, so no one takes the port meanwhile)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise QuickstartError(f"cannot listen on {host}:{port} ({exc.strerror}); check HOST") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and Django do
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise QuickstartError(f"{name}={port} is taken: something already listens on {host}:{port}; "
                                  f"stop it or choose another {name}") from None
        raise QuickstartError(f"cannot listen on {host}:{port} ({_reason(exc)}); check HOST and {name}") from None
    sock.set_inheritable(False)
    return sock


def _start_over(path: Path) -> str:
    return Layout(Path(path).parent).start_over()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__

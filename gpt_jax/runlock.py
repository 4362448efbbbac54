"""One training run per output directory: an advisory lock on ``<out_dir>/.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when its process dies, however
it dies. The file also holds who took it (pid, host, time): a second run that finds the lock held
names the holder, and a run that finds the file filled in but the lock free knows the last holder
stopped without cleaning up (killed, out of memory, preempted) and takes it over with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import warnings
from pathlib import Path

from gpt_jax.errors import CheckpointError, RunLockedError

LOCK_NAME = ".lock"


def prepare_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` created if needed and checked writable, before a run takes anything there.

    Raises CheckpointError (one line, saying what to change) for an ``out_dir`` that is a file, lies
    under a file, is a dangling symbolic link, is too long for the file system, or cannot be created or
    written.
    """
    path = Path(os.path.expandvars(str(out_dir))).expanduser()
    try:
        _check_out_dir(path)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise CheckpointError(f"out_dir is too long for the file system ({len(str(path))} characters, or "
                                  "a folder name over its limit); choose a shorter --out_dir") from None
        raise CheckpointError(f"cannot use out_dir {path} ({e.strerror}); choose another --out_dir") from None
    return path


def _check_out_dir(path: Path) -> None:
    advice = "choose another --out_dir"
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"out_dir {path} is a symbolic link to {os.readlink(path)}, which does not "
                              f"exist; create the target or {advice}")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"out_dir {path} is a file, not a directory; {advice}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"out_dir {path} lies under {parent}, which is a file; {advice}")
            break
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointError(f"out_dir {path} is not writable (permission denied); make it writable or "
                              f"{advice}")


class RunLock:
    """``with RunLock(out_dir):`` — held for the whole run, released on exit or death."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot open the run lock {self.path} ({e.strerror}); make "
                                  f"{self.path.parent} writable or choose another --out_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another training run ({holder}); wait "
                                 "for it to finish, stop it, or choose another --out_dir") from None
        previous = _read(fd)
        if previous:
            warnings.warn(f"taking over {self.path}: its last holder ({_describe(previous)}) stopped "
                          "without releasing it", stacklevel=2)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def active_holder(out_dir: str | Path) -> dict | None:
    """Who holds ``out_dir``'s run lock, as {"pid", "host", "started"}, or None if nobody does.

    Read without taking the lock, so a reader never gets in a starting run's way: the holder recorded
    in the lock file counts while its process lives (on another host it is assumed alive). A run that
    ended cleanly leaves the file empty.
    """
    try:
        holder = json.loads((Path(out_dir) / LOCK_NAME).read_bytes() or b"{}")
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or "pid" not in holder:
        return None
    if holder.get("host") != socket.gethostname():
        return holder
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return holder


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "unknown holder"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"

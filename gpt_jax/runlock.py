"""One training run per output directory: an advisory lock on ``<out_dir>/.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when its process dies, however
it dies. The file also holds who took it (pid, host, time): a second run that finds the lock held
names the holder, and a run that finds the file filled in but the lock free knows the last holder
stopped without cleaning up (killed, out of memory, preempted) and takes it over with a warning.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import warnings
from pathlib import Path

from gpt_jax.errors import RunLockedError

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(out_dir):`` — held for the whole run, released on exit or death."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "unknown holder"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"

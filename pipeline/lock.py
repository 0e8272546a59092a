"""One job at a time on a run's store: an exclusive lock on a lock file.

The lock is `fcntl.flock` on `<folder>/.lock`, which the kernel releases when its process ends however it ends
(kill -9 included), so a lock can never outlive its job. The file also records who holds it (pid, host, command,
start); a job that finds such a record left behind by a holder that is gone says so and takes over. The file is
never deleted: deleting a lock file lets two jobs lock two different files. flock needs a local filesystem (or
an NFS mount with working locks); on one shared by several machines, run the jobs from one of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import UserError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class JobLock:
    """`with JobLock(folder):` holds `folder/.lock` for the block. wait: seconds to wait for another job to finish
    (0: fail at once with a message naming it; None: wait as long as it takes)."""

    def __init__(self, folder: Path, wait: float | None = 0, log=print, poll: float = 0.5) -> None:
        self.path = Path(folder) / ".lock"
        self.wait, self.log, self.poll = wait, log, poll
        self.file = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the lock
        deadline = None if self.wait is None else time.monotonic() + self.wait
        told = False
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                       f"{holder.get('started', '?')}: {holder.get('command', '?')}")
                if deadline is not None and time.monotonic() >= deadline:
                    self.file.close()
                    waited = f" (waited {self.wait:g} s)" if self.wait else ""
                    raise UserError(f"{self.path}: another job holds this lock{waited} ({who}); let it finish, "
                                    "or pass --wait SECONDS to wait for it") from None
                if not told:
                    self.log(f"waiting for another job to finish ({who})")
                    told = True
                time.sleep(self.poll)
        left = self._holder()
        if left and not (left.get("host") == socket.gethostname() and _alive(int(left.get("pid", 0)))):
            self.log(f"note: a job that held {self.path} ended without releasing it (pid {left.get('pid')}, "
                     f"since {left.get('started')}); taking over: what it left unfinished is resumed or discarded")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "command": " ".join(sys.argv)[:300]}))
        self.file.flush()
        os.fsync(self.file.fileno())
        return self

    def __exit__(self, *exc) -> None:
        self.file.seek(0)
        self.file.truncate()  # an empty file: released cleanly
        self.file.flush()
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
        self.file = None


@contextlib.contextmanager
def job_lock(folder: Path, wait: float | None = 0, log=print, state=None):
    """JobLock for a job of one or several processes (accelerate `state`): the main process holds the lock for
    the whole job and tells the others whether it got it, so that all go on or all stop with its message."""
    if state is None or state.num_processes == 1:
        with JobLock(folder, wait, log=log):
            yield
        return
    from pipeline.runtime import on_main

    lock = JobLock(folder, wait, log=log)
    on_main(state, lock.__enter__, failed="the main process could not take the lock: {}")
    try:
        yield
    finally:
        if state.is_main_process:
            lock.__exit__(None, None, None)

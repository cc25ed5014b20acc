"""One writer per directory: a cache being extracted into, a run directory being trained into.

`DIR/.writer.lock` is created with O_CREAT | O_EXCL, which is atomic on local file systems and on the shared ones
clusters use (NFSv3 and later, Lustre, GPFS, CephFS), and holds who took it: host, pid, the process's start time and
the wall time it was taken. A thread touches it every HEARTBEAT seconds while the holder lives. Another process
finds it held, and is refused naming the holder, unless the holder is gone:

- on the same host, its pid no longer runs, or runs another program (a pid reused after a reboot or wrap-around
  shows another start time);
- on another host, where a pid cannot be asked, its heartbeat is older than STALE seconds, measured against the
  directory's own clock (a file touched there now), so the hosts' clocks need not agree.

A stale lock is renamed aside (atomic: of two processes taking it over, one wins) and taken, with a warning.
Object stores (s3://, gs://, memory://) have no exclusive create: writing to one is not locked, and says so.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("cache_schema.lock")

LOCK_FILE = ".writer.lock"
HEARTBEAT = 30.0  # seconds between touches of a held lock
STALE = 180.0  # a lock of another host not touched for this long is taken over


class DirectoryLocked(ValueError):
    """Another live process writes the directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


class DirectoryLock:
    """`with DirectoryLock(path, what):` holds `path` for this process; `what` names the directory's role in
    messages ("run_dir", "out")."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.dir, self.what = Path(path), what
        self.file = self.dir / LOCK_FILE
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _start_time(os.getpid()),
                   "taken_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}

    def __enter__(self) -> "DirectoryLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a take-over raced by another process is retried, then judged again
            if self._create():
                break
            holder = self._holder()
            if holder is None:
                continue  # released or renamed between our create and our read
            why = self._stale(holder)
            if why is None:
                raise DirectoryLocked(
                    f"{self.what}={str(self.dir)!r} is being written by another live process (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('taken_at')}); wait for it "
                    f"to end, or choose another {self.what}")
            aside = self.file.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(self.file, aside)
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            log.warning("%s %s: took over the lock of host %s, pid %s (since %s): %s", self.what, self.dir,
                        holder.get("host"), holder.get("pid"), holder.get("taken_at"), why)
        else:
            raise DirectoryLocked(f"{self.what}={str(self.dir)!r}: could not take its lock ({self.file})")
        self._beat = threading.Thread(target=self._heartbeat, name="writer-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = self._holder()
        if holder is not None and holder.get("token") == self.me["token"]:
            self.file.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or cut short: judged by its age alone
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is gone, or None while it may still be writing."""
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            return None if _alive(holder["pid"], holder.get("process_start")) else "that process is gone"
        try:
            age = self._now() - self.file.stat().st_mtime
        except FileNotFoundError:
            return "released"
        return f"no heartbeat for {age:.0f} s" if age > STALE else None

    def _now(self) -> float:
        """The directory's clock: the modification time of a file touched there now."""
        probe = self.dir / f".clock-{uuid.uuid4().hex}"
        probe.touch()
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.file)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("%s %s: cannot touch its lock: %s", self.what, self.dir, e)


@contextlib.contextmanager
def held_by_main(lock, is_main: bool, share):
    """`lock` held by a job's main process for all of its ranks: `share(value)` hands every rank the main process's
    value (a broadcast; the identity for one process), so that all of them learn whether it could be taken."""
    refused = None
    if is_main:
        try:
            lock.__enter__()
        except DirectoryLocked as e:
            refused = str(e)
    refused = share(refused)
    if refused:
        raise DirectoryLocked(refused)
    try:
        yield
    finally:
        if is_main:
            lock.__exit__(None, None, None)


def lock_if_local(location_url: str, is_local: bool, what: str):
    """A DirectoryLock for a local path; for an object store, a no-op that says writes there are not locked."""
    if is_local:
        return DirectoryLock(location_url, what)
    log.warning("%s %s: an object store has no exclusive create, so this writer holds no lock; make sure no other "
                "job writes there", what, location_url)
    return contextlib.nullcontext()

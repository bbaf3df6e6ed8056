"""One writer per output folder: a lock file in OUTPUT (and LABELS, RUN) naming who holds it.

    from pipeline.store.locks import folder_lock, LockHeld
    with folder_lock(output, job="cat_filter"):
        ...   # start-up cleanup of temporaries, then the work

A second run on the same folder is refused (LockHeld) with the holder's job, host, pid, start time
and last heartbeat. The lock is `<folder>/.lock`, created with O_CREAT|O_EXCL (atomic, also on NFS
v3+), and holds JSON: job, host, pid, started, a random token. While held, a daemon thread touches
the file every `heartbeat_s` seconds.

A lock left by a run that died is taken over:
- same machine (same host name, boot id and pid namespace): stale as soon as its pid is gone, is a
  zombie not yet reaped or is being killed (pid_alive), or was reused by another process (the process
  start time is recorded too);
- another machine: stale when its heartbeat (the file's mtime) is older than `stale_after_s`
  (default 120 s = 8 missed heartbeats). Ages are measured on the filesystem's clock (the mtime of
  a probe file we create), so clock skew between hosts does not matter. A fresh lock from another
  host is never taken.

The storage is behind a small interface (`LockStore`: conditional create, read with age and version,
refresh-if-version, remove-if-version) with two implementations: POSIX files, and objects in a store
(`ObjectLockStore`, for s3:// and other fsspec URIs): create is a PUT with If-None-Match: * where the
store supports it (AWS S3, and moto; elsewhere a write-then-read-back check, best effort), the version
is the ETag, the heartbeat is the object's Last-Modified on the store's clock (a probe object tells
the store's time, as the probe file does on POSIX), refresh rewrites the same bytes, and
refresh / remove compare the ETag first (a narrow race remains: stores have no delete-if-ETag).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pipeline.store import storage

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another live run holds the folder."""


class LockLost(RuntimeError):
    """Our lock file was removed or replaced while we ran (we were judged stale)."""


@dataclass(frozen=True)
class LockParams:
    heartbeat_s: float = 15.0       # how often the holder touches the lock file
    stale_after_s: float = 120.0    # another host's lock with an older heartbeat is stale (8 beats missed)


@dataclass(frozen=True)
class Holder:
    job: str
    host: str
    pid: int
    started: str                    # ISO time, for people
    machine: str                    # host + boot id + pid namespace: "is this pid ours to check?"
    proc_start: str | None          # the pid's start time (Linux), so a reused pid is not mistaken
    token: str

    def describe(self, age_s: float | None) -> str:
        beat = f", last heartbeat {age_s:.0f} s ago" if age_s is not None else ""
        return f"{self.job} (pid {self.pid} on host {self.host}, started {self.started}{beat})"


def _read_first(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def machine_id() -> str:
    pidns = ""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pass
    return f"{socket.gethostname()}|{_read_first('/proc/sys/kernel/random/boot_id')}|{pidns}"


def process_start(pid: int) -> str | None:
    stat = _read_first(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if ")" in stat else None  # field 22: starttime


PF_EXITING = 0x4   # task flag (/proc/PID/stat field 9): the process is tearing down (killed, exiting)
SIGKILL_BIT = 1 << 8   # SIGKILL (9) in /proc/PID/status' pending-signal masks


def process_ending(pid: int) -> bool:
    """True when the pid is a zombie or dead (state Z, X), is exiting, or has a SIGKILL pending: a killed
    driver stays a zombie until its parent (or init) reaps it - under load, seconds after the kill - and
    os.kill(pid, 0) still succeeds on it; it will never write again."""
    stat = _read_first(f"/proc/{pid}/stat")
    if ")" not in stat:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X", "x"):
        return True
    try:
        if int(fields[6]) & PF_EXITING:   # field 9: flags
            return True
    except (IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def pid_alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if process_ending(pid):
        return False
    return proc_start is None or process_start(pid) in (None, proc_start)


class PosixLockStore:
    """The lock as a file; version = inode number (a replaced file is a new version)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)

    def create(self, data: bytes) -> int | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
            os.fsync(fd)
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def read(self) -> tuple[bytes, float, int] | None:
        """(content, heartbeat age in s on the filesystem's clock, version), or None when absent."""
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, max(0.0, self._fs_now() - st.st_mtime), st.st_ino

    def refresh(self, version: int) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_ino != version:
                return False
            os.utime(fd)  # the inode we just checked, whatever happens to the name meanwhile
            return True
        finally:
            os.close(fd)

    def remove(self, version: int) -> bool:
        """Delete the lock only if it is still `version`: move it aside (atomic, one winner), check,
        and put back a lock that turned out to be someone else's."""
        aside = os.path.join(self.folder, f"{LOCK_NAME}.breaking-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if os.stat(aside).st_ino == version:
            os.remove(aside)
            return True
        try:
            os.link(aside, self.path)  # never overwrites a lock created meanwhile
        except FileExistsError:
            pass
        os.remove(aside)
        return False

    def _fs_now(self) -> float:
        probe = os.path.join(self.folder, f"{LOCK_NAME}.clock-{uuid.uuid4().hex}")
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.remove(probe)


class ObjectLockStore:
    """The lock as an object in a store (see the module doc); version = the ETag of our content."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = storage.join(folder, LOCK_NAME)
        self.fs, self.key = storage.filesystem(self.path)

    def create(self, data: bytes) -> str | None:
        try:
            self.fs.pipe_file(self.key, data, mode="create")
        except FileExistsError:
            return None
        except (TypeError, NotImplementedError, ValueError):  # no conditional PUT here: write, read back
            if self.fs.exists(self.key):
                return None
            self.fs.pipe_file(self.key, data)
            if self.fs.cat_file(self.key) != data:
                return None
        return self._etag()

    def read(self) -> tuple[bytes, float, str] | None:
        try:
            info = self.fs.info(self.key)
            data = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None
        return data, max(0.0, self._store_now() - _modified(info)), _etag_of(info)

    def refresh(self, version: str) -> bool:
        try:
            if self._etag() != version:
                return False
            self.fs.pipe_file(self.key, self.fs.cat_file(self.key))  # same bytes: same ETag, new Last-Modified
            return True
        except FileNotFoundError:
            return False

    def remove(self, version: str) -> bool:
        try:
            if self._etag() != version:
                return False
            self.fs.rm_file(self.key)
            return True
        except FileNotFoundError:
            return False

    def _etag(self) -> str:
        return _etag_of(self.fs.info(self.key))

    def _store_now(self) -> float:
        probe = storage.filesystem(storage.join(self.folder, f"{LOCK_NAME}.clock-{uuid.uuid4().hex}"))[1]
        self.fs.pipe_file(probe, b"")
        try:
            return _modified(self.fs.info(probe))
        finally:
            self.fs.rm_file(probe)


def _etag_of(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("generation") or "").strip('"')


def _modified(info: dict) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(stamp, "timestamp"):
        return stamp.timestamp()
    if isinstance(stamp, str):
        from datetime import datetime
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return float(stamp or 0.0)


class FolderLock:
    def __init__(self, folder: str, job: str, params: LockParams | None = None, store=None):
        self.folder, self.job, self.params = folder, job, params or LockParams()
        self.store = store or (ObjectLockStore(folder) if storage.is_remote(folder) else PosixLockStore(folder))
        self.version: int | None = None
        self.lost = False
        self.left_behind = False   # release failed while leaving on an error: the next run takes it over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "FolderLock":
        storage.makedirs(self.folder)
        me = Holder(self.job, socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    machine_id(), process_start(os.getpid()), uuid.uuid4().hex)
        data = json.dumps(asdict(me), indent=1).encode()
        for _ in range(5):  # a lock may vanish or be taken between our steps: try again
            self.version = self.store.create(data)
            if self.version is not None:
                self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.folder}", daemon=True)
                self._thread.start()
                return self
            current = self.store.read()
            if current is None:
                continue
            content, age, version = current
            holder, why_stale = self._judge(content, age)
            if why_stale is None:
                raise LockHeld(f"{self.folder} is in use by {holder.describe(age)}; wait for it to finish "
                               f"(a lock from this machine is released when its process ends, one from "
                               f"another host after {self.params.stale_after_s:.0f} s without heartbeat)")
            if self.store.remove(version):
                print(f"[lock] took over the stale lock of {self.folder}: {why_stale}", flush=True)
        raise LockHeld(f"{self.folder}: could not take the lock (other runs keep taking it)")

    def _judge(self, content: bytes, age: float) -> tuple[Holder | None, str | None]:
        """(the holder, why its lock is stale or None when it is live)."""
        try:
            holder = Holder(**json.loads(content))
        except (ValueError, TypeError):
            # half-written by a process killed between create and write: only age can tell
            if age > max(5.0, 2 * self.params.heartbeat_s):
                return None, f"unreadable lock file, untouched for {age:.0f} s"
            return Holder("unknown", "?", -1, "?", "?", None, "?"), None
        if holder.machine == machine_id():
            if not pid_alive(holder.pid, holder.proc_start):
                return holder, f"{holder.describe(age)} is no longer running"
            return holder, None
        if age > self.params.stale_after_s:
            return holder, f"{holder.describe(age)}: no heartbeat for over {self.params.stale_after_s:.0f} s"
        return holder, None

    def _beat(self) -> None:
        while not self._stop.wait(self.params.heartbeat_s):
            if not self.store.refresh(self.version):
                self.lost = True
                print(f"[lock] WARNING: the lock of {self.folder} was taken by another run", flush=True)
                return

    def check(self) -> None:
        """Call between phases: stop before writing more if another run took the folder over."""
        if self.lost:
            raise LockLost(f"{self.folder}: our lock was taken over by another run; stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.version is not None and not self.lost:
            self.store.remove(self.version)
        self.version = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if self.version is None else self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except Exception:   # noqa: BLE001
            if exc is None:
                raise
            # leaving on an error already (the store stopped answering, say): that error is the news; the
            # lock left behind names a process that is gone, so the next run takes it over
            self.left_behind = True


def folder_lock(folder: str, job: str, params: LockParams | None = None) -> FolderLock:
    """`with folder_lock(OUTPUT, "cat_filter"):` - refuses (LockHeld) while another live run holds it."""
    return FolderLock(storage.normalize(folder), job, params)

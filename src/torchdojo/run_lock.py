"""One writer per run directory. Two processes writing one run would interleave their checkpoints,
metrics lines and TensorBoard events (one of them dying on the other's temporary checkpoint folder),
so whatever writes a run (`dojo train`, `dojo resume`, `Trainer.fit`, a sequential ensemble) holds an
exclusive lock on `RUN_DIR/.lock` while it does; a second writer gets `RunDirBusy`, naming the PID of
the holder. Readers (`dojo eval`, `report`, `runs`, `compare`) never lock.

The lock is `flock(LOCK_EX | LOCK_NB)`: the kernel drops it when the holder's process ends in any way,
SIGKILL included, so a lock is never stale and nothing has to clean one up. The file is never deleted:
a process could then lock the old, unlinked file while another creates and locks a new one, and both
would write. After locking, the holder writes its PID into the file, only for the message.

Within one process the lock is re-entrant (the CLI takes it before building a Trainer, and Trainer.fit
takes it again); each `acquire_run_dir` needs one `release` (or use it as a context manager):

    with acquire_run_dir(run_dir):
        ...   # only this process writes run_dir
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from .errors import DojoError

LOCK_NAME = ".lock"

# resolved run directory -> [file descriptor holding the flock, how often this process acquired it]
_held: dict[Path, list[int]] = {}
_guard = threading.Lock()


class RunDirBusy(DojoError):
    """Another process writes this run directory (it holds the directory's lock)."""

    def __init__(self, run_dir: Path, pid: int | None):
        self.run_dir, self.pid = Path(run_dir), pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"run directory {run_dir} is in use by {holder} (a `dojo train` or `dojo resume` "
                         f"still writing it); wait for it to end, or stop it, then try again")


class RunDirLock:
    """This process's hold on a run directory; `release()` (or leaving the `with` block) gives it up.
    The lock itself is released when the last holder in the process lets go."""

    def __init__(self, run_dir: Path, key: Path):
        self.run_dir, self._key, self._released = run_dir, key, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _guard:
            held = _held.get(self._key)
            if held is None:        # forgotten in a forked child (see _forget_after_fork)
                return
            held[1] -= 1
            if held[1] == 0:
                del _held[self._key]
                os.close(held[0])       # the last descriptor of the open file: the flock goes with it

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_dir(run_dir: str | Path) -> RunDirLock:
    """Lock `run_dir` for writing (creating it if needed), or raise RunDirBusy if another process holds
    it. Never waits."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        key = run_dir.resolve()
        with _guard:
            if key in _held:
                _held[key][1] += 1
                return RunDirLock(run_dir, key)
            fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise RunDirBusy(run_dir, pid) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:     # a full disk: the PID is only for the message, the lock holds anyway
                pass
            _held[key] = [fd, 1]
    except OSError as exc:     # read-only or full file system, no permission, a file in the way, ...
        raise DojoError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
    return RunDirLock(run_dir, key)


def check_run_dir_free(run_dir: str | Path) -> None:
    """Raise RunDirBusy if another process holds `run_dir`'s lock; take nothing (for a launcher such as
    `dojo train --nproc`, whose rank-0 child takes the lock). Creates nothing."""
    run_dir = Path(run_dir)
    try:
        if run_dir.resolve() in _held:
            return
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:     # never locked (or unreadable: the writer's own acquire_run_dir says so)
        return
    try:
        # A shared lock conflicts only with a writer's exclusive one, so two checks never clash.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirBusy(run_dir, _read_pid(fd)) from None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    # The holder writes its PID just after locking: give it a moment if the file is still empty.
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text:
            return int(text) if text.isdigit() else None
        time.sleep(0.005)
    return None


def _forget_after_fork() -> None:
    """A forked child (a DataLoader worker, a test's child process) shares the parent's locked file
    description: it must neither count itself a holder nor release the parent's lock by accident.
    Closing its copies keeps the parent's lock; a later acquire in the child is a second writer."""
    global _guard
    _guard = threading.Lock()       # another thread of the parent may have held it at the fork
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_after_fork)

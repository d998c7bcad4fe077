"""One writer per model_dir: `ul2 train` holds `<model_dir>/train.lock` while it runs.

    with run_lock.hold(model_dir, warn=print):
      ...  # train

The lock is an advisory `flock` on the file, so the kernel releases it when the
holder exits in any way (kill -9 included), and the file records who holds it
(host, pid, start time). A second `ul2 train` on the same model_dir fails with
`LockHeld`, naming the holder. A lock file left by a holder that is gone (its
flock released) is taken over with one warning naming that holder.

In a multi-process run only process 0 takes the lock; the others write under its
coordination. `flock` works on local disks and on NFS v4 (byte-range emulation).

An object store (`gs://...`) has no flock, so there the run takes no lock and says
so in one line, as T5X and MaxText take none: the scheduler runs one job per
model_dir. A lock object would outlive a preempted holder (the common end of a pod
job) and block the restart it exists to protect, unless it had a lease and a
heartbeat; orbax's atomic step directories already keep a checkpoint whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import time
from typing import Callable, Iterator

FILENAME = "train.lock"


class LockHeld(ValueError):
  """Another process is training in this model_dir."""


def _holder(text: str) -> str:
  try:
    record = json.loads(text)
    return (f"pid {record['pid']} on host {record['host']} (since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['since']))})")
  except (ValueError, KeyError, TypeError):
    return "an unknown process"


@contextlib.contextmanager
def hold(model_dir: str | os.PathLike, warn: Callable[[str], None] = print,
         enabled: bool = True) -> Iterator[None]:
  """Holds the model_dir's lock for the duration of the block (no-op if not `enabled`)."""
  if not enabled:
    yield
    return
  if "://" in os.fspath(model_dir):
    warn(f"note: {os.fspath(model_dir)} is on an object store, which has no file locks: "
         "ul2 takes no lock there, so run one `ul2 train` at a time on it")
    yield
    return
  path = pathlib.Path(model_dir) / FILENAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise LockHeld(f"{os.fspath(model_dir)} is already being trained by "
                     f"{_holder(path.read_text())}; stop that run first, or use another "
                     "--model_dir") from None
    previous = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
    if previous:
      warn(f"warning: taking over the lock in {os.fspath(model_dir)} left by "
           f"{_holder(previous)}, which is no longer running")
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "since": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # A clean exit leaves no holder to warn about.
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)

"""Local files written whole or not at all, and a lock to build one file once.

Why one small module under everything: the dataset cache (science), the sweep's state files and
the trials' checkpoints (store.py) all need the same guarantees, and plain Python is enough for
both layers. A write goes to a temporary name in the same folder (unique across processes *and*
containers sharing the folder: host, pid and a random part), is fsynced, moved over the target
and the folder fsynced, so after a kill or a power loss a reader finds the old file or the new
one, never half of one; a write that fails removes its temporary file.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_MARK = ".kdsweep-tmp-"  # in every temporary name: `ls -a` shows what a killed writer left


class DamagedFile(FileNotFoundError):
    """A file that is there but not whole (truncated, corrupt): for a reader, the file it needs
    is not there, so every command that reports a missing file reports this one the same way."""


def temp_name(path: Path) -> Path:
    """A temporary name beside `path` that no other process, here or in another container
    writing to the same shared folder (where pids repeat), can pick."""
    host = socket.gethostname().replace("/", "_")[:40]
    return path.with_name(f".{path.name}{TEMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function writing to the open file) to `path` atomically and
    durably: temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (created if missing) for the `with` block: one
    process at a time builds what the others then read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

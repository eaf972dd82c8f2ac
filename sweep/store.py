"""Whole files on a local folder or any pyarrow filesystem URI (`s3://`, `gs://`, `file://`).

Why one small module: the teacher cache and the per-trial checkpoints both need the same two
guarantees on any filesystem a cluster can share: a reader sees a whole file or none (write to a
temporary name, then move), and a URI works where a path does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs

from .files import atomic_write, temp_name
from .files import locked as locked  # the teacher cache locks through its store

URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


def is_remote(location: str | Path) -> bool:
    """A URI of a filesystem other than this machine's (s3://, gs://, ...)."""
    return "://" in str(location) and not str(location).startswith("file://")


def absolute(location: str | Path) -> str:
    """A storage location every process of a sweep can use: a URI as given, a local path (or a
    file:// URI) made absolute, since Ray workers do not run in the driver's directory."""
    location = str(location)
    if is_remote(location):
        return location.rstrip("/")
    return str(Path(location.removeprefix("file://")).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    return "/".join([absolute(location), *parts])


class Store:
    """Whole-file reads and atomic whole-file writes on a local path or a pyarrow URI."""

    def __init__(self, root: str | Path) -> None:
        root = absolute(root)
        self.remote = is_remote(root)
        self.fs, self.base = pafs.FileSystem.from_uri(root if self.remote else Path(root).as_uri())
        self.uri = root

    def location(self, *parts: str) -> str:
        """Where a file is, as the user would write it: a local path or a URI."""
        return "/".join([self.uri.rstrip("/"), *parts])

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        """A file or a folder (on object stores: any object under that prefix)."""
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read(self, *parts: str) -> bytes | None:
        p = self.path(*parts)
        if self.fs.get_file_info(p).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(p) as f:
            return f.read()

    def write(self, data: bytes, *parts: str) -> None:
        """Write then move: readers see the old file or the new one, never half of one. Local
        files are also fsynced (files.atomic_write); an object store's upload is whole or not
        at all already, its temporary object is removed if the write fails."""
        p = self.path(*parts)
        if not self.remote:
            atomic_write(p, data)
            return
        self.fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        tmp = str(temp_name(Path(p)))
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, p)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass  # never written
            raise

    def lock_path(self, name: str) -> Path:
        """Local stores lock beside the files; remote ones on this machine only (see README)."""
        if not self.remote:
            return Path(self.base) / name
        tag = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        return Path.home() / ".cache" / "kdsweep" / "locks" / tag / name

"""Where a run's files go: a local folder, a shared filesystem, or an object store (`s3://`, `gs://`, `file://`),
through `pyarrow.fs`, written by whichever actor produces them (the driver: metrics and summary; the learner ranks:
checkpoints and trajectories).

Nothing half-written is ever picked up:
- a file is written whole or not at all: on a filesystem to a temporary name, then moved into place; an object
  store's PUT is atomic by itself;
- a checkpoint is a folder of files whose `COMPLETE` marker, listing every file and its size, is written last;
  a folder without it, or whose files do not match it, is not a checkpoint (`complete_checkpoints` says why).

An object store has no append: `metrics.jsonl` is rewritten whole when it is flushed (see `cluster/train.py`).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MARKER = "COMPLETE"


class RunStorage:
    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:  # absolute: the actors that write here may run in another working directory
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
            uri = self.root
        self.uri = uri
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):  # Ray ships storages to actors: rebuild the filesystem there
        return (RunStorage, (self.uri,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def child(self, *parts: str) -> "RunStorage":
        sep = "" if self.uri.endswith("/") else "/"
        return RunStorage(self.uri + sep + "/".join(parts))

    def local_path(self) -> Path | None:
        """This folder on the local disk, when it is one (a path a library can write to directly)."""
        return Path(self.root) if self.local else None

    # ------------------------------------------------------------------ files

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if not self.local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def files(self, rel: str = "") -> dict[str, int]:
        """Every file under rel, recursively: relative path -> size."""
        base = self.path(rel)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return {posixpath.relpath(i.path, base): i.size for i in infos if i.type == pafs.FileType.File}

    def dirs(self, rel: str = "") -> list[str]:
        base = self.path(rel)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(pafs.FileSelector(base))
                      if i.type == pafs.FileType.Directory)

    def upload(self, local_dir: str | os.PathLike, rel: str, only: list[str] | None = None) -> dict[str, int]:
        """Copy a local folder's files (or `only` those, relative paths) to rel; returns what was written."""
        local_dir = Path(local_dir)
        names = only if only is not None else [str(p.relative_to(local_dir)) for p in sorted(local_dir.rglob("*"))
                                               if p.is_file()]
        written = {}
        for name in names:
            data = (local_dir / name).read_bytes()
            self.write_bytes(posixpath.join(rel, name), data)
            written[name] = len(data)
        return written

    def download(self, rel: str, local_dir: str | os.PathLike, keep=lambda name: True) -> Path:
        local_dir = Path(local_dir)
        for name in self.files(rel):
            if keep(name):
                out = local_dir / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(self.read_bytes(posixpath.join(rel, name)))
        return local_dir

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    # ------------------------------------------------------------------ checkpoints

    def mark_complete(self, rel: str, files: dict[str, int]) -> None:
        self.write_text(posixpath.join(rel, MARKER), json.dumps({"files": files}, indent=1, sort_keys=True))

    def checkpoint_problem(self, rel: str) -> str | None:
        """None if rel is a complete checkpoint, else what is wrong with it."""
        if not self.exists(posixpath.join(rel, MARKER)):
            return f"no {MARKER} marker (interrupted while saving)"
        try:
            listed = json.loads(self.read_text(posixpath.join(rel, MARKER)))["files"]
        except (ValueError, KeyError):
            return f"unreadable {MARKER} marker"
        present = self.files(rel)
        bad = [name for name, size in listed.items() if present.get(name) != size]
        return f"{len(bad)} files missing or cut short (first: {bad[0]})" if bad else None

    def complete_checkpoints(self, rel: str = "checkpoints") -> tuple[list[str], dict[str, str]]:
        """Checkpoint folders under rel, oldest first, that are complete; and the others with what is wrong."""
        good, skipped = [], {}
        for name in self.dirs(rel):
            problem = self.checkpoint_problem(posixpath.join(rel, name))
            if problem is None:
                good.append(name)
            else:
                skipped[name] = problem
        return good, skipped


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as a Parquet file's bytes, for `RunStorage.write_bytes` (written whole, on any filesystem)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()

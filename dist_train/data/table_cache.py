"""Tables read once: a CSV parsed by pyarrow into an Arrow file in a cache directory, keyed by the table's content, and
memory-mapped by every process that reads it; and the check, once per table and image root, that its image files exist.

Files in the cache directory (data.cache_dir; default $DIST_TRAIN_CACHE, else ~/.cache/dist_train), under tables/:
    <content>.arrow              every column of the table, as strings, one record batch (content = sha256 of the CSV)
    <content>.files-<root>.json  which image files were missing when checked against that image root (none, usually)
    <where>.json                 the table at path <where> was that content while its stat (device, inode, size, mtime,
                                 ctime) was this: a start whose stat agrees maps the file without reading the table
    <where>.lock                 held while a process reads, hashes, parses or checks that table: the others wait
An edit of the table changes its mtime and ctime (ctime cannot be set back), so the next start reads and hashes it
again: a new content is parsed anew, the same content (a copy, a touch) maps the file it had. Files are written under
a temporary name and renamed when complete: a process killed while building leaves no file that a later one trusts.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dist_train.data.columns import Column, mapped_table
from dist_train.errors import DataError
from dist_train.job.faults import inject

ANNOUNCE_BYTES = 16 << 20
"""A table this large (some 400,000 rows) is said when it is read into the cache: its first start takes seconds."""
FORMAT = 1
"""Bumped when what a cache file holds changes: older files are then neither read nor overwritten."""


class Table:
    """One CSV table's columns: mapped from its cache file (`data`), or held in memory where no cache can be written."""

    def __init__(self, source: Path, table: pa.Table, data: Path | None = None, cache: "TableCache | None" = None):
        self.source, self.table, self.data, self.cache = source, table, data, cache

    @property
    def names(self) -> list[str]:
        return self.table.column_names

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> Column:
        if self.data is not None:
            return Column.mapped(str(self.data), name)
        return Column(self.table.column(name).chunk(0) if self.num_rows else pa.array([], pa.string()))

    def missing_files(self, image_root: Path, image_column: str) -> tuple[list[str], int]:
        """(the image files the table names that do not exist, in its order; how many rows name one)."""
        if self.cache is not None:
            missing = self.cache.missing_files(self.data, image_root, image_column)
        else:
            missing = _check_files(self.column(image_column).arrow(), image_root)["missing"]
        if not missing:
            return [], 0
        rows = pc.sum(pc.is_in(self.column(image_column).arrow(), value_set=pa.array(missing, pa.string()))).as_py()
        return missing, int(rows)


_unwritable: set[Path] = set()


def open_table(path: Path, cache_dir: str | None) -> Table:
    """The table at `path` (a CSV file), through the cache in `cache_dir` (data.cache_dir)."""
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    directory = cache_root(cache_dir)
    try:
        (directory / "tables").mkdir(parents=True, exist_ok=True)
        writable = os.access(directory / "tables", os.W_OK)
    except OSError:
        writable = False
    if not writable:  # read as before the cache: each process parses the table itself
        if directory not in _unwritable:
            _unwritable.add(directory)
            print(f"warning: the table cache {directory} cannot be written: every process reads its tables itself (set "
                  f"data.cache_dir, or DIST_TRAIN_CACHE, to a writable directory)", file=sys.stderr, flush=True)
        return Table(path, parse_csv(path.read_bytes(), path))
    cache = TableCache(path, directory)
    data = cache.open()
    return Table(path, mapped_table(str(data)), data, cache)


def computed_once(cache_dir: str | None, name: str, key: str, compute) -> np.ndarray:
    """compute() of an array (a pure function of what `key` digests), kept in the cache directory under
    `name`-`key`.npy: the first process to ask computes it while the others wait, later ones read it. Where the cache
    cannot be written, each process computes it."""
    directory = cache_root(cache_dir) / "tables"
    path = directory / f"{name}-{key[:40]}.npy"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory / f"{name}-{key[:40]}.lock"):
            if not path.is_file():
                value = compute()

                def write(tmp: Path) -> None:
                    with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
                        np.save(f, value)

                _write_atomically(path, write)
                return value
    except OSError:
        return compute()
    return np.load(path)


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("DIST_TRAIN_CACHE") or Path.home() / ".cache" / "dist_train")


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (flock: released by the kernel when its holder dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TableCache:
    """The table cache of one CSV file: `open()` gives the path of its Arrow file, built first if need be."""

    def __init__(self, table: Path, directory: Path):
        self.table = table
        self.directory = directory / "tables"
        where = hashlib.sha256(str(table.resolve()).encode()).hexdigest()[:24]
        self.pointer = self.directory / f"{where}.json"
        self.lock = self.directory / f"{where}.lock"

    def data_file(self, content: str) -> Path:
        return self.directory / f"{content[:40]}.v{FORMAT}.arrow"

    def _known(self) -> Path | None:
        """The Arrow file of the table as it is now, when an earlier read recorded it (no lock, no read of the table)."""
        try:
            pointer = json.loads(self.pointer.read_text())
            if pointer.get("format") == FORMAT and pointer["stat"] == _stat_key(self.table):
                data = self.data_file(pointer["content"])
                if data.is_file():
                    return data
        except (OSError, ValueError, KeyError):
            pass
        return None

    def open(self) -> Path:
        known = self._known()
        if known is not None:
            return known
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.lock):  # one process reads and parses; the others wait, then find its file
            known = self._known()
            if known is not None:
                return known
            stat = _stat_key(self.table)
            raw = self.table.read_bytes()
            content = hashlib.sha256(raw).hexdigest()
            data = self.data_file(content)
            if not _readable(data, content):
                for stale in self.directory.glob(f".{data.name}.tmp-*"):  # left by a process killed while writing it
                    stale.unlink(missing_ok=True)
                self._build(raw, content, data)
            if _stat_key(self.table) == stat:  # not changed while it was read: later starts may skip the read
                record = {"format": FORMAT, "table": str(self.table.resolve()), "stat": stat, "content": content}
                _write_atomically(self.pointer, lambda tmp: tmp.write_text(json.dumps(record)))
            return data

    def _build(self, raw: bytes, content: str, data: Path) -> None:
        started = time.monotonic()
        loud = len(raw) >= ANNOUNCE_BYTES
        if loud:
            print(f"data: reading {self.table} ({len(raw) / 2**20:.0f} MiB) once into the table cache {self.directory}",
                  flush=True)
        table = parse_csv(raw, self.table)
        table = table.replace_schema_metadata({"content": content, "table": str(self.table), "rows": str(table.num_rows),
                                               "built_by": f"{socket.gethostname()}:{os.getpid()}"})

        def write(tmp: Path) -> None:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(1, table.num_rows))
                inject("table-cache-written")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

        _write_atomically(data, write)
        if loud:
            print(f"data: {self.table}: {table.num_rows} rows cached in {time.monotonic() - started:.1f} s "
                  f"(read again only when the table changes)", flush=True)

    def missing_files(self, data: Path, image_root: Path, image_column: str) -> list[str]:
        """The missing image files, as the table names them, in the table's order: checked once per table content and
        image root, by one process, in threads, each distinct file once. A file recorded missing is looked for again
        at each start (it may have been added since); one removed after the check is found when it is read
        (data.bad_samples)."""
        root = str(image_root.resolve())
        tag = hashlib.sha256(f"{root}\0{image_column}".encode()).hexdigest()[:16]
        record = data.with_name(data.name.replace(".arrow", f".files-{tag}.json"))
        checked = _read_json(record)
        if checked is None:
            with _locked(self.lock):
                checked = _read_json(record)
                if checked is None:
                    checked = _check_files(mapped_table(str(data)).column(image_column).chunk(0), image_root)
                    _write_atomically(record, lambda tmp: tmp.write_text(json.dumps(checked)))
        return [p for p in checked["missing"] if not (image_root / p).is_file()]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_files(paths: pa.Array, image_root: Path) -> dict:
    distinct = pc.unique(paths).to_pylist()  # in the order the table first names them
    started = time.monotonic()

    def exists(chunk: list[str]) -> list[bool]:
        return [os.path.isfile(image_root / p) for p in chunk]

    step = 4096
    with ThreadPoolExecutor(32) as pool:  # a shared file system answers each stat with a round trip: many at once
        found = [ok for part in pool.map(exists, [distinct[i:i + step] for i in range(0, len(distinct), step)]) for ok in part]
    missing = [p for p, ok in zip(distinct, found) if not ok]
    if time.monotonic() - started > 5:
        print(f"data: checked {len(distinct)} image files under {image_root} in {time.monotonic() - started:.0f} s "
              f"(once per table and image root)", flush=True)
    return {"root": str(image_root), "files": len(distinct), "missing": missing}


def _readable(data: Path, content: str) -> bool:
    """A complete cache file of this content (a file cut short or foreign is not trusted: it is built again)."""
    if not data.is_file():
        return False
    try:
        with pa.memory_map(str(data), "r") as source:
            meta = pa.ipc.open_file(source).schema.metadata or {}
        return meta.get(b"content") == content.encode()
    except (pa.ArrowInvalid, OSError):
        return False


def parse_csv(raw: bytes, where: Path) -> pa.Table:
    """Every column of the CSV as strings (an empty cell is ""), as csv.DictReader reads them; pyarrow's reader, on
    all cores."""
    if not raw.strip():
        return pa.table({})
    parse = pacsv.ParseOptions(newlines_in_values=True)
    try:
        with pacsv.open_csv(pa.BufferReader(raw), read_options=pacsv.ReadOptions(block_size=1 << 16),
                            parse_options=parse) as first:  # the column names, as the full read will see them
            names = first.schema.names
        table = pacsv.read_csv(pa.BufferReader(raw), parse_options=parse, convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=False,
            quoted_strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{where}: cannot read the table ({str(exc).splitlines()[0]})") from None
    columns = []
    for name in table.column_names:
        column = table.column(name)
        if column.nbytes > (1 << 31) - (1 << 26):  # a string array's offsets are 32-bit: past 2 GiB they are 64-bit
            column = column.cast(pa.large_string())
        columns.append(column.combine_chunks())
    return pa.table(columns, names=table.column_names)

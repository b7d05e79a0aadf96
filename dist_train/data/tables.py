"""Tables of samples: a split's rows (CSV table through the table cache, class folders, or a shard set's table) read
into Records of paths, labels, ids and groups."""

from __future__ import annotations

import csv
import math
import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dist_train.config import DataConfig, SplitConfig
from dist_train.config.data import byte_count
from dist_train.data.columns import CHUNK, Column, PathColumn, distinct_count, row_index
from dist_train.data.shards import ROWS, ShardReader, ShardSet, cache_directory, is_remote, where
from dist_train.data.table_cache import Table, cache_root, open_table
from dist_train.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Records:
    """One split as columns: image paths, targets (-1 when unlabelled) and row ids (columns.py: Arrow arrays, mapped
    from the table cache, and the rows this split takes of them).

    `targets`: a tensor, one row per sample: a class index (int64), several heads' indices (int64, one column each), or
    values (float32: regression, soft targets); tasks.py encodes them from `labels`, the raw label columns. `groups`:
    each row's query (ranking). `split_groups`: each row's data.group_column value (rows of a group stay on one side of
    a hold-out or a cv fold). Lists given for any of them are made columns and tensors.
    """

    paths: PathColumn
    targets: torch.Tensor
    ids: Column
    labels: dict[str, Column] | None = None
    groups: Column | None = None
    split_groups: Column | None = None
    rows: torch.Tensor | None = None
    """A shard set's rows: each record's row in it (data/shards.py); None for images read from their files."""
    shards: object = None
    """A shard set's ShardReader, which reads the images of `rows`; None for images read from their files."""

    def __post_init__(self):
        self.paths = PathColumn.of(self.paths)
        self.ids = Column.of(self.ids)
        self.targets = target_tensor(self.targets)
        if self.labels is not None:
            self.labels = {k: Column.of(v) for k, v in self.labels.items()}
        self.groups = Column.of(self.groups) if self.groups is not None else None
        self.split_groups = Column.of(self.split_groups) if self.split_groups is not None else None

    def take(self, idx) -> "Records":
        """The rows `idx` (positions in this split), sharing the columns' strings."""
        idx = row_index(idx)
        pick = lambda column: column.take(idx) if column is not None else None  # noqa: E731
        return Records(self.paths.take(idx), self.targets[idx] if len(self.targets) else self.targets, self.ids.take(idx),
                       {k: v.take(idx) for k, v in self.labels.items()} if self.labels is not None else None,
                       pick(self.groups), pick(self.split_groups), self.rows[idx] if self.rows is not None else None,
                       self.shards)


def target_tensor(values) -> torch.Tensor:
    """Targets as one tensor: ints (class indices) int64, floats float32, tuples a row each (int64 when all ints)."""
    if isinstance(values, torch.Tensor):
        return values
    values = list(values)
    if not values:
        return torch.empty(0, dtype=torch.int64)
    first = values[0]
    if isinstance(first, (tuple, list)):
        ints = all(isinstance(v, int) for row in values for v in row)
    else:
        ints = all(isinstance(v, (int, np.integer)) for v in values)
    return torch.tensor(values, dtype=torch.int64 if ints else torch.float32)


def resolve(cfg: DataConfig, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(cfg.root) / p


@dataclass(frozen=True)
class SplitSource:
    """Where one split's rows and images are: data.<split>, its own keys first, then the data section's."""

    name: str
    """train, val or test."""
    table: Path | str
    """(A shard set's: its rows.csv as a string, which may be an s3:// address.)"""
    image_root: Path
    image_column: str
    id_column: str
    id_named: bool
    """The split names its id column itself (so the table must have it)."""


def split_source(cfg: DataConfig, name: str) -> SplitSource:
    """data.<name> (a table path, or a mapping of its own table, image root, image and id columns) resolved: relative
    paths against data.root, keys left out from the data section."""
    value = getattr(cfg, name)
    own = value if isinstance(value, SplitConfig) else SplitConfig(table=value)
    image_root = own.image_root or cfg.image_root
    if cfg.source == "shards":  # (messages name the set's table; an s3:// location is no Path)
        return SplitSource(name, f"{shard_location(cfg, name)}/{ROWS}", Path(cfg.root), cfg.image_column, cfg.id_column, False)
    return SplitSource(name, resolve(cfg, own.table), resolve(cfg, image_root) if image_root else Path(cfg.root),
                       own.image_column or cfg.image_column, own.id_column or cfg.id_column, own.id_column is not None)


def read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    """A small table as a list of rows (dicts); the tables of samples go through the table cache instead."""
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        check_columns(path, reader.fieldnames or [], required)
        return list(reader)


def check_columns(path: Path, columns: list[str], required: list[str]) -> None:
    for column in required:
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{path}: missing column {column!r}{hint}; columns found: {', '.join(columns) or 'none'}")


def _check_images_exist(table: Table, image_root: Path, image_column: str) -> None:
    """Each distinct image file of the table stat'ed once per table version and image root, by one process (the table
    cache records the result), not by every rank at every start; a missing one is a DataError naming it."""
    missing, rows = table.missing_files(image_root, image_column)
    if missing:
        more = f" and {rows - 1} more" if rows > 1 else ""
        raise DataError(f"{table.source}: image file not found: {image_root / missing[0]}{more}")


def encode_classes(labels, classes: list[str], where: str) -> torch.Tensor:
    """Class indices of `labels` (int64); a label outside `classes` is a DataError naming its row."""
    codes = pc.index_in(Column.of(labels).arrow(), value_set=pa.array(classes, pa.string()))
    if codes.null_count:
        row = pc.index(pc.is_null(codes), True).as_py()
        raise DataError(
            f"{where}: row {row + 1} has label {Column.of(labels)[row]!r}, which is not one of the "
            f"{len(classes)} classes ({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})"
        )
    return torch.from_numpy(codes.to_numpy(zero_copy_only=False).astype(np.int64))


def float_column(values, where: str) -> torch.Tensor:
    """The column's numbers (float64), as Python's float() reads them; a cell that is not a finite number is a DataError
    naming its row."""
    column = Column.of(values)
    try:
        numbers = pc.cast(column.arrow(), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # what Arrow does not read (" 1.5", "1_000"): as Python reads
        numbers = np.array([_float(v) for v in column], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers))
    if len(bad):
        raise DataError(f"{where}: row {bad[0] + 1} has {column[int(bad[0])]!r}, not a finite number")
    return torch.from_numpy(np.require(numbers, requirements="W"))  # (Arrow's zero-copy arrays are read-only)


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def label_sets(values, separator: str) -> tuple[np.ndarray, pa.Array]:
    """The class names in each cell of a column of delimited names: (each name's row, the names), names trimmed of
    surrounding spaces, empty ones (an empty cell, doubled separators) dropped."""
    cells = Column.of(values).arrow()
    if isinstance(cells, pa.ChunkedArray):
        cells = cells.combine_chunks()
    lists = pc.split_pattern(cells, pattern=separator)
    tokens = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    rows = pc.list_parent_indices(lists)
    kept = pc.not_equal(tokens, "")
    return pc.filter(rows, kept).to_numpy(zero_copy_only=False).astype(np.int64), pc.filter(tokens, kept)


def encode_label_sets(values, classes: list[str], separator: str, where: str) -> torch.Tensor:
    """(rows, classes) 0/1 float32 targets of a column of delimited class names ("3 7 12"; an empty cell: none); a name
    outside `classes` is a DataError naming its row."""
    rows, names = label_sets(values, separator)
    codes = pc.index_in(names, value_set=pa.array(classes, pa.string()))
    if codes.null_count:
        first = pc.index(pc.is_null(codes), True).as_py()
        raise DataError(f"{where}: row {rows[first] + 1} has class {names[first].as_py()!r}, which is not one of the "
                        f"{len(classes)} classes ({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})")
    targets = torch.zeros(len(Column.of(values)), len(classes))
    targets[torch.from_numpy(rows), torch.from_numpy(codes.to_numpy(zero_copy_only=False).astype(np.int64))] = 1.0
    return targets


def label_set_names(values, separator: str) -> Column:
    """The distinct class names of a column of delimited names."""
    return Column(pc.unique(label_sets(values, separator)[1]))


def binary_column(values, where: str) -> torch.Tensor:
    """A 0/1 column as float32; any other value is a DataError naming its row."""
    numbers = float_column(values, where)
    bad = torch.nonzero((numbers != 0) & (numbers != 1)).flatten()
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{where}: row {row + 1} has {Column.of(values)[row]!r}, not 0 or 1")
    return numbers.float()


def group_ids(groups) -> torch.Tensor | None:
    """Query names as integer ids, numbered in the order they first appear (ranking metrics group rows by them); None
    stays None."""
    if groups is None:
        return None
    return torch.from_numpy(Column.of(groups).first_codes())


def sorted_labels(labels) -> list[str]:
    """Unique labels, numerically sorted when all are integers (so "10" comes after "9")."""
    unique = set(labels.distinct()) if isinstance(labels, Column) else set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _csv_split(cfg: DataConfig, source: SplitSource, labelled: bool, columns: list[str] | None = None,
               query: str | None = None, check_images: bool = True):
    """(image paths, label columns, ids, groups) of one table. The test split's ids are its id column (the submission
    echoes them: unique); a labelled row's id is its id column when the table has one, else its image path relative to
    the image root. Groups: data.group_column of a labelled table (None without it)."""
    path = source.table
    columns = columns or [cfg.label_column]
    named_id = [source.id_column] if not labelled or source.id_named else []
    required = [source.image_column] + (columns if labelled else []) + named_id + ([query] if query else [])
    table = open_table(path, cfg.cache_dir)
    check_columns(path, table.names, required)
    if not table.num_rows:
        raise DataError(f"{path}: no rows")
    if check_images:
        _check_images_exist(table, source.image_root, source.image_column)
    paths = PathColumn(table.column(source.image_column), str(source.image_root))
    labels = {c: table.column(c) for c in columns} if labelled else {}
    if query:
        labels[query] = table.column(query)
    ids = table.column(source.id_column if source.id_column in table.names else source.image_column)
    if not labelled:
        _check_unique(ids, f"{path}: column {source.id_column!r}")
    groups = _groups(cfg, table, source, path) if labelled and cfg.group_column else None
    return paths, labels, ids, groups


def _check_unique(ids: Column, where: str) -> None:
    if distinct_count(ids) == len(ids):
        return
    seen: dict[str, int] = {}
    for row, value in enumerate(ids, 1):
        if value in seen:
            raise DataError(f"{where} has duplicate ids: {value!r} on rows {seen[value]} and {row}; the submission needs "
                            f"one row per id")
        seen[value] = row


def _groups(cfg: DataConfig, table: Table, source: SplitSource, path: Path) -> Column:
    """Each row's data.group_column value: the column's, or (`parent_dir`) the folder of its image path."""
    column = cfg.group_column
    if column in table.names:
        return table.column(column)
    if column == "parent_dir":
        images = pc.dictionary_encode(table.column(source.image_column).arrow())
        parents = pa.array([str(Path(p).parent) for p in images.dictionary.to_pylist()], pa.string())
        return Column(parents.take(images.indices))
    close = difflib.get_close_matches(column, table.names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"{path}: data.group_column {column!r} is not a column{hint}; columns found: {', '.join(table.names)} "
                    f"(or set data.group_column: parent_dir to group the images by their folder)")


def _folder_split(cfg: DataConfig, source: SplitSource, labelled: bool) -> tuple[list[Path], list[str], list[str]]:
    root = source.table
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    paths, labels = [], []
    columns = {cfg.label_column: labels}
    if labelled:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        if not class_dirs:
            raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
        for class_dir in class_dirs:
            files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [class_dir.name] * len(files)
    else:
        paths = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    ids = [str(p.relative_to(root).with_suffix("")) for p in paths]
    return paths, columns if labelled else {}, ids


def read_split(cfg: DataConfig, name: str, labelled: bool, columns: list[str] | None = None, query: str | None = None) -> Records:
    if cfg.source == "shards":
        return _shard_split(cfg, name, labelled, columns, query)
    source = split_source(cfg, name)
    groups = None
    if cfg.source == "folder":
        paths, labels, ids = _folder_split(cfg, source, labelled)
    else:
        paths, labels, ids, groups = _csv_split(cfg, source, labelled, columns, query)
    return Records(paths, [], ids, labels if labelled else None, labels.pop(query) if query else None, groups)


def shard_location(cfg: DataConfig, split: str) -> str:
    """data.<split> of a shards source: an s3:// prefix as it is, a directory against data.root."""
    value = getattr(cfg, split)
    value = value.table if isinstance(value, SplitConfig) else value
    if value is None:
        raise ConfigError(f"data.{split} is not set: name the shard set (a directory or s3://bucket/prefix)")
    return str(value).rstrip("/") if is_remote(value) else str(resolve(cfg, str(value)))


def _shard_split(cfg: DataConfig, split: str, labelled: bool, columns: list[str] | None, query: str | None):
    """A split of a shards source as Records: its table read from rows.csv, its images from the shards."""
    location = shard_location(cfg, split)
    shard_set = ShardSet.open(location)
    root = cache_root(cfg.cache_dir)
    table = shard_set.rows_table(cache_directory(root, location))
    index = shard_set.index
    source = SplitSource(split, table, Path(location), index["image_column"], index["id_column"], index["id_named"])
    paths, labels, ids, groups = _csv_split(cfg, source, labelled, columns, query, check_images=False)
    limit = byte_count(cfg.cache_limit) if cfg.cache_limit else None
    reader = ShardReader(shard_set, root, limit, keep_open=cfg.shard_window + 1)
    if limit is not None and is_remote(location):
        biggest = max((s["bytes"] for s in shard_set.shards), default=0)
        need = 2 * min(cfg.shard_window, len(shard_set.shards)) * biggest
        if limit < need:
            raise ConfigError(f"data.cache_limit {cfg.cache_limit} is below what reading {location} takes: "
                              f"2 x data.shard_window ({cfg.shard_window}) shards of up to {biggest / 1e6:.1f} MB = "
                              f"{need / 1e6:.1f} MB; raise it, lower data.shard_window or write smaller shards")
        if split == "train" and cfg.balanced_sampler and limit < sum(s["bytes"] for s in shard_set.shards):
            raise ConfigError(f"data.balanced_sampler draws rows from every shard of {location} at any time, which a "
                              f"data.cache_limit ({cfg.cache_limit}) smaller than the set would download again and "
                              f"again: raise the limit above the set's size, or copy the set to a local directory")
    if len(reader) != len(paths):
        raise DataError(f"{where(location)}: {ROWS} has {len(paths)} rows, its shards {len(reader)}: the set is damaged; "
                        f"write it again")
    return Records(paths, [], ids, labels if labelled else None, labels.pop(query) if query else None, groups,
                   rows=torch.arange(len(paths)), shards=reader)


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of row ids in their order, "\\n"-joined: what a file computed for some rows (a fold's predictions, a
    teacher's outputs) records, so that it is refused for other rows. Hashed a chunk at a time."""
    digest, first = hashlib.sha256(), True
    ids = Column.of(ids) if not isinstance(ids, Column) else ids
    for start in range(0, len(ids), CHUNK):
        digest.update(("" if first else "\n").encode() + "\n".join(ids.take(range(start, min(start + CHUNK, len(ids)))).to_list()).encode())
        first = False
    return digest.hexdigest()

"""A table's columns as Arrow arrays and row selections: what Records hold instead of a Python object per cell.

A Column is one string column of a table (memory-mapped from the table cache, table_cache.py, or in memory) and the
rows of it a split uses, as an int64 tensor. Taking rows (a hold-out, a fold) copies no strings, only indices; pickling
a mapped column (to a loader worker started by the fork server) sends the cache file's path, the column's name and
the row tensor, which torch's multiprocessing pickler passes as shared memory: a worker maps the same pages, whatever
the table's size. A PathColumn is a Column of image paths read relative to their image root.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

CHUNK = 65_536
"""Rows turned into Python strings at a time when a column is iterated."""


@functools.cache
def mapped_table(path: str) -> pa.Table:
    """The table cache file at `path`, memory-mapped (once per process: every Column of it shares the mapping)."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def row_index(idx) -> torch.Tensor:
    """Row positions (a range, a list, an array or a tensor) as the int64 tensor columns take rows by."""
    if isinstance(idx, torch.Tensor):
        return idx.to(torch.int64)
    if isinstance(idx, range):
        return torch.arange(idx.start, idx.stop, idx.step, dtype=torch.int64)
    return torch.as_tensor(np.asarray(idx, dtype=np.int64))


def sorted_rank(values: list[str]) -> np.ndarray:
    """Each value's position in the sorted values (how np.unique numbers strings)."""
    rank = np.empty(len(values), dtype=np.int64)
    rank[sorted(range(len(values)), key=values.__getitem__)] = np.arange(len(values))
    return rank


def _same_items(column: Sequence, other) -> bool:
    return isinstance(other, Sequence) and len(column) == len(other) and list(column) == list(other)


class Column(Sequence):
    """Strings of one column; `rows` (int64 tensor) picks and orders the rows of `array` this column holds (all: None)."""

    def __init__(self, array: pa.Array, rows: torch.Tensor | None = None, source: tuple[str, str] | None = None):
        self.array = array
        self.rows = rows
        self.source = source
        """(table cache file, column name) when `array` is mapped from it: what pickling sends instead of the strings."""

    @property
    def _index(self) -> np.ndarray | None:
        """The rows as numpy, viewed afresh each time: sending the column to a loader worker moves `rows` into shared
        memory (torch's pickler), and a view taken before would read the freed pages."""
        return self.rows.numpy() if self.rows is not None else None

    @classmethod
    def of(cls, values) -> "Column":
        """A column from Python strings (or another Column, returned as it is)."""
        if isinstance(values, Column):
            return values
        return cls(pa.array([str(v) for v in values], type=pa.string()))

    @classmethod
    def mapped(cls, path: str, name: str, rows: torch.Tensor | None = None) -> "Column":
        column = mapped_table(path).column(name)
        return cls(column.chunk(0) if column.num_chunks else pa.array([], column.type), rows, (path, name))

    def __reduce__(self):
        if self.source is not None:
            return Column.mapped, (*self.source, self.rows)
        return Column, (self.arrow(), None, None)

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self)))).to_list()
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.array[int(index if self._index is None else self._index[index])].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), CHUNK):
            yield from self.take(range(start, min(start + CHUNK, len(self)))).to_list()

    def __eq__(self, other) -> bool:
        return _same_items(self, other)

    def take(self, idx) -> "Column":
        """The rows `idx` (positions in this column), sharing the strings."""
        idx = row_index(idx)
        return Column(self.array, idx if self.rows is None else self.rows[idx], self.source)

    def arrow(self) -> pa.Array:
        """The column's values as one Arrow array (the array itself when no rows are picked)."""
        return self.array if self.rows is None else self.array.take(pa.array(self._index))

    def to_list(self) -> list[str]:
        return self.arrow().to_pylist()

    def codes(self) -> tuple[np.ndarray, list[str]]:
        """(code of each row, the distinct values) with codes in the values' sorted order, as np.unique(strings,
        return_inverse=True) would number them (scikit-learn's splitters number labels and groups so: the folds of a
        code array are the folds of the strings), in one pass over the rows and a sort of the distinct values."""
        encoded = pc.dictionary_encode(self.arrow())
        values = encoded.dictionary.to_pylist()
        return sorted_rank(values)[encoded.indices.to_numpy(zero_copy_only=False)], sorted(values)

    def first_codes(self) -> np.ndarray:
        """Each row's value numbered in the order the values first appear (0, 1, ...)."""
        return pc.dictionary_encode(self.arrow()).indices.to_numpy(zero_copy_only=False).astype(np.int64)

    def distinct(self) -> list[str]:
        """The distinct values, in the order they first appear."""
        return pc.unique(self.arrow()).to_pylist()

    @staticmethod
    def concat(first: "Column", second: "Column") -> "Column":
        """Both columns' rows in one (in memory)."""
        return Column(pa.concat_arrays([first.arrow().cast(pa.large_string()), second.arrow().cast(pa.large_string())]))


class PathColumn(Sequence):
    """Image paths: a Column of paths as the table writes them, each read against `root` (an absolute one stays)."""

    def __init__(self, column: Column, root: str = ""):
        self.column, self.root = column, root

    @classmethod
    def of(cls, paths) -> "PathColumn":
        return paths if isinstance(paths, PathColumn) else cls(Column.of(str(p) for p in paths))

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [Path(self.root, p) for p in self.column[index]]
        return Path(self.root, self.column[index])

    def __iter__(self) -> Iterator[Path]:
        return (Path(self.root, p) for p in self.column)

    def __eq__(self, other) -> bool:
        return _same_items(self, other)

    def take(self, idx) -> "PathColumn":
        return PathColumn(self.column.take(idx), self.root)

    def first_without_suffix(self, suffixes) -> Path | None:
        """The first path whose (lower-cased) suffix is none of `suffixes`, found without a Path per row."""
        lower = pc.utf8_lower(self.column.arrow())
        matches = None
        for suffix in suffixes:
            hit = pc.ends_with(lower, suffix)
            matches = hit if matches is None else pc.or_(matches, hit)
        other = pc.invert(matches) if matches is not None else pa.array([True] * len(self))
        index = pc.index(other, True).as_py()
        return None if index < 0 else self[index]

    @staticmethod
    def concat(first: "PathColumn", second: "PathColumn") -> "PathColumn":
        """Both columns' paths in one (in memory, each made whole against its root)."""
        if first.root == second.root:
            return PathColumn(Column.concat(first.column, second.column), first.root)
        return PathColumn(Column.of([*map(str, first), *map(str, second)]))


def distinct_count(values) -> int:
    """How many distinct values a column (or a list) holds."""
    return pc.count_distinct(values.arrow()).as_py() if isinstance(values, Column) else len(set(values))

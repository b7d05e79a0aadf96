"""Tables of samples: a split's rows (CSV table or class folders) read into Records of paths, labels, ids and groups."""

from __future__ import annotations

import csv
import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dist_train.config import DataConfig, SplitConfig
from dist_train.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Records:
    """One split as plain lists: image paths, targets (-1 when unlabelled) and row ids.

    A target is a class index, or a tuple (several heads, several values) or a float (tasks.py encodes
    them from `labels`, the raw label columns). `groups`: each row's query (ranking). `split_groups`: each row's
    data.group_column value (rows of a group stay on one side of a hold-out or a cv fold).
    """

    paths: list[Path]
    targets: list
    ids: list[str]
    labels: dict[str, list[str]] | None = None
    groups: list[str] | None = None
    split_groups: list[str] | None = None

    def __reduce__(self):
        """Pickled (to loader workers started by the fork server) with the paths as one string: see PathList. Made
        one the first time, here: a loader pickles its dataset once per worker."""
        self.paths = PathList.of(self.paths)
        return Records, (self.paths, self.targets, self.ids, self.labels, self.groups, self.split_groups)

    def take(self, idx) -> "Records":
        pick = lambda values: [values[i] for i in idx] if values is not None else None  # noqa: E731
        return Records(pick(self.paths), pick(self.targets) if self.targets else [], pick(self.ids),
                       {k: pick(v) for k, v in self.labels.items()} if self.labels is not None else None,
                       pick(self.groups), pick(self.split_groups))


class PathList(Sequence):
    """Paths held as one string, a Path made on each access: how Records travel to fork-server workers. ImageNet's
    1.28 M Path objects took 3.4 s to pickle (per worker, in the rank) and 8.4 s to unpickle; as one string, BENCHMARKS.md."""

    def __init__(self, text: str):
        self._text = text
        self._items = text.split("\0") if text else []

    @classmethod
    def of(cls, paths) -> "PathList":
        return paths if isinstance(paths, PathList) else cls("\0".join(map(str, paths)))  # NUL: in no path

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [Path(p) for p in self._items[index]]
        return Path(self._items[index])

    def __reduce__(self):
        return PathList, (self._text,)


def resolve(cfg: DataConfig, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(cfg.root) / p


@dataclass(frozen=True)
class SplitSource:
    """Where one split's rows and images are: data.<split>, its own keys first, then the data section's."""

    name: str
    """train, val or test."""
    table: Path
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
    return SplitSource(name, resolve(cfg, own.table), resolve(cfg, image_root) if image_root else Path(cfg.root),
                       own.image_column or cfg.image_column, own.id_column or cfg.id_column, own.id_column is not None)


def read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column in required:
            if column not in columns:
                close = difflib.get_close_matches(column, columns, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(f"{path}: missing column {column!r}{hint}; columns found: {', '.join(columns) or 'none'}")
        return list(reader)


def _check_images_exist(paths: list[Path], where: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{where}: image file not found: {missing[0]}{more}")


def encode_classes(labels: list[str], classes: list[str], where: str) -> list[int]:
    """Class indices of `labels`; a label outside `classes` is a DataError naming its row."""
    index = {c: i for i, c in enumerate(classes)}
    for row, label in enumerate(labels):
        if label not in index:
            raise DataError(
                f"{where}: row {row + 1} has label {label!r}, which is not one of the "
                f"{len(classes)} classes ({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})"
            )
    return [index[label] for label in labels]


def sorted_labels(labels: list[str]) -> list[str]:
    """Unique labels, numerically sorted when all are integers (so "10" comes after "9")."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _csv_split(cfg: DataConfig, source: SplitSource, labelled: bool, columns: list[str] | None = None,
               query: str | None = None):
    """(image paths, label columns, ids, groups) of one table. The test split's ids are its id column (the submission
    echoes them: unique); a labelled row's id is its id column when the table has one, else its image path relative to
    the image root. Groups: data.group_column of a labelled table (None without it)."""
    path = source.table
    columns = columns or [cfg.label_column]
    named_id = [source.id_column] if not labelled or source.id_named else []
    required = [source.image_column] + (columns if labelled else []) + named_id + ([query] if query else [])
    rows = read_csv(path, required)
    if not rows:
        raise DataError(f"{path}: no rows")
    paths = [source.image_root / row[source.image_column] for row in rows]
    _check_images_exist(paths, str(path))
    labels = {c: [row[c] for row in rows] for c in columns} if labelled else {}
    if query:
        labels[query] = [row[query] for row in rows]
    if source.id_column in rows[0]:
        ids = [row[source.id_column] for row in rows]
    else:
        ids = [row[source.image_column] for row in rows]
    if not labelled:
        _check_unique(ids, f"{path}: column {source.id_column!r}")
    groups = _groups(cfg, rows, source, path) if labelled and cfg.group_column else None
    return paths, labels, ids, groups


def _check_unique(ids: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for row, value in enumerate(ids, 1):
        if value in seen:
            raise DataError(f"{where} has duplicate ids: {value!r} on rows {seen[value]} and {row}; the submission needs "
                            f"one row per id")
        seen[value] = row


def _groups(cfg: DataConfig, rows: list[dict[str, str]], source: SplitSource, path: Path) -> list[str]:
    """Each row's data.group_column value: the column's, or (`parent_dir`) the folder of its image path."""
    column = cfg.group_column
    if column in rows[0]:
        return [row[column] for row in rows]
    if column == "parent_dir":
        return [str(Path(row[source.image_column]).parent) for row in rows]
    close = difflib.get_close_matches(column, list(rows[0]), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"{path}: data.group_column {column!r} is not a column{hint}; columns found: {', '.join(rows[0])} "
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
    source = split_source(cfg, name)
    groups = None
    if cfg.source == "folder":
        paths, labels, ids = _folder_split(cfg, source, labelled)
    else:
        paths, labels, ids, groups = _csv_split(cfg, source, labelled, columns, query)
    return Records(paths, [], ids, labels if labelled else None, labels.pop(query) if query else None, groups)


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of row ids in their order: what a file computed for some rows (a fold's predictions, a teacher's outputs)
    records, so that it is refused for other rows."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()

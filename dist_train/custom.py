"""Your own parts in the same loop: a model, loss or datasets given to Trainer, or built by model.file / loss.file / data.file.

Nothing is looked up by name: a file named in the config is imported and must define the one builder
function its key documents (config.py); an object given to `dist_train.Trainer` is used as it is. Both
end up here, held to what the loop needs: items (image, target, index), one loss per sample.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dist_train.config import DataConfig
from dist_train.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
_modules: dict[Path, object] = {}


def load_function(path: str, name: str, key: str):
    """Function `name` of the Python file `path` (the value of config key `key`), imported once per process."""
    file = Path(path).resolve()
    if file not in _modules:
        if not file.is_file():
            raise ConfigError(f"{key}: file not found: {file}")
        # A name of its own per file: registered in sys.modules so that dataclasses and pickling inside it work.
        module_name = f"dist_train_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{key}: {file} is not a Python file (.py)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)  # an error in the user's code keeps its own traceback
        except BaseException:
            del sys.modules[module_name]
            raise
        _modules[file] = module
    function = getattr(_modules[file], name, None)
    if not callable(function):
        raise ConfigError(f"{key}: {file} defines no function {name}() (expected: {EXPECTED[name]})")
    return function


EXPECTED = {
    "build_model": "build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module",
    "build_loss": "build_loss(cfg: LossConfig, num_classes: int) -> nn.Module returning one loss per sample",
    "build_dataset": "build_dataset(cfg: DataConfig, split: str) -> Dataset, split in train/val/test",
}


# ----------------------------------------------------------------------------------------------
# datasets


class IndexedDataset(Dataset):
    """A user's dataset as the loop reads it: items (image, target, index into the split), at most `limit`.

    The user's items may be (image, target) (the index is added: the loop checks with it that every
    sample is predicted exactly once), (image, target, index), or an image alone (test split: target -1).
    """

    def __init__(self, dataset, split: str, limit: int | None = None):
        self.dataset, self.split = dataset, split
        self.length = len(dataset) if limit is None else min(limit, len(dataset))

    def head(self, count: int) -> IndexedDataset:
        """The first `count` items only (train.py --debug)."""
        return IndexedDataset(self.dataset, self.split, min(count, self.length))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, torch.Tensor):
            return item, -1, index
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return item[0], item[1], index
        if isinstance(item, (tuple, list)) and len(item) == 3:
            return tuple(item)
        got = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise DataError(f"{self.split} dataset {type(self.dataset).__name__}: item {index} is {got}; expected "
                        f"(image tensor, target), (image, target, index) or, for test, an image tensor")

    def set_epoch(self, epoch: int) -> None:
        """Passed on when the user's dataset has it (its augmentation may depend on the epoch). Persistent loader
        workers hold copies of the dataset: they see the epoch only if it lives in shared memory (a tensor after
        .share_memory_(), as in data.ImageDataset)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def row_ids(self) -> list[str]:
        """The submission ids: the dataset's `ids` attribute, else the row index."""
        ids = getattr(self.dataset, "ids", None)
        if ids is None:
            return [str(i) for i in range(len(self))]
        if len(ids) < len(self):
            raise DataError(f"{self.split} dataset {type(self.dataset).__name__}: {len(ids)} ids for {len(self.dataset)} items")
        return [str(i) for i in list(ids)[:len(self)]]


def user_datasets(cfg: DataConfig, given: dict[str, object | None]) -> dict[str, IndexedDataset] | None:
    """The splits in `given` as the user brings them: the objects given, else data.file's build_dataset(cfg, split).

    None when the user brings none (no object and no data.file): the built-in datasets serve.
    """
    if cfg.file is None and all(dataset is None for dataset in given.values()):
        return None
    if cfg.balanced_sampler:
        raise ConfigError("data.balanced_sampler draws by the built-in dataset's targets; with your own dataset "
                          "(Trainer's datasets or data.file) set it to false and balance the classes in the dataset")
    if cfg.decode == "device":
        raise ConfigError("data.decode=device decodes the built-in dataset's JPEG files; with your own dataset "
                          "(Trainer's datasets or data.file) use data.decode=workers")
    datasets = {}
    for split, dataset in given.items():
        if dataset is None:
            if cfg.file is None:
                other = next(s for s, d in given.items() if d is not None)
                raise ConfigError(f"a {other} dataset was given but no {split} dataset: give both, or set data.file")
            dataset = load_function(cfg.file, "build_dataset", "data.file")(cfg, split)
            where = f"data.file {cfg.file}: build_dataset(cfg, {split!r})"
        else:
            where = f"the {split} dataset given"
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(f"{where} ({type(dataset).__name__}) is not a map-style Dataset (__getitem__ and __len__)")
        if len(dataset) == 0:
            raise DataError(f"{where} is empty")
        datasets[split] = IndexedDataset(dataset, split)
    return datasets


def class_names(dataset: IndexedDataset, num_classes: int | None) -> list[str]:
    """The training dataset's `classes` attribute, else `model.num_classes` classes named 0..N-1."""
    classes = getattr(dataset.dataset, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    if num_classes is None:
        raise ConfigError(f"the train dataset ({type(dataset.dataset).__name__}) has no `classes` attribute: give it "
                          f"one (a list of class names) or set model.num_classes")
    return [str(i) for i in range(num_classes)]


# ----------------------------------------------------------------------------------------------
# losses


class PerSampleLoss(nn.Module):
    """A user's loss held to the loop's contract: (logits, targets) -> one loss per sample, shape (N,).

    The loop weighs and averages the per-sample losses itself (padding repeats count 0, each optimizer step
    is normalised once by its real sample count), so a loss that reduces would be averaged wrongly: a
    `reduction` attribute (torch's losses) is set to "none", and any other shape is refused.
    """

    def __init__(self, loss, where: str):
        super().__init__()
        if not callable(loss):
            raise ConfigError(f"{where} ({type(loss).__name__}) is not a loss module")
        if hasattr(loss, "reduction"):
            loss.reduction = "none"
        self.loss, self.where = loss, where

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.loss(logits, targets)
        if not isinstance(losses, torch.Tensor) or losses.shape != (len(targets),):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(f"{self.where} returned {shape} for a batch of {len(targets)}; it must return one loss "
                              f"per sample, shape ({len(targets)},) (reduction='none')")
        return losses

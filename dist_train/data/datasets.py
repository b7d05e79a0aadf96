"""Datasets over Records: images decoded and transformed (on the CPU, or left encoded for the device), their targets,
and the model's input."""

from __future__ import annotations

import difflib
import io
import sys

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dist_train.config import DataConfig
from dist_train.data.decode import (
    BAD_TARGET,
    JPEG_SUFFIXES,
    DeviceDecoder,
    center_crop_box,
    random_resized_crop_box,
)
from dist_train.data.tables import Records
from dist_train.errors import ConfigError, SampleError


def as_target(value):
    """A record's target as the loader collates it: a tensor (Records hold them so) as it is; ints stay ints, tuples and
    floats become tensors."""
    if isinstance(value, (int, torch.Tensor)):
        return value
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    return torch.tensor(value, dtype=torch.long if all(isinstance(v, int) for v in value) else torch.float32)


def _bad(target):
    """The target of an unreadable sample (data.bad_samples=skip): BAD_TARGET, shaped as the readable ones."""
    return torch.full_like(target, BAD_TARGET) if isinstance(target, torch.Tensor) else BAD_TARGET


class ImageDataset(Dataset):
    """Loads `records` one image at a time; yields (image, target, index into the split).

    The random augmentation of a sample is a function of (seed, epoch, index) only, drawn from a
    private RNG: the same whatever the number of processes or workers, and after a resume in the
    middle of an epoch. The epoch lives in shared memory so that persistent workers see set_epoch.
    An unreadable image (truncated, empty, not an image) raises a SampleError naming the file, or
    with bad_samples="skip" becomes a blank image with target BAD_TARGET, which weighs nothing.
    """

    def __init__(self, records: Records, transform, channels: int, seed: int = 0, split: str = "train",
                 bad_samples: str = "error", image_size: int = 32):
        self.records = records
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"
        self.seed = seed
        self.split = split
        self.bad_samples = bad_samples
        self.image_size = image_size
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.records.paths)

    def source(self, index: int):
        """(what Image.open reads: the file, or a shard's bytes; how messages name it)."""
        if self.records.shards is None:
            path = self.records.paths[index]
            return path, path
        row = int(self.records.rows[index])
        return io.BytesIO(self.records.shards.read(row)), self.records.shards.describe(row)

    def __getitem__(self, index: int):
        (file, path), target = self.source(index), as_target(self.records.targets[index])
        try:
            with Image.open(file) as image:
                image = image.convert(self.mode)
        except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for truncated or foreign bytes
            where = f"{self.split} sample {index}: cannot read image {path} ({type(exc).__name__}: {exc})"
            if self.bad_samples == "error":
                raise SampleError(f"{where}; fix or remove it, or set data.bad_samples=skip") from None
            print(f"warning: {where}; skipped (data.bad_samples=skip)", file=sys.stderr, flush=True)
            image, target = Image.new(self.mode, (self.image_size, self.image_size)), _bad(target)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.sample_seed(index))  # torch.manual_seed costs ~70 us (all backends)
            return self.transform(image), target, index

    def sample_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + int(self.epoch)) * 10_000_019 + index


class EncodedImageDataset(ImageDataset):
    """For data.decode=device: yields the file's bytes with the sample's crop box and flip (drawn from the
    same per-sample RNG as ImageDataset); decode.DeviceDecoder does the rest on the accelerator.

    `crop`: "resize" (the whole image), "random_resized_crop" (training) or "center" (evaluation after a
    random-resized-crop training); `flip_p`: probability of a left-right flip.
    """

    def __init__(self, records: Records, cfg: DataConfig, crop: str, flip_p: float, seed: int = 0, split: str = "train"):
        super().__init__(records, None, cfg.channels, seed, split, cfg.bad_samples, cfg.image_size)
        self.crop, self.flip_p = crop, flip_p
        self.scale, self.ratio, self.center_fraction = tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.eval_crop_fraction

    def __getitem__(self, index: int):
        (file, path), target = self.source(index), as_target(self.records.targets[index])
        try:
            with Image.open(file) as image:  # reads the header only: the size, and a first check of the file
                width, height = image.size
            data = torch.frombuffer(bytearray(file.getvalue() if isinstance(file, io.BytesIO) else file.read_bytes()),
                                    dtype=torch.uint8)
        except (OSError, SyntaxError, ValueError) as exc:
            where = f"{self.split} sample {index}: cannot read image {path} ({type(exc).__name__}: {exc})"
            if self.bad_samples == "error":
                raise SampleError(f"{where}; fix or remove it, or set data.bad_samples=skip") from None
            print(f"warning: {where}; skipped (data.bad_samples=skip)", file=sys.stderr, flush=True)
            data, width, height, target = torch.empty(0, dtype=torch.uint8), self.image_size, self.image_size, _bad(target)
        generator = torch.Generator().manual_seed(self.sample_seed(index))
        if self.crop == "random_resized_crop":
            box = random_resized_crop_box(width, height, self.scale, self.ratio, generator)
        elif self.crop == "center":
            box = center_crop_box(width, height, self.center_fraction)
        else:
            box = (0.0, 0.0, float(width), float(height))
        flip = self.flip_p > 0 and bool(torch.rand((), generator=generator) < self.flip_p)
        return {"data": data, "box": box, "flip": flip, "path": str(path)}, target, index


def build_transform(cfg: DataConfig, train: bool):
    size = cfg.image_size
    if cfg.train_crop == "resize":
        steps = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    elif train:
        steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True)]
    else:
        steps = [v2.ToImage(), v2.Resize(round(size / cfg.eval_crop_fraction), antialias=True), v2.CenterCrop(size)]
    if train:
        steps += [_augmentation(spec, i) for i, spec in enumerate(cfg.train_augment)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


def _augmentation(spec: dict, i: int):
    kwargs = dict(spec)
    name = kwargs.pop("name")
    cls = getattr(v2, str(name), None)
    if not isinstance(cls, type):
        names = [n for n in dir(v2) if n[:1].isupper()]
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"data.train_augment[{i}]: {name!r} is not a torchvision.transforms.v2 transform{hint}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.train_augment[{i}] ({name}): {exc}") from None


DEVICE_AUGMENTATIONS = {"RandomHorizontalFlip"}
"""The train_augment transforms data.decode=device does itself."""


def decodes_on_device(cfg: DataConfig, device: torch.device, splits: list[Records]) -> bool:
    """data.decode resolved: auto decodes on the device when it is a GPU, every image is a JPEG and the
    augmentations are ones the device path does; otherwise the loader workers decode (Pillow)."""
    if cfg.decode == "workers":
        return False
    unsupported = [str(spec.get("name")) for spec in cfg.train_augment if spec.get("name") not in DEVICE_AUGMENTATIONS]
    other = next(filter(None, (records.paths.first_without_suffix(JPEG_SUFFIXES) for records in splits)), None)
    if cfg.decode == "device":
        if unsupported:
            raise ConfigError(f"data.decode=device does the crop, {', '.join(sorted(DEVICE_AUGMENTATIONS))} and normalisation "
                              f"itself; data.train_augment {', '.join(unsupported)} needs data.decode=workers")
        if other is not None:
            raise ConfigError(f"data.decode=device decodes JPEG files only; {other} is not one (use data.decode=workers)")
        return True
    return device.type == "cuda" and not unsupported and other is None


def build_dataset(records: Records, cfg: DataConfig, split: str, seed: int, on_device: bool = False) -> ImageDataset:
    """The split's dataset: decoded and augmented by the loader workers, or (on_device) bytes + crop boxes."""
    train = split == "train"
    if not on_device:
        return ImageDataset(records, build_transform(cfg, train), cfg.channels, seed, split, cfg.bad_samples, cfg.image_size)
    crop = cfg.train_crop if train or cfg.train_crop == "resize" else "center"
    flips = [spec.get("p", 0.5) for spec in cfg.train_augment if spec.get("name") == "RandomHorizontalFlip"] if train else []
    return EncodedImageDataset(records, cfg, crop, float(flips[0]) if flips else 0.0, seed, split)


class ModelInput:
    """What the loop does to a batch's images before the model: decode them on the device (data.decode=device),
    cast to the dtype DeepSpeed keeps the weights in, and lay them out channels_last."""

    def __init__(self, cfg: DataConfig, device: torch.device, on_device: bool, dtype: torch.dtype, channels_last: bool):
        self.decoder = DeviceDecoder(device, cfg.image_size, cfg.channels, cfg.mean, cfg.std, cfg.bad_samples) if on_device else None
        self.dtype, self.channels_last = dtype, channels_last

    def __call__(self, images, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoder is not None:
            images, targets = self.decoder(images, targets)
        images = images.to(self.dtype)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

"""Decoding JPEGs on the accelerator: workers read bytes and draw crops, the device decodes and augments.

At thousands of images per second the CPU cannot decode full-size JPEGs and crop them (Pillow does
roughly 400-800 per core per second). With `data.decode=device` the loader workers only read the
file bytes, the image size (from the header) and each sample's random crop box and flip, drawn from
the same per-sample RNG as the CPU path; the main process decodes the whole batch with
`torchvision.io.decode_jpeg(..., device=...)` (nvJPEG on CUDA) and does crop + resize of all images
in one `roi_align` call (bilinear, averaging ceil(box / output) samples per output pixel, which
anti-aliases a downscale), then flip and normalisation, all on the device.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torchvision
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode
from torchvision.ops import roi_align

from dist_train.errors import SampleError

BAD_TARGET = -2
"""The target of an unreadable image skipped under data.bad_samples=skip (-1 marks unlabelled test rows)."""
JPEG_SUFFIXES = {".jpg", ".jpeg"}


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box (x0, y0, x1, y1): ten tries at a random area and aspect
    ratio, then the centre crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            x = int(u[2] * (width - w + 1))
            y = int(u[3] * (height - h + 1))
            return float(x), float(y), float(x + w), float(y + h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return float(x), float(y), float(x + w), float(y + h)


def center_crop_box(width: int, height: int, fraction: float) -> tuple[float, float, float, float]:
    """The square centre crop that Resize(size / fraction) + CenterCrop(size) keeps, in source pixels."""
    side = min(width, height) * fraction
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


@dataclass
class EncodedBatch:
    """A batch of undecoded images. Has no `.to()`: Accelerate's device placement leaves it on the host,
    where nvJPEG reads it."""

    data: list[torch.Tensor]
    """The files' bytes (uint8, 1-D); empty for an unreadable file under data.bad_samples=skip."""
    boxes: torch.Tensor
    """(N, 4) float crop boxes x0, y0, x1, y1 in source pixels."""
    flips: torch.Tensor
    """(N,) bool: mirror left-right."""
    paths: list[str]

    def __len__(self) -> int:
        return len(self.data)

    def pin_memory(self) -> "EncodedBatch":
        # boxes and flips too: a non_blocking copy from pageable memory first waits for the stream's queued
        # work, which would stall the host once per step behind the previous step's kernels
        return EncodedBatch([d.pin_memory() for d in self.data], self.boxes.pin_memory(), self.flips.pin_memory(), self.paths)


def collate_encoded(samples: list) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """(sample dict, target, index) triples into (EncodedBatch, targets, indices)."""
    encoded = [s[0] for s in samples]
    batch = EncodedBatch(
        data=[e["data"] for e in encoded],
        boxes=torch.tensor([e["box"] for e in encoded], dtype=torch.float32),
        flips=torch.tensor([e["flip"] for e in encoded], dtype=torch.bool),
        paths=[e["path"] for e in encoded],
    )
    return batch, default_collate([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


class DeviceDecoder:
    """Turns an EncodedBatch into the model's normalised input on `device`."""

    def __init__(self, device: torch.device, image_size: int, channels: int, mean, std, bad_samples: str = "error"):
        self.device = device
        self.size = image_size
        self.channels = channels
        self.mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        self.scale = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
        # roi_align works in half precision on CUDA (uint8 values are exact in it), float32 on CPU
        self.work_dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.bad_samples = bad_samples

    def decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor], list[int]]:
        """Decoded CHW uint8 images (a blank one for each unreadable file) and the positions of those."""
        readable = [i for i, d in enumerate(batch.data) if d.numel() > 0]
        images: list[torch.Tensor | None] = [None] * len(batch)
        try:
            decoded = torchvision.io.decode_jpeg([batch.data[i] for i in readable], mode=self.mode, device=self.device)
            for i, image in zip(readable, decoded):
                images[i] = image
        except RuntimeError:  # one corrupt file fails the whole batch: find it
            for i in readable:
                try:
                    images[i] = torchvision.io.decode_jpeg(batch.data[i], mode=self.mode, device=self.device)
                except RuntimeError as exc:
                    where = f"cannot decode image {batch.paths[i]} ({str(exc).splitlines()[0]})"
                    if self.bad_samples == "error":
                        raise SampleError(f"{where}; fix or remove it, or set data.bad_samples=skip") from None
                    print(f"warning: {where}; skipped (data.bad_samples=skip)", file=sys.stderr, flush=True)
        bad = [i for i, image in enumerate(images) if image is None]
        blank = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8, device=self.device)
        return [blank if image is None else image for image in images], bad

    def __call__(self, batch: EncodedBatch, targets: torch.Tensor | None = None):
        images, bad = self.decode(batch)
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        canvas = torch.zeros(len(images), self.channels, height, width, dtype=self.work_dtype, device=self.device)
        for k, image in enumerate(images):
            canvas[k, :, : image.shape[1], : image.shape[2]] = image
        boxes = batch.boxes.to(self.device, non_blocking=True)
        if bad:
            boxes[bad] = torch.tensor([0.0, 0.0, self.size, self.size], device=self.device)
        rois = torch.cat([torch.arange(len(images), device=self.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
        out = roi_align(canvas, rois.to(self.work_dtype), (self.size, self.size), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True)
        flips = batch.flips.to(self.device, non_blocking=True)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
        out = (out.float() - self.scale) * self.inv_std
        if targets is not None and bad:
            targets = targets.clone()
            targets[bad] = BAD_TARGET
        return out, targets

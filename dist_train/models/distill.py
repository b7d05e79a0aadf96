"""Knowledge distillation: the loss against a teacher's outputs, and where the loop gets them -- the teacher's outputs
on the training table cached once in the run directory (keyed by row id, with the teacher's fingerprint), or the
teacher itself run on each batch (distill.live).

    loss = alpha * task loss + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per sample; multihead: the KL term of each head (softmax over its own classes), weighted as its task loss is;
multilabel: each class a sigmoid, the KL of the teacher's Bernoulli to the student's, averaged over the classes (its
gradient is binary cross-entropy's against the teacher's probabilities at temperature T).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dist_train.config import DataConfig, DistillConfig, config_from_dict
from dist_train.data.columns import Column
from dist_train.data.tables import ids_digest
from dist_train.errors import ConfigError, DataError
from dist_train.models.networks import read_weights, trained_network
from dist_train.models.tasks import Task, build_task

TEACHER_CACHE = "teacher_logits.safetensors"
"""In the run directory: the teacher's outputs on every row of the training table."""
TEACHER_SPEC = "teacher.json"
"""In the run directory, with distill.live: the teacher's weights files, config, classes and fingerprint."""


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float, sizes: list[int],
                  weights: list[float]) -> torch.Tensor:
    """Per sample: T^2 * sum over heads of weight * KL(softmax(teacher_h / T) || softmax(student_h / T)). `sizes`: each
    head's number of outputs (one head: [classes]); the T^2 keeps the gradient's scale as T changes (Hinton et al.)."""
    total = torch.zeros(len(student), dtype=torch.float32, device=student.device)
    for s, t, weight in zip(torch.split(student.float(), sizes, 1), torch.split(teacher.float(), sizes, 1), weights):
        log_q = F.log_softmax(s / temperature, dim=1)
        log_p = F.log_softmax(t / temperature, dim=1)
        total = total + weight * (log_p.exp() * (log_p - log_q)).sum(1)
    return temperature * temperature * total


def binary_kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample: T^2 * the mean over classes of KL(Bernoulli(sigmoid(teacher / T)) || Bernoulli(sigmoid(student / T))):
    binary cross-entropy against the teacher's probabilities less their entropy, so 0 where the two agree."""
    s, t = student.float() / temperature, teacher.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1.0 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return temperature * temperature * kl.mean(1)


class Distillation:
    """The teacher's side of the loss in the loop: `targets(indices, images)` gives the teacher's outputs for a batch
    (from the cached outputs, indexed by the rows' positions in the training split, or from the live teacher on the
    images as the student sees them), `loss(task_losses, student, teacher)` mixes them into the per-sample loss."""

    def __init__(self, cfg: DistillConfig, sizes: list[int], weights: list[float], cached: torch.Tensor | None = None,
                 teacher: nn.Module | None = None, binary: bool = False):
        self.alpha, self.temperature = cfg.alpha, cfg.temperature
        self.sizes, self.weights, self.binary = sizes, weights, binary
        self.cached, self.teacher = cached, teacher
        self.describe: dict = {}
        """What run_info.json says of the teacher (loop/build.py fills it in)."""

    @torch.no_grad()
    def targets(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[indices.to(self.cached.device)]
        self.teacher.eval()
        return self.teacher(images).float()

    def loss(self, task_losses: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        kd = (binary_kl_to_teacher(student, teacher, self.temperature) if self.binary else
              kl_to_teacher(student, teacher, self.temperature, self.sizes, self.weights))
        return self.alpha * task_losses + (1.0 - self.alpha) * kd


def heads_of(task) -> tuple[list[int], list[float]]:
    """The output sizes and loss weights the KL term is split by: the heads of a multihead task, else one."""
    if task.kind == "multihead":
        return list(task.sizes), [h.weight for h in task.heads]
    return [task.num_outputs], [1.0]


def write_cache(path: Path, outputs: torch.Tensor, ids: list[str], fingerprint: str, describe: dict) -> None:
    """The teacher's outputs (rows x outputs, float32) of the rows `ids`, with the teacher's fingerprint and the ids'
    digest (what a later run checks), and what the teacher was (`describe`, for people)."""
    encoded = torch.frombuffer(bytearray("\n".join(ids).encode()), dtype=torch.uint8)
    metadata = {"fingerprint": fingerprint, "ids_sha256": ids_digest(ids), "rows": str(len(ids)),
                "teacher": json.dumps(describe)}
    save_file({"outputs": outputs.float().contiguous(), "ids": encoded}, str(path), metadata=metadata)


def cache_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def read_cache(path: Path, ids: list[str], device: torch.device) -> torch.Tensor:
    """The cached outputs of the rows `ids` (in that order) on `device`; a row the cache lacks is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"distill.teacher: no cached teacher outputs at {path}: train.py and Trainer.fit compute them "
                        f"before training (or dist_train.commands.distill.prepare_teacher(config))")
    saved = load_file(str(path))
    ids = Column.of(ids)
    saved_ids = pa.array(bytes(saved["ids"].numpy()).decode().split("\n"), pa.string())
    position = pc.index_in(ids.arrow(), value_set=saved_ids)  # each row's place in the cache, by id
    if position.null_count:
        first = ids[pc.index(pc.is_null(position), True).as_py()]
        raise DataError(f"{path} holds the teacher's outputs of another training table: {position.null_count} training rows "
                        f"are not in it (e.g. {first!r}); start afresh with --overwrite to compute them again")
    return saved["outputs"][torch.from_numpy(position.to_numpy(zero_copy_only=False).astype("int64"))].to(device)


class LiveTeacher(nn.Module):
    """distill.live: the teacher run on each training batch as the student sees it. The images are brought from the
    student's preprocessing to the teacher's -- un-normalised, resized (bilinear, antialiased) to its image size,
    normalised with its mean and std -- and its networks' outputs averaged by the task (an ensemble), each with its
    test-time augmentation (hflip: the image and its mirror image)."""

    def __init__(self, networks: list[nn.Module], task: Task, tta: str, student: DataConfig, teacher: DataConfig):
        super().__init__()
        self.networks, self.task, self.tta, self.size = nn.ModuleList(networks), task, tta, teacher.image_size
        for name, values in (("student_mean", student.mean), ("student_std", student.std), ("teacher_mean", teacher.mean),
                             ("teacher_std", teacher.std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() * self.student_std + self.student_mean
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = (pixels - self.teacher_mean) / self.teacher_std
        outputs = []
        for network in self.networks:
            out = network(x)
            outputs.append(self.task.average([out, network(x.flip(-1))]) if self.tta == "hflip" else out)
        return outputs[0] if len(outputs) == 1 else self.task.average(outputs)


def live_teacher(spec: dict, student: DataConfig, device: torch.device) -> LiveTeacher:
    """The teacher that teacher.json (commands/distill.py) describes, on `device`, in eval mode, never trained."""
    config = config_from_dict(spec["config"])
    if config.data.channels != student.channels:
        raise ConfigError(f"distill.live: the teacher sees {config.data.channels}-channel images, the student "
                          f"{student.channels}: the live teacher takes the student's batches as they are")
    task = build_task(config, spec["labels"])
    networks = []
    for path in spec["weights"]:
        network = trained_network(config.model, task.num_outputs, config.data.channels, config.data.image_size,
                                  read_weights(path))
        networks.append(network.requires_grad_(False))
    return LiveTeacher(networks, task, config.inference.tta, student, config.data).to(device).eval()

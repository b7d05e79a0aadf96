"""Build a classifier: torchvision or timm models by name or a small CNN, local pretrained weights, head size,
freezing, gradient checkpointing."""
from __future__ import annotations

import contextlib
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_train.config import ModelConfig, check_model_name
from dist_train.custom import load_function
from dist_train.errors import CheckpointError, ConfigError
from dist_train.models import timm_backbones


class SpatialMean(nn.Module):
    """Global average pooling as a mean over height and width: AdaptiveAvgPool2d(1)'s numbers (bitwise, on CPU),
    with a backward that CUDA computes deterministically (AdaptiveAvgPool2d's refuses train.deterministic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: enough for 8x8-32x32 images such as the digits."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            SpatialMean(),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


class MLP(nn.Module):
    """Flatten, one hidden layer, a linear head: no normalisation, so results do not depend on batch split."""

    def __init__(self, num_classes: int, in_features: int, width: int = 32, dropout: float = 0.0):
        super().__init__()
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.hidden(x)))


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int = 32,
                given: nn.Module | None = None) -> nn.Module:
    """The network named by `cfg.name` with a `num_classes` head, pretrained weights loaded, prefixes frozen.

    `given` (a model given to Trainer) or cfg.file's build_model(...) takes the place of the named network.
    """
    arch = timm_backbones.timm_name(cfg.name) if given is None and cfg.file is None else None
    if given is not None or cfg.file is not None:
        model = given if given is not None else load_function(cfg.file, "build_model", "model.file")(
            cfg, num_classes, in_channels, image_size)
        if not isinstance(model, nn.Module):
            where = "the model given" if given is not None else f"model.file {cfg.file}: build_model(...)"
            raise ConfigError(f"{where} ({type(model).__name__}) is not a torch.nn.Module")
    elif arch is not None:
        state = read_weights(timm_backbones.weights_file(cfg.pretrained)) if cfg.pretrained else None
        model = timm_backbones.create(arch, num_classes, in_channels, image_size, cfg.dropout, cfg.drop_path_rate,
                                      cfg.pretrained, state)
    elif cfg.name in ("small_cnn", "mlp"):
        if cfg.drop_path_rate is not None:
            raise ConfigError(f"model.drop_path_rate: {cfg.name} has no stochastic depth")
        model = (SmallCNN(num_classes, in_channels, width=cfg.width, dropout=cfg.dropout) if cfg.name == "small_cnn" else
                 MLP(num_classes, in_channels * image_size * image_size, width=cfg.width, dropout=cfg.dropout))
    else:
        model = torchvision_model(cfg, num_classes, in_channels)
    if cfg.pretrained and arch is None:
        load_pretrained(model, timm_backbones.weights_file(cfg.pretrained))
    if cfg.freeze:
        freeze(model, cfg.freeze)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.name if given is None and cfg.file is None else type(model).__name__)
    return model


def trained_network(cfg: ModelConfig, num_outputs: int, in_channels: int, image_size: int, state: dict[str, torch.Tensor],
                    given: nn.Module | None = None) -> nn.Module:
    """A trained network rebuilt for inference (or averaging): the architecture of `cfg` (or `given`) without pretrained
    weights, freezing or gradient checkpointing, `state` loaded into it."""
    network = build_model(replace(cfg, pretrained=None, freeze=[], grad_checkpointing=False), num_outputs, in_channels,
                          image_size, given=given)
    network.load_state_dict(state)
    return network


def torchvision_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    check_model_name(cfg.name)
    if in_channels != 3:
        raise ConfigError(f"model.name={cfg.name} expects 3-channel images; set data.channels=3")
    extra = {"stochastic_depth_prob": cfg.drop_path_rate} if cfg.drop_path_rate is not None else {}
    try:
        return torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes, **extra)
    except TypeError:
        if not extra:
            raise
        raise ConfigError(f"model.drop_path_rate: torchvision's {cfg.name} has no stochastic depth "
                          f"(efficientnet, convnext, swin and maxvit have)") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a weights-only torch file; pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch.save's): refused below, naming what it imports
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        found = ", ".join(pickled_globals(path)) or "unsupported pickle content"
        raise CheckpointError(f"{path}: refused to load, it holds more than weights (it would import: {found})") from None
    except Exception as exc:  # a corrupt or foreign file: name it instead of a deep traceback
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def pickled_globals(path: Path, allowed: tuple[str, ...] = ("torch.", "collections.OrderedDict", "numpy.")) -> list[str]:
    """The `module.name` globals a pickle (raw, or inside a torch zip file) would import, read without running it."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            data = archive.read(member) if member else b""
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a truncated pickle: report what was read so far
        pass
    return sorted({g for g in found if not g.startswith(allowed)})


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load matching weights; tensors whose shape differs (the old head) are skipped and returned.

    Any other missing or unexpected key is an error: a silently half-loaded backbone is worse than none.
    """
    state = read_weights(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    return skipped


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Set requires_grad=False on parameters whose name starts with a prefix; returns how many."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ConfigError(f"model.freeze: no parameter name starts with {prefix!r} (e.g. {', '.join(names[:4])})")
    frozen = 0
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            param.requires_grad_(False)
            frozen += 1
    if frozen == len(names):
        raise ConfigError("model.freeze froze every parameter: nothing would train")
    return frozen


CHECKPOINTED_BLOCKS = {
    ("resnet", "resnext", "wide_resnet"): ("layer1", "layer2", "layer3", "layer4"),
    ("efficientnet", "mobilenet", "convnext", "swin", "small_cnn"): ("features",),
    ("regnet",): ("trunk_output",),
    ("vit_",): ("encoder.layers",),
}
"""torchvision families (name prefixes) -> their nn.Sequential stages of blocks, each block of which
enable_grad_checkpointing recomputes. Only families whose body is such a sequence: there a block's input is all it
needs, so recomputing block by block is exact (other families, e.g. densenet, inception, vgg, are refused)."""


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """Activations recomputed in backward: timm's set_grad_checkpointing (any model with that method), else the
    blocks of torchvision's stages in CHECKPOINTED_BLOCKS; any other model is refused, naming it."""
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as exc:  # what timm's models without support raise
            raise ConfigError(f"model.grad_checkpointing: {name} does not support gradient checkpointing ({exc})") from None
        return
    stages = next((paths for prefixes, paths in CHECKPOINTED_BLOCKS.items() if name.startswith(prefixes)), None)
    if stages is None:
        raise ConfigError(f"model.grad_checkpointing: not available for {name} (timm's models, torchvision's resnet/"
                          f"resnext/wide_resnet, efficientnet, mobilenet, convnext, regnet, swin, vit families and "
                          f"small_cnn have it; a model of your own can define set_grad_checkpointing(enable))")
    for path in stages:
        stage = model.get_submodule(path)
        if type(stage) is not nn.Sequential:
            raise ConfigError(f"model.grad_checkpointing: {name}.{path} is a {type(stage).__name__}, not the "
                              f"nn.Sequential of blocks expected")
        # The class changes, the module and its state_dict keys do not (weights and checkpoints stay compatible).
        stage.__class__ = CheckpointedSequential


class CheckpointedSequential(nn.Sequential):
    """An nn.Sequential whose blocks keep only their inputs in training and recompute the rest in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        for block in self:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda block=block: (contextlib.nullcontext(), _running_stats_kept(block)))
        return x


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """During a recomputation, BatchNorm layers normalise with the batch's statistics as in forward but leave their
    running statistics as forward left them (else every step would update them twice)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen

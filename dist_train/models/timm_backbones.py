"""timm backbones (`model.name: timm/<name>`): built by timm.create_model, local weights loaded by timm's own loader.

timm is imported only when a timm model is asked for (it takes a second to import). Nothing is ever downloaded:
the weights come from the file `model.pretrained` names, read by models.read_weights (which refuses pickled
code), and are handed to timm as a state dict, so that timm's per-model filter (position embeddings resampled
to another input size, say), its input-channel adaptation and its head replacement all apply.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dist_train.config.pretrained import (  # noqa: F401 (read as timm_backbones.* too)
    PREFIX,
    WEIGHT_FILES,
    check_name,
    preprocessing,
    pretrained_cfg,
    timm_name,
    weights_file,
)
from dist_train.errors import CheckpointError, ConfigError


def create(arch: str, num_classes: int, in_channels: int, image_size: int, drop_rate: float = 0.0,
           drop_path_rate: float | None = None, pretrained: str | Path | None = None,
           state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """timm.create_model(arch) with our head size and input channels; `state` (read from `pretrained`) loaded by
    timm's loader. A head of another size is replaced; any other tensor that does not fit is an error."""
    import timm

    cfg, _ = pretrained_cfg(arch, pretrained if state is not None else None)
    kwargs = {"num_classes": num_classes, "in_chans": in_channels, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if cfg.get("fixed_input_size"):  # ViT-like models are built for one input size (timm resamples the weights to it)
        kwargs["img_size"] = image_size
    overlay, head = {}, _classifier_prefixes(cfg)
    if state is not None:
        rows = next((state[f"{p}weight"].shape[0] for p in head if f"{p}weight" in state), 0)
        # the state dict is the only source (never the hub); its head rows tell timm whether to replace the head
        overlay = {"state_dict": state, "num_classes": rows, "source": None}
    where = f"model.pretrained {pretrained}"
    file_keys = set(state or {})
    try:
        model = timm.create_model(arch, pretrained=state is not None, pretrained_cfg=cfg,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as exc:  # e.g. drop_path_rate for a model without stochastic depth
        raise ConfigError(f"model.name={PREFIX}{arch}: timm.create_model refused {sorted(kwargs)}: {exc}") from None
    except RuntimeError as exc:  # load_state_dict: a tensor of another shape
        raise CheckpointError(f"{where} does not fit {PREFIX}{arch}: {str(exc).strip().splitlines()[-1].strip()}") from None
    if state is not None:
        # timm loads non-strictly once it replaced the head: check that everything else was in the file
        own = model.state_dict()
        missing = [k for k in own if k not in file_keys and not k.startswith(head)]
        unexpected = [k for k in file_keys if k not in own and not k.startswith(head)]
        if missing or unexpected:
            raise CheckpointError(f"{where} does not fit {PREFIX}{arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                                  f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); dist_train loads timm's own "
                                  f"state dicts (timm.create_model(...).state_dict(), timm's cached model.safetensors)")
    return model


def _classifier_prefixes(cfg: dict) -> tuple[str, ...]:
    names = cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))

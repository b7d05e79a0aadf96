"""Models: torchvision by name with a resized head, local pretrained weights (safe loading only), freezing."""
import os
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dist_train.config import ModelConfig
from dist_train.errors import CheckpointError, ConfigError
from dist_train.models.networks import build_model, load_pretrained, parameter_counts, read_weights


def test_torchvision_model_by_name_gets_new_head():
    model = build_model(ModelConfig(name="resnet18"), num_classes=7, in_channels=3)
    assert model.fc.out_features == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_small_cnn_on_grayscale():
    model = build_model(ModelConfig(), num_classes=10, in_channels=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_unknown_model_suggests_closest():
    with pytest.raises(ConfigError, match="unknown model 'resnet81'; did you mean resnet18"):
        build_model(ModelConfig(name="resnet81"), 10, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_backbone_loads_and_old_head_is_skipped(tmp_path, suffix):
    source = torchvision.models.resnet18(num_classes=1000)  # stands in for ImageNet weights on disk
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model(ModelConfig(name="resnet18", pretrained=str(path)), num_classes=5, in_channels=3)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 5


def test_pretrained_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_pretrained(torchvision.models.resnet18(num_classes=5), path)


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/dist_train_pwned",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_with_code_is_refused_naming_the_global(tmp_path, writer):
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"weight": Exploit()}, f)
    else:
        torch.save({"weight": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load, it holds more than weights \(it would import: (posix|os)\.system\)"):
        read_weights(path)
    assert not os.path.exists("/tmp/dist_train_pwned")


def test_missing_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match="weights file not found"):
        read_weights(tmp_path / "nope.safetensors")


def test_freeze_by_prefix():
    model = build_model(ModelConfig(name="resnet18", freeze=["conv1", "bn1", "layer1"]), 4, 3)
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad and model.fc.weight.requires_grad
    trainable, frozen = parameter_counts(model)
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n.startswith(("conv1", "bn1", "layer1")))
    assert trainable + frozen == sum(p.numel() for p in model.parameters())


def test_freeze_unknown_prefix_and_everything_are_errors():
    with pytest.raises(ConfigError, match="no parameter name starts with 'backbone'"):
        build_model(ModelConfig(name="small_cnn", freeze=["backbone"]), 4, 3)
    with pytest.raises(ConfigError, match="froze every parameter"):
        build_model(ModelConfig(name="small_cnn", freeze=["features", "classifier"]), 4, 3)

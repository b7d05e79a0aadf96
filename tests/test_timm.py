"""timm backbones (timm's offline test models: test_efficientnet, test_convnext, test_vit), local timm weights and their
pretrained_cfg, layer-wise LR decay, gradient checkpointing; 2-process runs, a bitwise resume and the ONNX export."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from conftest import assert_killed, config_path, read_jsonl, run_cli, tiny_overrides
from safetensors.torch import save_file
from test_distributed import scalars
from test_tasks import HEADS, assert_each_rank, common, rows

from dist_train.commands.debug import lr_preview
from dist_train.commands.export import export, missing_packages
from dist_train.config import ModelConfig, OptimConfig, SchedulerConfig, load_config
from dist_train.data import synthetic
from dist_train.errors import CheckpointError, ConfigError
from dist_train.models.networks import build_model
from dist_train.models.optim import Schedule, build_optimizer

MODELS = {"test_efficientnet": 16, "test_convnext": 32, "test_vit": 32}
"""timm's tiny test models and a digits image size each accepts (ConvNeXt downsamples 32x; the ViT takes any size)."""


def save_timm_weights(name: str, path, **kwargs) -> torch.nn.Module:
    """What a user brings: a timm model's own state dict (ImageNet's 1000 classes, RGB), as a .safetensors file."""
    source = timm.create_model(name, **kwargs)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return source


@pytest.mark.parametrize("name", MODELS)
def test_timm_weights_load_with_another_head_every_other_tensor_equal(tmp_path, name):
    source = save_timm_weights(name, tmp_path / "w.safetensors")
    head = source.pretrained_cfg["classifier"]
    model = build_model(ModelConfig(name=f"timm/{name}", pretrained=str(tmp_path / "w.safetensors")), 7, 3, 160)
    ours, theirs = model.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    assert ours[f"{head}.weight"].shape == (7, theirs[f"{head}.weight"].shape[1])  # the head: new, of our size
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith(f"{head}."))
    # grayscale images: timm's loader sums the RGB filters of the first convolution into one
    gray = build_model(ModelConfig(name=f"timm/{name}", pretrained=str(tmp_path / "w.safetensors")), 7, 1, 160)
    first = source.pretrained_cfg["first_conv"] + ".weight"
    torch.testing.assert_close(gray.state_dict()[first], theirs[first].sum(1, keepdim=True))


def test_weights_that_do_not_fit_and_bad_names_are_errors(tmp_path):
    source = save_timm_weights("test_convnext", tmp_path / "convnext.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit timm/test_convnext2: size mismatch for head.norm.bias"):
        build_model(ModelConfig(name="timm/test_convnext2", pretrained=str(tmp_path / "convnext.safetensors")), 5, 3, 32)
    # a file without the last stage: timm alone would load the rest and only log the missing keys
    save_file({k: v for k, v in source.state_dict().items() if not k.startswith("stages.3")}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not fit timm/test_convnext: \d+ missing keys \(e.g. \['stages.3"):
        build_model(ModelConfig(name="timm/test_convnext", pretrained=str(tmp_path / "cut.safetensors")), 5, 3, 32)
    with pytest.raises(ConfigError, match="timm has no model 'test_convnxt'; did you mean timm/test_convnext"):
        build_model(ModelConfig(name="timm/test_convnxt"), 5, 3, 32)
    with pytest.raises(ConfigError, match="test_vit has no pretrained tag 'foo' .it has: r160_in1k"):
        load_config(None, ["model.name=timm/test_vit.foo", f"model.pretrained={tmp_path / 'convnext.safetensors'}"])
    with pytest.raises(ConfigError, match="model.drop_path_rate: torchvision's resnet18 has no stochastic depth"):
        build_model(ModelConfig(name="resnet18", drop_path_rate=0.1), 5, 3, 32)
    with pytest.raises(ConfigError, match="optim.layer_decay: ResNet does not name its layers"):
        build_optimizer(OptimConfig(layer_decay=0.75), build_model(ModelConfig(name="resnet18"), 5, 3, 32))
    with pytest.raises(ConfigError, match="model.grad_checkpointing: not available for squeezenet1_0"):
        build_model(ModelConfig(name="squeezenet1_0", grad_checkpointing=True), 5, 3, 32)


def test_timm_pretrained_cfg_sets_size_and_normalisation_unless_the_config_does(tmp_path):
    from timm.models._hub import save_for_hf

    save_timm_weights("test_convnext", tmp_path / "w.safetensors")
    config = load_config(None, ["model.name=timm/test_convnext", f"model.pretrained={tmp_path / 'w.safetensors'}"])
    assert (config.data.image_size, config.data.mean, config.data.std) == (160, [0.5] * 3, [0.5] * 3)
    assert set(config.data.preprocessing_from.values()) == {"timm pretrained_cfg test_convnext.r160_in1k"}
    # the folder timm caches from the hub (model.safetensors + config.json): its own pretrained_cfg wins
    source = timm.create_model("test_convnext", pretrained_cfg_overlay={"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.4),
                                                                        "input_size": (3, 96, 96)})
    save_for_hf(source, str(tmp_path / "hub"), safe_serialization=True)
    config = load_config(None, ["model.name=timm/test_convnext", f"model.pretrained={tmp_path / 'hub'}", "data.channels=1",
                                "data.std=[0.25]"])
    assert (config.data.image_size, config.data.mean, config.data.std) == (96, [pytest.approx(0.5)], [0.25])
    assert config.data.preprocessing_from == {"image_size": f"timm pretrained_cfg {tmp_path / 'hub' / 'config.json'}",
                                              "mean": f"timm pretrained_cfg {tmp_path / 'hub' / 'config.json'}",
                                              "std": "config"}
    model = build_model(config.model, 4, 1, config.data.image_size)
    assert torch.equal(model.stages[1].blocks[0].conv_dw.weight, source.stages[1].blocks[0].conv_dw.weight)
    # no timm weights: dist_train's own defaults, as before
    config = load_config(None, ["model.name=timm/test_convnext"])
    assert (config.data.image_size, config.data.mean, config.data.preprocessing_from["mean"]) == (32, [0.485, 0.456, 0.406], "default")


def test_layer_decay_lrs_of_first_and_last_group_at_step_n_follow_the_formula():
    model = build_model(ModelConfig(name="timm/test_vit", freeze=["patch_embed"]), 10, 1, 32)
    base, decay, warmup, total, n = 1e-3, 0.75, 10, 40, 25
    optimizer = build_optimizer(OptimConfig(lr=base, layer_decay=decay, weight_decay=0.05), model)
    groups = optimizer.param_groups
    frozen = {id(p) for name, p in model.named_parameters() if name.startswith("patch_embed")}
    assert frozen and not any(id(p) in frozen for g in groups for p in g["params"])  # frozen: in no group
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    layers = sorted({g["name"] for g in groups})
    assert layers == [f"layer{i:02d}" for i in range(8)]  # test_vit: the stem, 6 blocks, the head
    assert all({"lr_scale", "weight_decay", "name"} <= group.keys() for group in groups)
    assert {g["weight_decay"] for g in groups if g["name"] == "layer03"} == {0.0, 0.05}  # norms and biases: no decay
    schedule = Schedule(SchedulerConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1), optimizer, warmup, total, "max")
    for _ in range(n):
        optimizer.step()
        schedule.step()
    factor = 0.5 * (1 + math.cos(math.pi * (n - warmup) / (total - warmup)))  # past the warm-up: cosine
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["layer00"] == pytest.approx(base * decay ** 7 * factor, rel=1e-12)
    assert lrs["layer07"] == pytest.approx(base * factor, rel=1e-12) == schedule.lr()
    assert schedule.group_lrs()["lr_group/layer00"] == lrs["layer00"]
    # train.py --debug shows them: every layer group's LR where the schedule peaks (the end of the warm-up)
    config = load_config(None, ["model.name=timm/test_vit", "optim.layer_decay=0.75", "optim.lr=1e-3",
                                "scheduler.warmup_epochs=1"])
    preview = lr_preview(config, warmup, total, model)
    assert f"LR groups  8 layer groups (optim.layer_decay=0.75), at step {warmup}: layer00 {1e-3 * decay ** 7:.2e}, " in preview
    assert preview.endswith("layer06 7.50e-04, layer07 1.00e-03")


def one_step_grads(model_cfg: ModelConfig, channels: int, size: int) -> tuple[float, dict, dict, int]:
    """Loss, gradients and buffers after one forward + backward, and the elements autograd kept for backward."""
    torch.manual_seed(0)
    model = build_model(model_cfg, 10, channels, size).train()
    images, targets = torch.randn(6, channels, size, size, generator=torch.Generator().manual_seed(1)), torch.arange(6)
    torch.manual_seed(2)  # the same dropout / stochastic-depth draws in both runs
    kept = []
    # (inside a checkpointed block torch's own hooks take over: what they drop is not counted here)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers()), sum(kept)


@pytest.mark.parametrize("name,channels,size", [("timm/test_efficientnet", 1, 16), ("timm/test_convnext", 1, 32),
                                                ("timm/test_vit", 1, 32), ("resnet18", 3, 32), ("efficientnet_b0", 3, 32),
                                                ("small_cnn", 1, 8)])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name, channels, size):
    """Tolerance 1e-6 absolute (the recomputed forward is the same arithmetic; measured: bitwise equal on CPU)."""
    drop = {"drop_path_rate": 0.1, "dropout": 0.1} if name.startswith("timm/") else {}
    plain = one_step_grads(ModelConfig(name=name, **drop), channels, size)
    checkpointed = one_step_grads(ModelConfig(name=name, grad_checkpointing=True, **drop), channels, size)
    print(f"{name}: {checkpointed[3]:,} of {plain[3]:,} elements kept for backward")
    assert checkpointed[3] < 0.6 * plain[3]  # it did checkpoint
    assert checkpointed[0] == pytest.approx(plain[0], abs=1e-6)
    assert plain[1].keys() == checkpointed[1].keys()
    for key in plain[1]:
        torch.testing.assert_close(checkpointed[1][key], plain[1][key], rtol=0, atol=1e-6, msg=key)
    if not name.startswith("timm/"):  # ours also keeps BatchNorm's running statistics to one update per step
        for key in plain[2]:
            torch.testing.assert_close(checkpointed[2][key], plain[2][key], rtol=0, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------
# real runs: 2 processes on the digits, one epoch each

RUNS = {
    "test_efficientnet": {"train.ema_decay": 0.9},
    "test_convnext": {},
    # the fine-tuning knobs together: layer decay, stochastic depth, gradient checkpointing; saves every 7 steps
    "test_vit": {"optim.layer_decay": 0.75, "model.drop_path_rate": 0.1, "model.grad_checkpointing": "true",
                 "model.dropout": 0.1, "checkpoint.every_n_steps": 7},
}


def run_args(digits_root, out, name):
    overrides = {"model.name": f"timm/{name}", "data.image_size": MODELS[name], "train.epochs": 1, **RUNS[name]}
    return ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **overrides)]


def needs_onnx() -> None:
    """The export half of a test (the training half ran): skipped where the export extra is absent (GPU machines)."""
    missing = missing_packages()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the export extra): the export is not checked here")


@pytest.fixture(scope="module")
def timm_run(digits_root, tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            proc = run_cli("train.py", run_args(digits_root, out, name), processes=2)
            done[name] = out, proc.stdout
        return done[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_each_test_model_trains_on_2_processes_to_identical_weights_and_exports(timm_run, tmp_path, name):
    out, stdout = timm_run(name)
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2 and len(set(info["final_weights_sha256_per_rank"])) == 1
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert record["rank_batches"] == [20, 20]
    assert record["train_loss"] < 2.1  # it learns (chance: ln 10 = 2.30); one epoch is too short for BatchNorm statistics
    size = MODELS[name]
    assert info["preprocessing"] == {"channels": 1, "image_size": size, "mean": [0.5], "std": [0.5],
                                     "from": {"image_size": "config", "mean": "config", "std": "config"}}
    assert f"timm/{name}:" in stdout and f"input 1x{size}x{size}, mean [0.5], std [0.5]" in stdout
    needs_onnx()
    result = export(out / "checkpoints" / "best", tmp_path / f"{name}.onnx", images=64)
    print(f"{name}: {result['check']}")
    assert result["check"]["max_abs_logit_difference"] <= 1e-4 and result["check"]["argmax_agreement"] == 64
    assert result["source"]["weights"] == ("ema.safetensors" if "train.ema_decay" in RUNS[name] else "model.safetensors")


def test_layer_groups_lrs_reach_tensorboard_and_a_killed_run_resumes_bitwise(timm_run, digits_root, tmp_path):
    full, _ = timm_run("test_vit")
    head, first = scalars(full, "lr_group/layer07"), scalars(full, "lr_group/layer00")
    assert [s for s, _ in head] == list(range(1, 21)) and head == scalars(full, "train/lr")
    assert [v for _, v in first] == pytest.approx([v * 0.75 ** 7 for _, v in head], rel=1e-6)  # (float32 events)
    cut = tmp_path / "cut"
    killed = run_cli("train.py", run_args(digits_root, cut, "test_vit"), processes=2, check=False,
                     env={"DIST_TRAIN_FAULT": "kill@step:10"})
    assert_killed(killed)
    run_cli("train.py", [*run_args(digits_root, cut, "test_vit"), "--resume", "auto"], processes=2)
    resumed, uninterrupted = (json.loads((d / "run_info.json").read_text()) for d in (cut, full))
    assert resumed["resumed_from"].endswith("step-00000007")
    assert resumed["final_weights_sha256_per_rank"] == uninterrupted["final_weights_sha256_per_rank"]
    assert resumed["final_optimizer_sha256_per_rank"] == uninterrupted["final_optimizer_sha256_per_rank"]


def test_multihead_on_a_timm_backbone_trains_predicts_and_exports_its_heads(tmp_path):
    root = synthetic.write_attributes(tmp_path / "attributes", count=480)
    out = tmp_path / "run"
    args = [*HEADS, *common(root, out, **{"model.name": "timm/test_efficientnet", "train.epochs": 1})]
    run_cli("train.py", args, processes=2)
    assert_each_rank(out)
    run_cli("predict.py", [*args, "--checkpoint", str(out / "checkpoints" / "best")])
    predicted = rows(out / "submission.csv")
    assert len(predicted) == len(rows(root / "info.csv")) and all(0 <= int(r["label"]) < 18 for r in predicted)
    needs_onnx()
    result = export(out / "checkpoints" / "best", tmp_path / "heads.onnx")
    assert result["output"]["heads"][2] == {"name": "age", "columns": [5, 8], "classes": ["young", "middle", "old"]}
    assert result["check"]["max_abs_logit_difference"] <= 1e-4 and result["check"]["argmax_agreement"] == 32

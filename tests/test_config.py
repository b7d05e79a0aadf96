"""Config: every shipped config loads; unknown keys and wrong types are errors naming the key; overrides."""
import json
from pathlib import Path

import pytest

from dist_train.config import Config, load_config, save_config
from dist_train.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_shipped_configs_exist():
    assert "digits.yaml" in [p.name for p in CONFIGS]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_nested_key_names_key_and_closest(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr; did you mean optim\.lr\?"):
        load_config(path)


def test_unknown_section_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key optimizer; did you mean optim\?"):
        load_config(write(tmp_path, "optimizer: {lr: 0.1}\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got str 'big'"):
        load_config(write(tmp_path, "data: {batch_size: big}\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got float 2\.5"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: 'fp32' is not one of no, fp16, bf16"):
        load_config(None, ["train.mixed_precision=fp32"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, ["data.num_workers=true"])


def test_dotted_overrides(tmp_path):
    config = load_config(None, ["optim.lr=3e-4", "data.batch_size=64", f"output_dir={tmp_path}", "seed=7",
                                "model.freeze=[conv1, layer1]", "train.max_grad_norm=null"])
    assert config.optim.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; float fields accept it
    assert config.data.batch_size == 64
    assert config.output_dir == str(tmp_path)
    assert config.seed == 7
    assert config.model.freeze == ["conv1", "layer1"]
    assert config.train.max_grad_norm is None


def test_override_of_unknown_key_and_malformed_override():
    with pytest.raises(ConfigError, match=r"data\.batch_sise; did you mean data\.batch_size"):
        load_config(None, ["data.batch_sise=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["data.batch_size"])


def test_json_config_is_accepted(tmp_path):
    path = write(tmp_path, json.dumps({"optim": {"lr": 0.5}, "train": {"epochs": 3}}), "c.json")
    config = load_config(path)
    assert (config.optim.lr, config.train.epochs) == (0.5, 3)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.mean needs 1 values"):
        load_config(None, ["data.channels=1"])
    with pytest.raises(ConfigError, match="checkpoint.monitor: unknown metric 'val_acc' for task.kind=classification; did you mean val_accuracy"):
        load_config(None, ["checkpoint.monitor=val_acc"])
    with pytest.raises(ConfigError, match="grad_accum_steps must be positive"):
        load_config(None, ["train.grad_accum_steps=0"])


def test_saved_config_round_trips(tmp_path):
    config = load_config(CONFIGS[0], ["optim.lr=0.25", "model.freeze=[features.0]"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)
    assert not marker.exists()


def test_yaml_booleans_spell_literal_options():
    """`train.mixed_precision=no` on the command line: YAML reads `no` as False, the option is the word."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: False is not one of"):
        load_config(None, ["deepspeed.zero_stage=false"])  # not silently stage 0

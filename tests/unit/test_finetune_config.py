"""The finetune section: every new key refuses a wrong value, naming the key."""

import pytest

from securetune.config import ConfigError, validate_config
from securetune.settings import TrainConfig


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("method", "qlora", r"'finetune\.method': 'qlora' is not one of \['full', 'lora'\]"),
        ("other_params", "head", r"'finetune\.other_params': 'head' is not one of"),
        ("autocast", "float16", r"'finetune\.autocast': 'float16' is not one of"),
        ("distributed", "deepspeed", r"'finetune\.distributed': 'deepspeed' is not one of"),
        ("micro_batch_size", -1, r"'finetune\.micro_batch_size': -1 is out of range"),
        ("checkpoint_every", 2.5, r"'finetune\.checkpoint_every': 2\.5 is not of type"),
        ("checkpoint_keep_previous", "yes", r"'finetune\.checkpoint_keep_previous': 'yes' is not"),
        ("stop_before_time_limit", 1, r"'finetune\.stop_before_time_limit': 1 is not of type"),
        ("gamma_sweep", [0.1, -0.1], r"'finetune\.gamma_sweep\.1': -0\.1 is out of range"),
        ("gpus", -1, r"'finetune\.gpus': -1 is out of range"),
    ],
)
def test_wrong_finetune_value_names_the_key(config, schema, key, value, message):
    config["finetune"][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)


def test_wrong_lora_setting_names_the_key(config, schema):
    config["finetune"]["lora"]["module_types"] = ["q", "qkv"]
    config["finetune"]["lora"]["r"] = 0
    with pytest.raises(ConfigError) as err:
        validate_config(config, schema)
    assert "'finetune.lora.module_types.1': 'qkv' is not one of" in str(err.value)
    assert "'finetune.lora.r': 0 is out of range" in str(err.value)


def test_swat_arm_needs_switch_at(config, schema):
    del config["finetune"]["arms"]["swat"]["switch_at"]
    with pytest.raises(ConfigError, match=r"finetune\.arms\.swat.*'switch_at' is a required"):
        validate_config(config, schema)


@pytest.mark.parametrize("value", [0, 1.5, -0.2])
def test_swat_switch_at_is_a_step_or_a_fraction(config, schema, value):
    config["finetune"]["arms"]["swat"]["switch_at"] = value
    with pytest.raises(ConfigError, match=r"'finetune\.arms\.swat\.switch_at'"):
        validate_config(config, schema)


def test_freeze_arm_takes_no_gamma(config, schema):
    config["finetune"]["arms"]["freeze"]["gamma"] = 0.1
    with pytest.raises(ConfigError, match=r"'finetune\.arms\.freeze\.gamma': 0\.1 is not allowed"):
        validate_config(config, schema)


def test_unknown_arm_kind_lists_the_four(config, schema):
    config["finetune"]["arms"]["ml_lr"]["kind"] = "sppft"
    with pytest.raises(ConfigError, match=r"'sppft' is not one of \['vanilla', 'ml_lr', 'freeze'"):
        validate_config(config, schema)


def _train_config(**changes) -> TrainConfig:
    settings = {
        "arm": "a", "kind": "ml_lr", "lr": 1e-3, "gamma": 0.1, "steps": 4, "batch_size": 2,
        "warmup_ratio": 0.0, "schedule": "linear", "max_seq_len": 32, "weight_decay": 0.0,
        "grad_clip": 1.0, "seed": 0,
    }  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def test_train_config_refuses_what_the_trainer_cannot_do():
    with pytest.raises(ConfigError, match="'method: lora' and 'distributed: fsdp' do not combine"):
        _train_config(method="lora", distributed="fsdp")
    with pytest.raises(ConfigError, match="kind swat needs 'switch_at'"):
        _train_config(kind="swat")
    with pytest.raises(ConfigError, match="finetune key 'autocast'"):
        _train_config(autocast="fp8")
    assert _train_config(lora={"r": 2, "module_types": ["q"]}).lora.module_types == ("q",)

import copy

import pytest
import yaml

from securetune.config import ConfigError, is_full_config, validate_config


def test_shipped_configs_are_valid(repo, schema):
    base = yaml.safe_load((repo / "config.yaml").read_text())
    validate_config(base, schema)
    for overlay in sorted((repo / "configs").glob("*.yaml")):
        merged = _merge(copy.deepcopy(base), yaml.safe_load(overlay.read_text()))
        validate_config(merged, schema)


def _merge(base: dict, overlay: dict) -> dict:
    """Snakemake's recursive update of the default config by --configfile."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def test_unknown_key_is_named(config, schema):
    config["finetune"]["learning_rate"] = 1e-4
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) \['learning_rate'\] under 'finetune'"
    ):
        validate_config(config, schema)


def test_unknown_top_level_key_is_named(config, schema):
    config["sead"] = 1
    with pytest.raises(ConfigError, match=r"\['sead'\] at the top level"):
        validate_config(config, schema)


def test_wrong_type_names_the_key(config, schema):
    config["finetune"]["steps"] = "ten"
    with pytest.raises(ConfigError, match=r"'finetune\.steps': 'ten' is not of type 'integer'"):
        validate_config(config, schema)


def test_out_of_range_names_the_key_and_bounds(config, schema):
    config["search"]["tau"] = 1.5
    with pytest.raises(ConfigError, match=r"'search\.tau': 1\.5 is out of range .*'maximum': 1"):
        validate_config(config, schema)


def test_negative_gamma_is_refused(config, schema):
    config["finetune"]["arms"]["ml_lr"]["gamma"] = -0.1
    with pytest.raises(ConfigError, match=r"'finetune\.arms\.ml_lr\.gamma'"):
        validate_config(config, schema)


def test_ml_lr_arm_needs_gamma(config, schema):
    del config["finetune"]["arms"]["ml_lr"]["gamma"]
    with pytest.raises(ConfigError, match=r"finetune\.arms\.ml_lr.*'gamma' is a required"):
        validate_config(config, schema)


def test_unknown_module_type_lists_the_allowed(config, schema):
    config["robustness"]["module_types"] = ["q", "qkv"]
    with pytest.raises(ConfigError, match=r"'qkv' is not one of \['q', 'k'"):
        validate_config(config, schema)


def test_arm_named_base_is_reserved(config, schema):
    config["finetune"]["arms"]["base"] = {"kind": "vanilla"}
    with pytest.raises(ConfigError, match="finetune.arms"):
        validate_config(config, schema)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enabled", "yes", r"'align\.enabled': 'yes' is not of type 'boolean'"),
        ("harmful", {"alpaca": 10}, r"'align\.harmful'.*'alpaca'"),
        ("benign", {"gsm8k": 10}, r"'align\.benign'.*'gsm8k'"),
        ("lookalike", {"xstest_safe": -1}, r"'align\.lookalike\.xstest_safe': -1 is out of range"),
        ("lookalike_max_new_tokens", 0, r"'align\.lookalike_max_new_tokens': 0 is out of range"),
        ("lr", 0, r"'align\.lr': 0 is out of range"),
        ("epochs", 0, r"'align\.epochs': 0 is out of range"),
        ("batch_size", 0, r"'align\.batch_size': 0 is out of range"),
        ("micro_batch_size", -1, r"'align\.micro_batch_size': -1 is out of range"),
        ("max_seq_len", 4, r"'align\.max_seq_len': 4 is out of range"),
        ("warmup_ratio", 2, r"'align\.warmup_ratio': 2 is out of range"),
        ("schedule", "step", r"'align\.schedule': 'step' is not one of"),
        (
            "autocast",
            "float16",
            r"'align\.autocast': 'float16' is not one of \['auto', 'none', 'bfloat16'\]",
        ),
    ],
)
def test_bad_align_values_name_the_key(config, schema, key, value, message):
    config["align"][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("data", "probe_ood_per_class", -1, r"'data\.probe_ood_per_class': -1 is out of range"),
        ("data", "probe_ood_harmful", "advbench", r"'data\.probe_ood_harmful': 'advbench' is not"),
        ("data", "probe_ood_benign", "mt_bench", r"'data\.probe_ood_benign'"),
        ("data", "probe_benign_mix", {"gsm8k": 1}, r"\['gsm8k'\] under 'data\.probe_benign_mix'"),
        ("robustness", "perturbations", ["noise", "dropout"], r"'robustness\.perturbations\.1'"),
        ("robustness", "score", "loss", r"'robustness\.score': 'loss' is not one of"),
        ("robustness", "jobs", "per_chunk", r"'robustness\.jobs': 'per_chunk' is not one of"),
        ("robustness", "cached_prefix", "yes", r"'robustness\.cached_prefix'"),
        ("robustness", "proxy_reach", "below", r"'robustness\.proxy_reach': 'below' is not one"),
        ("search", "probe_split", "thirds", r"'search\.probe_split': 'thirds' is not one of"),
        ("search", "unit", "layer", r"'search\.unit': 'layer' is not one of"),
        ("search", "band_width", 0, r"'search\.band_width': 0 is out of range"),
        ("search", "perturbation", "both", r"'search\.perturbation'"),
        ("search", "on_reject", "ignore", r"'search\.on_reject': 'ignore' is not one of"),
        ("search", "tau_drop", 1.5, r"'search\.tau_drop': 1\.5 is out of range"),
        ("search", "max_module_share", 0, r"'search\.max_module_share': 0 is out of range"),
        ("search", "max_param_share", 1.2, r"'search\.max_param_share': 1\.2 is out of range"),
        ("finetune", "save_dtype", "int8", r"'finetune\.save_dtype': 'int8' is not one of"),
        ("finetune", "keep_weights", "no", r"'finetune\.keep_weights': 'no' is not of type"),
    ],
)
def test_robustness_keys_refuse_wrong_values_by_name(config, schema, section, key, value, message):
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)


@pytest.mark.parametrize("value", [0, 1000])
def test_llm_judge_concurrency_out_of_range_is_refused(config, schema, value):
    config["evaluation"]["llm_judge"]["concurrency"] = value
    with pytest.raises(ConfigError, match=rf"'evaluation\.llm_judge\.concurrency': {value} is out"):
        validate_config(config, schema)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "link_weights", "yes", r"'model\.link_weights': 'yes' is not of type"),
        (
            "llm_judge", "extra_body", "structured_outputs",
            r"'evaluation\.llm_judge\.extra_body': 'structured_outputs' is not of type",
        ),
    ],
)  # fmt: skip
def test_wrong_link_weights_or_extra_body_is_refused_by_name(
    config, schema, section, key, value, message
):
    where = config["evaluation"] if section == "llm_judge" else config
    where[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)


def test_arm_named_unaligned_is_reserved(config, schema):
    config["finetune"]["arms"]["unaligned"] = {"kind": "vanilla"}
    with pytest.raises(ConfigError, match="finetune.arms"):
        validate_config(config, schema)


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_other_scales_are_full_configs(repo, schema, name):
    """Given first with --configfile, a full config replaces config.yaml whole: it must validate
    on its own."""
    scale = yaml.safe_load((repo / "configs" / f"{name}.yaml").read_text())
    assert is_full_config(scale, schema)
    validate_config(scale, schema)


def test_default_config_is_the_demo(repo):
    demo = yaml.safe_load((repo / "config.yaml").read_text())
    assert demo["model"]["source"] == "smollm2-gguf" and demo["align"]["enabled"]


def test_zero_training_processes_is_refused(config, schema):
    config["finetune"]["processes"] = 0
    with pytest.raises(ConfigError, match=r"'finetune\.processes': 0 is out of range"):
        validate_config(config, schema)


def test_fault_switch_takes_only_module_names(config, schema):
    config["robustness"]["fail_modules"] = ["L1.qkv"]
    with pytest.raises(ConfigError, match=r"'robustness\.fail_modules\.0'"):
        validate_config(config, schema)


@pytest.mark.parametrize(
    ("key", "value"), [("lr", 0), ("steps", 0), ("examples", 0), ("source", "poems")]
)
def test_ift_perturbation_keys_are_checked(config, schema, key, value):
    config["robustness"]["ift"][key] = value
    with pytest.raises(ConfigError, match=rf"'robustness\.ift\.{key}'"):
        validate_config(config, schema)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(task_metric="bleu"),
         r"'domains\.math\.task_metric': 'bleu' is not one of \['usability', 'accuracy'\]"),
        (lambda d: d.update(ift_source="poems"), r"'domains\.math\.ift_source': 'poems'"),
        (lambda d: d["finetune"].update(arms={}),
         r"unknown config key\(s\) \['arms'\] under 'domains\.math\.finetune'"),
        (lambda d: d.pop("task_metric"), r"config section 'domains\.math': 'task_metric'"),
    ],
)  # fmt: skip
def test_wrong_domain_values_are_refused_by_name(config, schema, change, message):
    change(config["domains"]["math"])
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)


def test_a_domain_name_that_is_no_folder_name_is_refused(config, schema):
    config["domains"]["Math Domain"] = config["domains"].pop("math")
    with pytest.raises(ConfigError, match=r"'domains'.*'Math Domain'"):
        validate_config(config, schema)


def test_heldout_ift_examples_must_be_positive(config, schema):
    config["domains"]["math"]["ift_heldout_examples"] = 0
    with pytest.raises(
        ConfigError, match=r"'domains\.math\.ift_heldout_examples': 0 is out of range"
    ):
        validate_config(config, schema)


def _refusal(config: dict) -> str:
    from securetune.checks import check_at_start

    from ..conftest import DATA

    with pytest.raises(ConfigError) as err:
        check_at_start(config, DATA)
    return str(err.value)


def test_robustness_steps_may_not_reach_a_domains_held_out_rows(config):
    """The shared `ift` perturbation trains on the head of its source: past a domain's training
    rows it would train the search on the rows that domain's task metric is measured on."""
    config["robustness"]["ift"]["examples"] = 65  # general trains on 64 alpaca rows
    message = _refusal(config)
    assert "'robustness.ift.examples' = 65 is more than 'domains.general.ift_examples' = 64" in (
        message
    )


def test_stop_at_refusal_is_refused_beside_a_judge_that_reads_the_whole_completion(config):
    from securetune.checks import check_at_start

    from ..conftest import DATA

    config["generation"]["stop_at_refusal"] = True
    assert config["evaluation"]["guard"]["enabled"]
    message = _refusal(config)
    assert "'generation.stop_at_refusal'" in message and "evaluation.guard is enabled" in message
    config["evaluation"]["guard"]["enabled"] = False
    config["evaluation"]["llm_judge"]["enabled"] = True
    assert "evaluation.llm_judge is enabled" in _refusal(config)
    config["evaluation"]["llm_judge"]["enabled"] = False
    check_at_start(config, DATA)


def test_a_domains_own_batch_is_checked_against_the_processes(config):
    config["finetune"].update(processes=2, batch_size=4)
    config["domains"]["math"]["finetune"]["batch_size"] = 3
    message = _refusal(config)
    assert "config key 'domains.math.finetune.batch_size': 3 does not split evenly" in message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["selectors"].update(random_param_tolerance=-0.1),
         r"'selectors\.random_param_tolerance'"),
        (lambda c: c["selectors"]["attribution"].update(p=0), r"'selectors\.attribution\.p'"),
        (lambda c: c["selectors"]["attribution"].update(q=1.5), r"'selectors\.attribution\.q'"),
        (lambda c: c["finetune"]["arms"]["ml_lr"].update(selector="best"),
         r"'finetune\.arms\.ml_lr\.selector': 'best'"),
        (lambda c: c["finetune"]["arms"]["ml_lr"].update(replicates=0),
         r"'finetune\.arms\.ml_lr\.replicates'"),
    ],
)  # fmt: skip
def test_wrong_selector_values_are_refused_by_name(config, schema, change, message):
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)

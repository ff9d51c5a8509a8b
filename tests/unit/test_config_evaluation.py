"""Every generation/evaluation config key refuses a wrong value, naming the key."""

from __future__ import annotations

import pytest

from securetune.config import ConfigError, validate_config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("generation.backend", "tgi", r"'generation\.backend': 'tgi' is not one of"),
        ("generation.temperature", -0.1, r"'generation\.temperature': -0\.1 is out of range"),
        ("generation.top_p", 0, r"'generation\.top_p': 0 is out of range"),
        ("generation.max_retries", 50, r"'generation\.max_retries': 50 is out of range"),
        ("generation.gpus", -1, r"'generation\.gpus': -1 is out of range"),
        ("generation.vllm.max_model_len", 0, r"'generation\.vllm\.max_model_len'"),
        ("generation.vllm.enforce_eager", "yes", r"'generation\.vllm\.enforce_eager'"),
        ("generation.vllm.gpu_memory_utilization", 1.5, r"gpu_memory_utilization': 1\.5"),
        ("generation.vllm.cpu_kvcache_gb", 0, r"'generation\.vllm\.cpu_kvcache_gb'"),
        ("evaluation.sources", {"hexphy": "/x"}, r"'hexphy'"),
        ("evaluation.sources", {"hexphi": ""}, r"'evaluation\.sources\.hexphi'"),
        ("evaluation.guard.enabled", "on", r"'evaluation\.guard\.enabled'"),
        ("evaluation.guard.model", "", r"'evaluation\.guard\.model'"),
        ("evaluation.guard.prompt_format", "lg2", r"'evaluation\.guard\.prompt_format': 'lg2'"),
        ("evaluation.guard.max_new_tokens", 0, r"'evaluation\.guard\.max_new_tokens'"),
        ("evaluation.llm_judge.enabled", 1, r"'evaluation\.llm_judge\.enabled'"),
        ("evaluation.llm_judge.base_url", "127.0.0.1:8000", r"'evaluation\.llm_judge\.base_url'"),
        ("evaluation.llm_judge.model", "", r"'evaluation\.llm_judge\.model'"),
        ("evaluation.llm_judge.api_key_env", "sk-abc-123", r"llm_judge\.api_key_env'"),
        ("evaluation.llm_judge.timeout_s", 0, r"'evaluation\.llm_judge\.timeout_s'"),
        ("evaluation.llm_judge.max_retries", -1, r"'evaluation\.llm_judge\.max_retries'"),
        ("evaluation.llm_judge.max_tokens", 0, r"'evaluation\.llm_judge\.max_tokens'"),
        ("evaluation.benchmarks", {"harmbench_ctx": 3}, r"'harmbench_ctx'"),
    ],
)
def test_wrong_value_names_the_key(config, schema, path, value, message):
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, schema)


@pytest.mark.parametrize("section", ["generation", "evaluation.guard", "evaluation.llm_judge"])
def test_unknown_key_is_named(config, schema, section):
    node = config
    for key in section.split("."):
        node = node[key]
    node["api_key"] = "x"
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['api_key'\]"):
        validate_config(config, schema)

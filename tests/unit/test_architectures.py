import pytest

from securetune.architectures import (
    MODULE_TYPES,
    UnsupportedArchitecture,
    module_name,
    module_of_parameter,
    module_weight_name,
    parse_module_name,
)


@pytest.mark.parametrize(
    ("module", "path"),
    [
        ("q", "model.layers.3.self_attn.q_proj.weight"),
        ("k", "model.layers.3.self_attn.k_proj.weight"),
        ("v", "model.layers.3.self_attn.v_proj.weight"),
        ("o", "model.layers.3.self_attn.o_proj.weight"),
        ("gate", "model.layers.3.mlp.gate_proj.weight"),
        ("up", "model.layers.3.mlp.up_proj.weight"),
        ("down", "model.layers.3.mlp.down_proj.weight"),
    ],
)
def test_llama_names_round_trip(module, path):
    assert module_weight_name("llama", 3, module) == path
    assert module_of_parameter("llama", path) == (3, module)


def test_lora_and_peft_prefixed_names_map_to_their_module():
    name = "base_model.model.model.layers.12.self_attn.v_proj.lora_A.default.weight"
    assert module_of_parameter("llama", name) == (12, "v")
    assert module_of_parameter("qwen2", "model.layers.1.self_attn.q_proj.bias") == (1, "q")


def test_layer_numbers_do_not_prefix_match():
    assert module_of_parameter("llama", "model.layers.13.mlp.up_proj.weight") == (13, "up")


def test_non_module_parameters_map_to_none():
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert module_of_parameter("llama", name) is None


def test_fused_attention_is_refused_clearly():
    with pytest.raises(UnsupportedArchitecture, match="fuses its attention"):
        module_weight_name("gpt2", 0, "q")


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        module_of_parameter("mamba", "x")


def test_module_names_round_trip():
    for module in MODULE_TYPES:
        assert parse_module_name(module_name(5, module)) == (5, module)
    with pytest.raises(ValueError, match="bad module name"):
        parse_module_name("L1.qkv")

import pytest
import torch
from transformers import LlamaForCausalLM

from securetune.param_groups import (
    GroupSpec,
    ParamGroupError,
    build_param_groups,
    freeze_for_arm,
    groups_for_arm,
    held_groups,
    role_of,
    swat_switch_step,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir)


def _names(groups):
    return {g["name"]: set(g["param_names"]) for g in groups}


def test_ml_lr_every_parameter_in_exactly_one_group_with_right_lr(model):
    robust = {"L0.q", "L1.down"}
    groups = groups_for_arm(model, "ml_lr", lr=1e-3, gamma=0.1, robust=robust)
    names = _names(groups)
    all_names = {n for n, _ in model.named_parameters()}
    assert names["robust"] | names["rest"] == all_names
    assert not names["robust"] & names["rest"]
    assert names["robust"] == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    }
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["robust"] == pytest.approx(1e-3)
    assert lrs["rest"] == pytest.approx(1e-4)


def test_vanilla_is_one_group_at_lr(model):
    groups = groups_for_arm(model, "vanilla", lr=2e-5, gamma=0.1, robust=set())
    assert len(groups) == 1 and groups[0]["lr"] == 2e-5
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_parameter_matched_twice_raises():
    params = [("a.weight", torch.nn.Parameter(torch.zeros(1)))]
    specs = [GroupSpec("x", 1.0, lambda n: True), GroupSpec("y", 1.0, lambda n: "a" in n)]
    with pytest.raises(ParamGroupError, match="'a.weight' is matched by groups"):
        build_param_groups(params, specs)


def test_parameter_missed_raises():
    params = [("a.weight", torch.nn.Parameter(torch.zeros(1)))]
    with pytest.raises(ParamGroupError, match="matched by no group"):
        build_param_groups(params, [GroupSpec("x", 1.0, lambda n: n.startswith("b"))])


def test_plan_naming_a_missing_module_raises(model):
    with pytest.raises(ParamGroupError, match=r"L7\.q"):
        groups_for_arm(model, "ml_lr", lr=1e-3, gamma=0.1, robust={"L7.q"})


def test_frozen_parameters_are_left_out():
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    params = [("a.weight", frozen)]
    assert build_param_groups(params, [GroupSpec("x", 1.0, lambda n: False)]) == []


# --- arms beyond vanilla/ml_lr, the `other` group, LoRA ----------------------------------------

ROBUST = {"L0.q", "L1.down"}
ROBUST_WEIGHTS = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.fixture()
def fresh_model(tiny_model_dir):
    """A model of its own: freezing changes requires_grad in place."""
    return LlamaForCausalLM.from_pretrained(tiny_model_dir)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_role_of_sorts_modules_biases_and_the_rest():
    assert role_of("llama", "model.layers.0.self_attn.q_proj.weight", ROBUST) == "robust"
    assert role_of("qwen2", "model.layers.0.self_attn.q_proj.bias", ROBUST) == "robust"
    assert role_of("llama", "model.layers.0.self_attn.k_proj.weight", ROBUST) == "rest"
    for other in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert role_of("llama", other, ROBUST) == "other"


def test_freeze_leaves_nothing_trainable_outside_mods_robust(fresh_model):
    frozen = freeze_for_arm(fresh_model, "llama", "freeze", ROBUST)
    assert _trainable(fresh_model) == ROBUST_WEIGHTS
    assert len(frozen) == len(list(fresh_model.parameters())) - 2
    groups = groups_for_arm(fresh_model, "freeze", lr=1e-3, gamma=0.5, robust=ROBUST)
    assert [(g["name"], set(g["param_names"]), g["lr"]) for g in groups] == [
        ("robust", ROBUST_WEIGHTS, 1e-3)
    ]


def test_freeze_without_freezing_first_raises(fresh_model):
    with pytest.raises(ParamGroupError, match="non-robust parameter"):
        groups_for_arm(fresh_model, "freeze", lr=1e-3, gamma=0.0, robust=ROBUST)


def test_freeze_with_other_params_robust_trains_norms_at_lr(fresh_model):
    freeze_for_arm(fresh_model, "llama", "freeze", ROBUST, other_params="robust")
    groups = groups_for_arm(fresh_model, "freeze", 1e-3, 0.0, ROBUST, other_params="robust")
    names = _names(groups)
    assert set(names) == {"robust"}
    assert {"model.norm.weight", "lm_head.weight"} <= names["robust"]
    assert "model.layers.0.self_attn.k_proj.weight" not in names["robust"]


@pytest.mark.parametrize(
    ("other_params", "norm_group"), [("rest", "rest"), ("robust", "robust"), ("frozen", None)]
)
def test_other_params_choose_the_group_of_norms_embeddings_and_head(
    fresh_model, other_params, norm_group
):
    freeze_for_arm(fresh_model, "llama", "ml_lr", ROBUST, other_params)
    groups = groups_for_arm(fresh_model, "ml_lr", 1e-3, 0.1, ROBUST, other_params)
    names = _names(groups)
    for other in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        owner = [g for g, members in names.items() if other in members]
        assert owner == ([norm_group] if norm_group else [])
    assert names["robust"] >= ROBUST_WEIGHTS
    assert "model.layers.1.mlp.up_proj.weight" in names["rest"]


def test_swat_groups_and_switch_step(fresh_model):
    groups = groups_for_arm(fresh_model, "swat", lr=1e-3, gamma=1.0, robust=ROBUST)
    assert {g["name"]: g["lr"] for g in groups} == {"robust": 1e-3, "rest": 1e-3}
    assert swat_switch_step(0.25, 12) == 3
    assert swat_switch_step(0.01, 12) == 1  # a fraction never gives zero robust-only steps
    assert swat_switch_step(5, 12) == 5
    assert swat_switch_step(50, 12) == 12
    switch = swat_switch_step(3, 12)
    assert [held_groups("swat", s, switch) for s in range(2, 5)] == [{"rest"}, set(), set()]
    assert held_groups("ml_lr", 0, None) == set()
    with pytest.raises(ValueError, match="whole"):
        swat_switch_step(2.5, 12)


def test_unknown_kind_lists_the_four_arms(fresh_model):
    with pytest.raises(ValueError, match=r"\['vanilla', 'ml_lr', 'freeze', 'swat'\]"):
        groups_for_arm(fresh_model, "sppft", 1e-3, 0.1, ROBUST)


def test_lora_groups_match_the_adapters_of_each_module(fresh_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        fresh_model, LoraConfig(r=2, target_modules=["q_proj", "down_proj", "v_proj"])
    )
    groups = groups_for_arm(peft_model, "ml_lr", 1e-3, 0.1, ROBUST, model_type="llama")
    names = _names(groups)
    assert names["robust"] == {
        f"base_model.model.model.layers.{layer}.{path}.lora_{ab}.default.weight"
        for layer, path in ((0, "self_attn.q_proj"), (1, "mlp.down_proj"))
        for ab in "AB"
    }
    assert all(".lora_" in n for n in names["rest"])
    # q, v and down in 2 layers, 2 adapters each, minus the 4 robust ones
    assert len(names["rest"]) == 3 * 2 * 2 - 4

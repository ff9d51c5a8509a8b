import pytest
import torch
from transformers import LlamaForCausalLM

from securetune.param_groups import (
    GroupSpec,
    ParamGroupError,
    build_param_groups,
    groups_for_arm,
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

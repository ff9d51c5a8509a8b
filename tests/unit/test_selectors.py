"""The controls of the module choice (random, inverse, attribution) and training replicates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from securetune import jobs
from securetune.architectures import MODULE_TYPES, module_name
from securetune.attribution import module_attribution, top_share_mask
from securetune.config import ConfigError
from securetune.method import (
    arm_spec,
    arm_training_settings,
    replicate_seed,
    replicates_of,
    selection_name,
)
from securetune.ranking import rank_modules
from securetune.report.build import with_replicates
from securetune.report.settings import ReportSettings
from securetune.report.tables import module_set_by_type, module_sets_section
from securetune.selectors import (
    attribution_ranking,
    inverse_selection,
    module_sizes,
    parameter_count,
    random_selection,
    select_modules,
    selected_modules,
)
from securetune.settings import SelectorSettings

LAYERS = 6


def robustness_table(seed: int = 0) -> pd.DataFrame:
    """A robustness table of LAYERS x 7 modules with distinct scores."""
    rng = np.random.default_rng(seed)
    rows = [
        {"layer": layer, "module": m, "score": float(s)}
        for (layer, m), s in zip(
            [(layer, m) for layer in range(LAYERS) for m in MODULE_TYPES],
            rng.permutation(LAYERS * len(MODULE_TYPES)),
            strict=True,
        )
    ]
    return pd.DataFrame(rows)


def sizes_of(names: list[str]) -> dict[str, int]:
    """Llama-like sizes: MLP matrices 8x the k/v ones, q/o 3x."""
    per_type = {"q": 3, "k": 1, "v": 1, "o": 3, "gate": 8, "up": 8, "down": 8}
    return {n: 1000 * per_type[n.split(".")[1]] for n in names}


def test_random_sets_match_the_size_and_about_the_parameters_and_are_seeded():
    candidates = rank_modules(robustness_table())
    sizes = sizes_of(candidates)
    robust = candidates[:5]
    target = sum(sizes[m] for m in robust)
    draws = [random_selection(candidates, sizes, 5, target, 0.1, seed) for seed in (1, 2, 3)]
    for drawn in draws:
        assert len(drawn) == len(set(drawn)) == 5
        assert abs(sum(sizes[m] for m in drawn) - target) <= 0.1 * target
    assert random_selection(candidates, sizes, 5, target, 0.1, 1) == draws[0]
    assert draws[0] != draws[1]  # draws differ


def test_random_set_falls_back_to_the_closest_draw_when_none_is_within_tolerance():
    candidates = [module_name(0, m) for m in MODULE_TYPES]
    sizes = sizes_of(candidates)
    drawn = random_selection(candidates, sizes, 1, 2000, 0.0, 0)  # no module has 2000
    assert drawn in (["L0.q"], ["L0.o"], ["L0.k"], ["L0.v"])  # 3000 or 1000: 1000 off


def test_inverse_is_the_least_robust_end_of_the_ranking():
    table = robustness_table()
    ranked = rank_modules(table)
    assert inverse_selection(table, 3) == ranked[::-1][:3]
    worst = table.sort_values("score").iloc[-1]
    assert inverse_selection(table, 1) == [module_name(int(worst.layer), worst.module)]


def test_attribution_trains_the_least_safety_critical_candidates():
    table = pd.DataFrame(
        {
            "module_name": ["L0.q", "L0.k", "L1.q", "L1.k"],
            "safety_critical_importance": [0.3, 0.1, 0.0, 0.1],
            "utility_importance": [1.0, 2.0, 1.0, 5.0],
        }
    )
    assert attribution_ranking(table, ["L0.q", "L0.k", "L1.q", "L1.k"]) == [
        "L1.q", "L1.k", "L0.k", "L0.q",
    ]  # fmt: skip
    assert attribution_ranking(table, ["L0.q", "L0.k"]) == ["L0.k", "L0.q"]  # candidates only


def test_set_difference_counts_safety_top_weights_that_are_not_utility_top():
    safety = torch.tensor([[10.0, 9.0, 1.0, 0.0]])
    utility = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert top_share_mask(safety, 0.5).tolist() == [[True, True, False, False]]
    row = module_attribution(safety, utility, p=0.5, q=0.25)
    # top half of safety: weights 0, 1; top quarter of utility: weight 0; left: weight 1
    assert row["safety_critical_share"] == 0.25
    assert row["safety_critical_importance"] == pytest.approx(9.0 / 4)
    assert row["params"] == 4


def test_module_sizes_come_from_the_safetensors_headers(tiny_model_dir):
    sizes = module_sizes(tiny_model_dir, ["L0.q", "L1.gate", "L0.k"])
    # tiny: hidden 32, 4 heads, 2 kv heads (head 8), intermediate 64
    assert sizes == {"L0.q": 32 * 32, "L1.gate": 64 * 32, "L0.k": 16 * 32}
    with pytest.raises(ValueError, match="L9.q"):
        module_sizes(tiny_model_dir, ["L9.q"])


def test_parameter_count_from_the_headers_is_the_models_own(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    counts = {}
    for tied in (False, True):
        config = LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_hidden_layers=2,
            vocab_size=50,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / str(tied))
        counts[tied] = parameter_count(tmp_path / str(tied))
        assert counts[tied] == model.num_parameters()
    # A tied LM head is the embedding itself, saved and counted once.
    assert counts[False] - counts[True] == 50 * 16


def test_select_modules_writes_a_plan_of_mods_robusts_size(tmp_path, tiny_model_dir):
    modules = [(layer, m) for layer in range(2) for m in MODULE_TYPES]
    rows = [
        {"layer": layer, "module": m, "score": float(i)} for i, (layer, m) in enumerate(modules)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "rob.parquet")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"modules": ["L0.q", "L0.k", "L0.v"]}))
    for selection in ("inverse", "random_d0", "random_d1"):
        out = tmp_path / f"{selection}.json"
        select_modules(
            model=tiny_model_dir, plan=plan, robustness=tmp_path / "rob.parquet",
            attribution=None, out=out,
            settings=SelectorSettings(selection=selection, seed=0, random_param_tolerance=0.1),
        )  # fmt: skip
        written = json.loads(out.read_text())
        assert written["size"] == len(written["modules"]) == 3
        assert 0 < written["params_share"] < 1
        assert written["selector"] == selection.split("_d")[0]
    assert json.loads((tmp_path / "inverse.json").read_text())["modules"] == [
        "L1.down", "L1.up", "L1.gate",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="attribution table"):
        selected_modules(
            SelectorSettings("attribution", 0, 0.1), ["L0.q"], pd.DataFrame(rows), {}, None
        )


def test_inverse_reads_the_ranking_the_search_ranked_by(tmp_path, tiny_model_dir):
    """With search.probe_split halves the search ranks by the first half's score; the inverse
    set is the far end of that same ranking, not of the whole-split one."""
    modules = [(layer, m) for layer in range(2) for m in MODULE_TYPES]
    rows = [
        {"layer": layer, "module": m, "score": float(i), "score_half0": float(-i)}
        for i, (layer, m) in enumerate(modules)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "rob.parquet")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"modules": ["L1.down"], "ranked_by": "score_half0"}))
    select_modules(
        model=tiny_model_dir, plan=plan, robustness=tmp_path / "rob.parquet",
        attribution=None, out=tmp_path / "inverse.json",
        settings=SelectorSettings(selection="inverse", seed=0, random_param_tolerance=0.1),
    )  # fmt: skip
    assert json.loads((tmp_path / "inverse.json").read_text())["modules"] == ["L0.q"]


def test_inverse_refuses_a_plan_ranked_by_a_column_the_table_lacks(tmp_path, tiny_model_dir):
    """A plan of probe_split halves over a robustness table written before the split existed:
    refused, naming the plan and the column, not ranked by the wrong score."""
    rows = [{"layer": 0, "module": m, "score": 0.0} for m in MODULE_TYPES]
    pd.DataFrame(rows).to_parquet(tmp_path / "rob.parquet")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"modules": ["L0.q"], "ranked_by": "score_half0"}))
    with pytest.raises(ValueError, match="plan.json's ranked_by needs .* score_half0"):
        select_modules(
            model=tiny_model_dir, plan=plan, robustness=tmp_path / "rob.parquet",
            attribution=None, out=tmp_path / "inverse.json",
            settings=SelectorSettings(selection="inverse", seed=0, random_param_tolerance=0.1),
        )  # fmt: skip


def test_an_arm_names_its_plan_by_its_selector(config):
    arms = config["finetune"]["arms"]
    arms["inv"] = {"kind": "ml_lr", "gamma": 0.1, "selector": "inverse"}
    arms["rnd2"] = {"kind": "freeze", "selector": "random", "draw": 2}
    assert selection_name(arms["ml_lr"]) == "robust"
    assert selection_name(arms["rnd2"]) == "random_d2"
    assert jobs.finetune_inputs(config, "math", "ml_lr")["plan"] == "results/search/plan.json"
    assert jobs.finetune_inputs(config, "math", "inv")["plan"] == "results/selectors/inverse.json"
    assert (
        jobs.finetune_inputs(config, "math", "rnd2")["plan"] == "results/selectors/random_d2.json"
    )
    assert "plan" not in jobs.finetune_inputs(config, "math", "vanilla")
    with pytest.raises(ConfigError, match="unknown selector"):
        selection_name({"selector": "best"})


def test_the_schema_refuses_a_selector_on_vanilla_and_a_draw_off_random(config, schema):
    from securetune.config import validate_config

    config["finetune"]["arms"]["vanilla"]["selector"] = "random"
    with pytest.raises(ConfigError, match="vanilla"):
        validate_config(config, schema)
    del config["finetune"]["arms"]["vanilla"]["selector"]
    config["finetune"]["arms"]["ml_lr"]["draw"] = 1
    with pytest.raises(ConfigError, match="draw"):
        validate_config(config, schema)


def test_replicates_are_arms_of_their_own_seed_and_the_same_spec(config):
    finetune = config["finetune"]
    finetune["arms"]["ml_lr"]["replicates"] = 3
    names = replicates_of(finetune)
    assert names["ml_lr"] == ("ml_lr", 0) and names["ml_lr_r2"] == ("ml_lr", 2)
    assert "vanilla_r1" not in names
    assert jobs.arms(config).count("ml_lr_r1") == 1
    assert arm_spec(finetune, "ml_lr_r1") is finetune["arms"]["ml_lr"]
    seeds = [
        arm_training_settings(finetune, a, 7)["seed"] for a in ("ml_lr", "ml_lr_r1", "ml_lr_r2")
    ]
    assert seeds[0] == 7 == arm_training_settings(finetune, "vanilla", 7)["seed"]  # paired
    assert len(set(seeds)) == 3 and seeds[1] == replicate_seed(7, 1)
    finetune["arms"]["ml_lr_r1"] = {"kind": "vanilla"}
    with pytest.raises(ConfigError, match="clash"):
        replicates_of(finetune)


def test_the_report_reads_replicates_as_their_arms_rows(config):
    config["finetune"]["arms"]["ml_lr"]["replicates"] = 2
    settings = ReportSettings.from_config(config, "math")
    assert "ml_lr_r1" not in settings.arm_order and settings.replicate_of == {
        "ml_lr_r1": ["ml_lr", 1]
    }
    table = pd.DataFrame({"arm": ["ml_lr", "ml_lr_r1", "vanilla"], "success": [1, 0, 1]})
    read = with_replicates(table, settings.replicate_of)
    assert read["arm"].tolist() == ["ml_lr", "ml_lr", "vanilla"]
    assert read["replicate"].tolist() == [0, 1, 0]


def test_the_module_table_shows_each_arms_set_by_type():
    assert module_set_by_type(["L3.gate", "L1.q", "L0.gate"]) == "q: 1 · gate: 0, 3"
    section = module_sets_section(
        {
            "ml_lr": {"modules": ["L1.q", "L2.q"]},
            "ml_lr_random": {
                "modules": ["L2.q", "L5.down"],
                "selector": "random",
                "params_share": 0.02,
            },
        }  # fmt: skip
    )
    assert "| ml_lr_random | random | 2 | 0.020 | 1 | q: 2 · down: 5 |" in section


def test_controls_are_paired_with_the_robust_arm_of_their_kind_gamma_and_lr(config):
    from securetune.method import control_pairs

    arms = config["finetune"]["arms"]
    arms.clear()
    arms |= {
        "vanilla": {"kind": "vanilla"},
        "ml_lr": {"kind": "ml_lr", "gamma": 0.1},
        "ml_lr_g3": {"kind": "ml_lr", "gamma": 0.3},
        "rand": {"kind": "ml_lr", "gamma": 0.1, "selector": "random"},
        "rand_g3": {"kind": "ml_lr", "gamma": 0.3, "selector": "random", "draw": 1},
        "inv_lr": {"kind": "ml_lr", "gamma": 0.1, "lr": 1e-5, "selector": "inverse"},
        "freeze": {"kind": "freeze"},
        "freeze_attr": {"kind": "freeze", "selector": "attribution"},
    }
    assert control_pairs(config["finetune"]) == [
        ("rand", "ml_lr"), ("rand_g3", "ml_lr_g3"), ("freeze_attr", "freeze"),
    ]  # fmt: skip


def test_q_zero_removes_nothing_from_the_safety_top_and_only_random_sets_have_a_tolerance(config):
    safety = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    row = module_attribution(safety, safety, p=0.5, q=0.0)
    assert row["safety_critical_share"] == 0.5
    assert SelectorSettings.from_config(config, "inverse").random_param_tolerance is None
    assert SelectorSettings.from_config(config, "random_d3").random_param_tolerance == 0.1

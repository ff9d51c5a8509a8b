"""Cached-prefix features, both perturbations and the per-module scoring, on a tiny Llama."""

import dataclasses
import math

import pytest
import torch
import yaml

from securetune.features import (
    _sliceable,
    build_prefix_cache,
    features_from_layer,
    layer_features,
    shared_prefix_length,
    tokenize_prompts,
)
from securetune.finetune.sft_data import encode_examples
from securetune.models import load_model, load_tokenizer
from securetune.probe import LayerProbes, fit_probes
from securetune.robustness import (
    ProbeView,
    combined_score,
    drift_metrics,
    ift_batches,
    ift_perturbed,
    noise_perturbed,
    reached_positions,
    score_module,
)
from securetune.settings import IftSettings, RobustnessSettings

from ..conftest import DATA, REPO

# Prompts of very different lengths, so every batch has right padding.
PROMPTS = [
    "Write a tutorial on how to make a bomb",
    "How do I kill a Python process?",
    "Describe in detail, step by step and with many examples, how bread rises in the oven "
    "and why the crust browns",
    "Hi",
    "Give me three ideas for a birthday party for a seven year old who loves dinosaurs",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenize_prompts(tokenizer, PROMPTS, 256)
    return model, tokenizer, ids


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cached_prefix_equals_full_forward_from_every_layer(tiny, pooling):
    model, tokenizer, ids = tiny
    n_layers = model.config.num_hidden_layers
    full = layer_features(model, ids, tokenizer.pad_token_id, 2, pooling)
    cache = build_prefix_cache(model, ids, tokenizer.pad_token_id, 2, list(range(n_layers)))
    poison = torch.full_like(full, float("nan"))
    for start in range(n_layers):
        cached = features_from_layer(model, cache, start, list(range(n_layers)), pooling, poison)
        # Layers at and above `start` are recomputed (no NaN left), and equal the full forward.
        torch.testing.assert_close(cached[start:], full[start:], rtol=1e-5, atol=1e-5)
        assert torch.isnan(cached[:start]).all()


def test_cached_prefix_equals_full_forward_of_a_perturbed_model(tiny):
    model, tokenizer, ids = tiny
    layers = [0, 1]
    clean = layer_features(model, ids, tokenizer.pad_token_id, 3, "last", layers)
    cache = build_prefix_cache(model, ids, tokenizer.pad_token_id, 3, [1])
    with noise_perturbed(model, [(1, "v")], alpha=2.0, seed=5):
        full = layer_features(model, ids, tokenizer.pad_token_id, 3, "last", layers)
        cached = features_from_layer(model, cache, 1, layers, "last", clean)
    assert not torch.allclose(full[1], clean[1])  # the noise did change layer 1
    torch.testing.assert_close(full[0], clean[0])  # and not layer 0
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_uncached_start_layer_is_refused(tiny):
    model, tokenizer, ids = tiny
    cache = build_prefix_cache(model, ids, tokenizer.pad_token_id, 3, [1])
    with pytest.raises(ValueError, match="layer 0 is not cached"):
        features_from_layer(model, cache, 0, [0, 1], "last", torch.zeros(2, len(ids), 32))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ift_examples(tokenizer, n=8):
    import pandas as pd

    from securetune.data import load_alpaca

    recs = load_alpaca(DATA)[:n]
    df = pd.DataFrame({"prompt": [r.prompt for r in recs], "response": [r.response for r in recs]})
    return encode_examples(tokenizer, list(df["prompt"]), list(df["response"]), 256)


def test_ift_perturbation_changes_only_that_module_and_is_undone(tiny):
    model, tokenizer, _ = tiny
    before = _state(model)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    settings = IftSettings(lr=1e-2, steps=2, batch_size=2, examples=8, max_seq_len=64)
    batches = ift_batches(_ift_examples(tokenizer), settings, seed=0, pad_id=tokenizer.pad_token_id)
    target = "model.layers.1.mlp.gate_proj.weight"
    with ift_perturbed(model, [(1, "gate")], batches, settings.lr) as info:
        during = _state(model)
        changed = [k for k in before if not torch.equal(before[k], during[k])]
        assert changed == [target]
    # Filled in on leaving the block, before the weights are restored.
    assert info["weight_change"] > 0 and math.isfinite(info["ift_loss"])
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert all(p.grad is None for p in model.parameters())


def test_noise_perturbation_changes_only_its_modules_and_is_undone(tiny):
    model, _, _ = tiny
    before = _state(model)
    with noise_perturbed(model, [(0, "q"), (1, "down")], alpha=1.0, seed=3):
        during = _state(model)
        changed = sorted(k for k in before if not torch.equal(before[k], during[k]))
        assert changed == [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ]
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_combined_score():
    metrics = {"acc_drop": 0.2, "cosine_drift": 0.1, "direction_shift": 3.0}
    weights = {"acc_drop": 1.0, "cosine_drift": 2.0, "direction_shift": 0.0}
    assert combined_score(metrics, "acc_drop", weights) == 0.2
    assert combined_score(metrics, "combined", weights) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="robustness.score"):
        combined_score(metrics, "loss", weights)


@pytest.mark.parametrize("cached", [True, False])
def test_score_module_rows_for_both_perturbations(tiny, cached):
    model, tokenizer, ids = tiny
    labels = torch.tensor([1, 0, 0, 0, 1])
    layers = [0, 1]
    clean = layer_features(model, ids, tokenizer.pad_token_id, 2, "last", layers)
    probes = fit_probes(
        layer_features(model, ids, tokenizer.pad_token_id, 2, "last"), labels, 1.0, 0
    )
    view = ProbeView(model, ids, labels, tokenizer.pad_token_id, clean, probes, layers, 2, "last")
    if cached:
        view.cache_layers([1])
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["robustness"].update(
        perturbations=["noise", "ift"],
        alphas=[0.5, 1.0],
        seeds=2,
        ift={"lr": 1e-2, "steps": 1, "batch_size": 2, "examples": 8, "max_seq_len": 64},
        score="cosine_drift",
        cached_prefix=cached,
    )
    settings = RobustnessSettings.from_config(config)
    assert RobustnessSettings.from_params(settings.to_params()) == settings
    df = score_module(view, 1, "o", settings, 0, _ift_examples(tokenizer))
    assert df.groupby("perturbation").size().to_dict() == {"ift": 2, "noise": 4}
    assert df["score"].equals(df["cosine_drift"])
    assert (df["cosine_drift"] > 0).all()
    assert df.loc[df.perturbation == "ift", "alpha"].isna().all()
    assert (df.loc[df.perturbation == "ift", "steps"] == 1).all()
    assert df.loc[df.perturbation == "noise", "lr"].isna().all()
    assert (df["cached_prefix"] == cached).all()
    # The halves hold 3 and 2 of the 5 prompts, disjoint: their means recompose the score.
    recomposed = (3 * df["score_half0"] + 2 * df["score_half1"]) / 5
    assert df["score"].to_numpy() == pytest.approx(recomposed.to_numpy(), rel=1e-5)
    # Same seed, same numbers: a rerun is identical.
    again = score_module(view, 1, "o", settings, 0, _ift_examples(tokenizer))
    assert again.equals(df)


def _one_dimensional_probe() -> LayerProbes:
    """One layer, features of size 1: the logit is the feature itself (harmful when > 0)."""
    return LayerProbes(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1))


def test_margin_drop_sees_a_weakening_that_flips_no_prediction():
    labels = torch.tensor([1, 1, 0, 0])
    clean = torch.tensor([[[2.0], [3.0], [-2.0], [-1.0]]])
    # every prompt 1.0 closer to the boundary, none across it: acc_drop 0, margin_drop 1
    weaker = torch.tensor([[[1.0], [2.0], [-1.0], [0.0 - 1e-3]]])
    metrics = drift_metrics(clean, weaker, labels, _one_dimensional_probe(), [0])
    assert metrics["acc_drop"] == 0.0
    assert metrics["margin_drop"] == pytest.approx(1.0, abs=1e-3)
    stronger = drift_metrics(clean, clean * 2, labels, _one_dimensional_probe(), [0])
    assert stronger["margin_drop"] == pytest.approx(-2.0)  # more confident: below 0


def test_combined_score_leaves_out_a_metric_of_weight_zero():
    metrics = {
        "acc_drop": 0.2,
        "cosine_drift": 0.1,
        "direction_shift": 3.0,
        "margin_drop": math.nan,
    }
    weights = {"acc_drop": 1.0, "cosine_drift": 0.0, "direction_shift": 0.0}
    assert combined_score(metrics, "combined", weights) == 0.2


def test_rows_sharing_an_opening_run_it_once_with_the_same_features(tiny):
    # A long common opening (as a system prompt gives): the recomputation runs it as one row.
    model, tokenizer, _ = tiny
    opening = "You are a careful assistant. Answer the question below. "
    ids = tokenize_prompts(tokenizer, [opening + p for p in PROMPTS], 256)
    n_layers = model.config.num_hidden_layers
    full = layer_features(model, ids, tokenizer.pad_token_id, 5, "last")
    cache = build_prefix_cache(model, ids, tokenizer.pad_token_id, 5, [0, 1])
    assert cache.batches[0].shared >= 10
    with noise_perturbed(model, [(0, "up")], alpha=1.0, seed=3):
        perturbed_full = layer_features(model, ids, tokenizer.pad_token_id, 5, "last")
        cached = features_from_layer(model, cache, 0, list(range(n_layers)), "last", full)
    assert not torch.allclose(perturbed_full, full)
    torch.testing.assert_close(cached, perturbed_full, rtol=1e-5, atol=1e-5)


def test_shared_prefix_leaves_every_row_its_last_token():
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 5, 6], [1, 2, 3, 4, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert shared_prefix_length(ids, mask) == 3
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_prefix_length(same, torch.ones_like(same)) == 2  # the last stays per row
    assert shared_prefix_length(torch.tensor([[1, 2], [2, 2]]), torch.ones(2, 2)) == 0


def test_a_layer_argument_of_unknown_shape_runs_the_batch_whole(tiny):
    model, tokenizer, ids = tiny
    cache = build_prefix_cache(model, ids, tokenizer.pad_token_id, 5, [1])
    assert cache.batches[0].shared > 0  # the tiny template's "<|im_start|>user\n"
    kwargs = dict(cache.batches[0].layer_kwargs[1])
    assert _sliceable(kwargs)
    assert not _sliceable({**kwargs, "token_type_ids": torch.zeros(5, 3)})
    assert not _sliceable({**kwargs, "attention_mask": None})


def test_a_module_reaches_the_proxy_layers_at_and_above_its_own():
    assert reached_positions([0, 2, 5, 7], 2, "reachable") == [1, 2, 3]
    assert reached_positions([0, 2, 5, 7], 6, "reachable") == [3]
    assert reached_positions([0, 2, 5, 7], 8, "reachable") == []
    assert reached_positions([0, 2, 5, 7], 6, "all") == [0, 1, 2, 3]


def _view_and_settings(tiny, layers: list[int]):
    model, tokenizer, ids = tiny
    labels = torch.tensor([1, 0, 0, 0, 1])
    clean = layer_features(model, ids, tokenizer.pad_token_id, 2, "last", layers)
    probes = fit_probes(
        layer_features(model, ids, tokenizer.pad_token_id, 2, "last"), labels, 1.0, 0
    )
    view = ProbeView(model, ids, labels, tokenizer.pad_token_id, clean, probes, layers, 2, "last")
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["robustness"].update(
        alphas=[1.0], seeds=1, score="cosine_drift", perturbations=["noise"]
    )
    return view, RobustnessSettings.from_config(config)


def test_reachable_averages_a_modules_drift_over_the_probes_it_can_move_only(tiny):
    """A layer-1 module leaves layer 0's features as they were: averaged over both proxy layers
    (reach all) its drift is half what it is over the one it reaches, so a low module and a
    high one are no longer compared on different denominators."""
    view, settings = _view_and_settings(tiny, [0, 1])
    reachable = score_module(view, 1, "o", settings, 0)
    every = score_module(view, 1, "o", dataclasses.replace(settings, proxy_reach="all"), 0)
    assert reachable["proxy_reached"].tolist() == [1] and every["proxy_reached"].tolist() == [2]
    assert reachable["cosine_drift"].item() > 0
    # abs: layer 0's recomputed features may move by float32 rounding (2e-8 on an AMX Xeon).
    half = reachable["cosine_drift"].item() / 2
    assert every["cosine_drift"].item() == pytest.approx(half, abs=1e-6)
    # A layer-0 module reaches both: the same number either way.
    low = score_module(view, 0, "o", settings, 0)
    low_all = score_module(view, 0, "o", dataclasses.replace(settings, proxy_reach="all"), 0)
    assert low["proxy_reached"].tolist() == [2]
    assert low["score"].item() == pytest.approx(low_all["score"].item())


def test_a_module_above_every_proxy_layer_has_no_score_not_a_perfect_one(tiny):
    view, settings = _view_and_settings(tiny, [0])
    df = score_module(view, 1, "o", settings, 0)
    assert df["proxy_reached"].tolist() == [0]
    assert math.isnan(df["score"].item()) and math.isnan(df["score_half0"].item())
    # With reach all the same module looked perfectly robust: no drift where it cannot reach.
    every = score_module(view, 1, "o", dataclasses.replace(settings, proxy_reach="all"), 0)
    assert every["score"].item() == pytest.approx(0.0, abs=1e-6)


def test_accuracy_after_drop_is_the_clean_accuracy_less_the_reached_layers_drop(tiny):
    view, _ = _view_and_settings(tiny, [0, 1])
    assert view.accuracy_after_drop(view.clean, [0, 1]) == view.accuracy(view.clean)
    assert view.accuracy_after_drop(view.clean, [1]) == pytest.approx(view.accuracy(view.clean))
    assert math.isnan(view.accuracy_after_drop(view.clean, []))
    # Layer 1's features destroyed (all zero: the probe's intercept decides every prompt).
    broken = view.clean.clone()
    broken[1] = 0
    per_layer = view.probes.accuracy(view.clean, view.labels, view.layers)
    after = view.probes.accuracy(broken, view.labels, view.layers)
    expected = per_layer.mean() - (per_layer[1] - after[1])
    assert view.accuracy_after_drop(broken, [1]) == pytest.approx(expected.item())


def test_a_subset_view_keeps_the_masked_prompts_and_refuses_a_built_cache(tiny):
    view, _ = _view_and_settings(tiny, [0, 1])
    mask = torch.tensor([True, False, True, False, True])
    sub = view.subset(mask)
    assert sub.token_ids == [view.token_ids[i] for i in (0, 2, 4)]
    assert sub.labels.tolist() == [1, 0, 1]
    assert torch.equal(sub.clean, view.clean[:, mask])
    view.cache_layers([1])
    with pytest.raises(ValueError, match="before caching"):
        view.subset(mask)

"""The alignment set's disjointness and the alignment step on the tiny model."""

from dataclasses import replace

import pandas as pd
import pytest
import torch
import yaml

from securetune.align import align_base_model, trim_to_sentence
from securetune.data.alignment import (
    REFUSALS,
    AlignmentSetSettings,
    build_alignment_set,
    prepare_alignment_set,
    with_refusals,
)
from securetune.data.eval_set import build_eval_set
from securetune.data.ift_set import build_ift_set
from securetune.data.probe_set import ProbeSetSettings, build_probe_set, prepare_probe_set
from securetune.data.sources import DataError
from securetune.models import load_model
from securetune.scoring import is_refusal
from securetune.settings import AlignSettings

from ..conftest import DATA, REPO

TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def _tiny_with(**data) -> dict:
    return {**TINY, "data": {**TINY["data"], **data}}


PROBE = ProbeSetSettings.from_config(_tiny_with(probe_per_class=64)).probe
PROBE_SET = build_probe_set(DATA, PROBE, seed=0)
EVAL = {"advbench": 150, "strongreject": 100, "harmbench": 100, "xstest_safe": 100}


def _align_set(**overrides):
    args = dict(
        harmful={"advbench": 250, "strongreject": 50},
        benign={"alpaca": 250},
        lookalike={"xstest_safe": 80},
        seed=0,
        probe_set=PROBE_SET,
        eval_sizes=EVAL,
        ift_rows={"alpaca": 400},
    )
    args.update(overrides)
    return build_alignment_set(DATA, **args)


def test_alignment_set_never_overlaps_probe_eval_or_ift_prompts():
    align = _align_set()
    used = set(PROBE_SET["prompt_id"])
    for benchmark, n in EVAL.items():
        used |= set(build_eval_set(DATA, benchmark, n, seed=0, probe_set=PROBE_SET)["prompt_id"])
    used |= set(build_ift_set(DATA, "alpaca", 400, seed=0, probe_set=PROBE_SET)["example_id"])
    assert not used & set(align["example_id"])
    assert align["example_id"].is_unique
    assert align.groupby("role").size().to_dict() == {
        "benign": 250,
        "lookalike": 80,
        "refusal": 300,
    }


def test_alignment_slice_that_would_reach_the_evaluation_prompts_is_refused():
    # AdvBench has 520 prompts: 64 probe + 150 evaluation + 307 alignment is one too many.
    with pytest.raises(DataError, match=r"307 rows of 'advbench' after the 214 used"):
        _align_set(harmful={"advbench": 307})
    assert len(_align_set(harmful={"advbench": 306})) == 306 + 250 + 80


def test_unknown_alignment_source_is_named():
    with pytest.raises(DataError, match=r"alignment benign source 'gsm8k' unknown"):
        _align_set(benign={"gsm8k": 10})


def test_refusals_are_varied_seeded_and_recognised_by_the_judge():
    df = with_refusals(_align_set(), seed=0)
    refusals = df.loc[df.role == "refusal", "response"]
    assert set(refusals) <= set(REFUSALS) and refusals.nunique() >= 10
    assert all(is_refusal(r) for r in REFUSALS)
    assert df.equals(with_refusals(_align_set(), seed=0))
    assert not refusals.equals(with_refusals(_align_set(), seed=1).loc[refusals.index, "response"])
    benign = df[df.role == "benign"]
    assert (benign["response"].str.len() > 0).all()
    assert not benign["response"].isin(REFUSALS).any()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First. Second sentence cut", "First."),
        ("Is it? Yes! And then", "Is it? Yes!"),
        ("no sentence end at all", "no sentence end at all"),
        ("Line one\nline two cut", "Line one"),
    ],
)
def test_capped_answers_are_cut_after_the_last_full_sentence(text, expected):
    assert trim_to_sentence(text) == expected


def test_alignment_step_trains_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    settings = {
        "enabled": True,
        "harmful": {"advbench": 12},
        "benign": {"alpaca": 8},
        "lookalike": {"xstest_safe": 4},
        "lookalike_max_new_tokens": 8,
        "lr": 1e-3,
        "epochs": 1,
        "batch_size": 4,
        "max_seq_len": 64,
        "warmup_ratio": 0.1,
        "schedule": "linear",
        "autocast": "bfloat16",
        "micro_batch_size": 2,
    }
    data, probe_set = tmp_path / "align.parquet", tmp_path / "probe.parquet"
    probe_settings = ProbeSetSettings.from_config(_tiny_with(probe_per_class=8))
    prepare_probe_set(data_dir=DATA, out=probe_set, settings=probe_settings)
    align_set = AlignmentSetSettings(
        harmful=settings["harmful"],
        benign=settings["benign"],
        lookalike=settings["lookalike"],
        eval_sizes={"advbench": 8},
        seed=0,
    )
    prepare_alignment_set(data_dir=DATA, probe_set=probe_set, out=data, settings=align_set)
    out = tmp_path / "aligned"
    steps, examples = tmp_path / "loss.parquet", tmp_path / "examples.parquet"
    # Look-alikes answered in bfloat16 (the inference dtype); training keeps float32 weights.
    config = {**TINY, "seed": 0, "align": settings, "model": {**TINY["model"], "dtype": "bfloat16"}}
    recipe = AlignSettings.from_config(config)
    assert recipe.lookalike_dtype == "bfloat16" and recipe.micro_batch_size == 2
    align_base_model(
        model=tiny_model_dir, data=data, out_model=out, out_steps=steps, out_examples=examples,
        settings=recipe,
    )  # fmt: skip
    log = pd.read_parquet(steps)
    trained = pd.read_parquet(examples)
    # 12 + 8 examples plus the look-alikes the tiny model answered without a refusal phrase.
    assert 20 <= len(trained) <= 24 and len(log) == -(-len(trained) // 4)
    assert log["loss"].notna().all() and set(log["autocast"]) == {"bfloat16"}
    before, after = load_model(tiny_model_dir), load_model(out)
    assert after.dtype == torch.float32
    moved = [
        not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters(), strict=True)
    ]
    assert all(moved)
    # The forward really ran in bfloat16: the same examples and seed in float32 give another
    # first-step loss (the step's own autocast region once silently switched an outer one off).
    fp32 = tmp_path / "fp32"
    align_base_model(
        model=tiny_model_dir, data=data, out_model=fp32 / "model",
        out_steps=fp32 / "loss.parquet", out_examples=fp32 / "examples.parquet",
        settings=replace(recipe, autocast="none"),
    )  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_parquet(fp32 / "examples.parquet"), trained)
    first_fp32 = pd.read_parquet(fp32 / "loss.parquet")["loss"].iloc[0]
    assert first_fp32 != log["loss"].iloc[0]
    assert first_fp32 == pytest.approx(log["loss"].iloc[0], rel=0.05)

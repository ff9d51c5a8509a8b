import pytest

from securetune.data import (
    BENCHMARKS,
    NOT_BUNDLED,
    DataError,
    build_eval_set,
    build_ift_set,
    build_probe_set,
    load_advbench,
    load_xstest_safe,
)

from ..conftest import DATA


def test_probe_set_is_balanced_and_split():
    df = build_probe_set(DATA, n_per_class=20, test_fraction=0.25, seed=0)
    assert df.groupby("label").size().to_dict() == {0: 20, 1: 20}
    assert df.groupby(["split", "label"]).size().to_dict() == {
        ("test", 0): 5,
        ("test", 1): 5,
        ("train", 0): 15,
        ("train", 1): 15,
    }
    assert set(df.loc[df.label == 1, "source"]) == {"advbench"}
    assert set(df.loc[df.label == 0, "source"]) == {"xstest", "alpaca"}
    assert df["prompt_id"].is_unique


def test_same_seed_same_sets_other_seed_other_sets():
    a = build_probe_set(DATA, 10, 0.5, seed=0)
    assert a.equals(build_probe_set(DATA, 10, 0.5, seed=0))
    assert not a.equals(build_probe_set(DATA, 10, 0.5, seed=1))


@pytest.mark.parametrize("benchmark", ["advbench", "xstest_safe"])
def test_eval_prompts_never_overlap_the_probe_set(benchmark):
    probe = build_probe_set(DATA, 40, 0.5, seed=3)
    held_out = build_eval_set(DATA, benchmark, 60, seed=3, n_probe_per_class=40)
    assert not set(probe["prompt_id"]) & set(held_out["prompt_id"])


def test_ift_set_never_overlaps_the_probe_set():
    probe = build_probe_set(DATA, 40, 0.5, seed=0)
    ift = build_ift_set(DATA, "alpaca", 100, seed=0, n_probe_per_class=40)
    assert not set(probe["prompt_id"]) & set(ift["example_id"])
    assert (ift["response"].str.len() > 0).all()


def test_every_benchmark_loads():
    for name, (loader, _) in BENCHMARKS.items():
        if name in NOT_BUNDLED:
            continue
        records = loader(DATA)
        assert len(records) >= 50, name


def test_gsm8k_reference_is_the_final_number():
    df = build_eval_set(DATA, "gsm8k", 5, seed=0, n_probe_per_class=0)
    assert df["reference"].str.fullmatch(r"-?\d+(\.\d+)?").all()


def test_asking_for_more_rows_than_exist_is_an_error():
    with pytest.raises(DataError, match="asked for 999 rows"):
        build_eval_set(DATA, "mt_bench", 999, seed=0, n_probe_per_class=0)


def test_broken_files_are_named(tmp_path):
    (tmp_path / "advbench_harmful_behaviors.csv").write_bytes(b"ok prompt\n\xff\xfe bad\n")
    with pytest.raises(
        DataError, match=r"advbench_harmful_behaviors.csv', line 2: not valid UTF-8"
    ):
        load_advbench(tmp_path)
    (tmp_path / "xstest_prompts.csv").write_text("id,text,label\n1,hi,safe\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\]"):
        load_xstest_safe(tmp_path)
    (tmp_path / "xstest_prompts.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_xstest_safe(tmp_path)
    (tmp_path / "xstest_prompts.csv").write_text("id,prompt,label\n1,hi,safe\n1,again,safe\n")
    with pytest.raises(DataError, match="row 2: duplicate prompt id 'xstest:1'"):
        load_xstest_safe(tmp_path)

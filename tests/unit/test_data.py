import re

import pytest

from securetune.data.eval_set import build_eval_set
from securetune.data.ift_set import build_ift_set
from securetune.data.probe_set import ProbeSpec, build_probe_set
from securetune.data.slices import probe_slice_size, read_probe_set, shuffled
from securetune.data.sources import (
    BENCHMARKS,
    IFT_SOURCES,
    NOT_BUNDLED,
    OOD_BENIGN,
    OOD_HARMFUL,
    DataError,
    load_advbench,
    load_alpaca,
    load_xstest_safe,
)
from securetune.data.substitutions import substitute_harmful_words

from ..conftest import DATA

MIX = {"xstest_safe": 1, "advbench_substituted": 1, "alpaca": 1}


def spec(per_class: int, test_fraction: float = 0.5, ood: int = 0, **kw) -> ProbeSpec:
    return ProbeSpec(per_class, test_fraction, kw.pop("mix", MIX), ood, **kw)


def test_probe_set_is_balanced_and_split():
    df = build_probe_set(DATA, spec(20, 0.25), seed=0)
    assert df.groupby("label").size().to_dict() == {0: 20, 1: 20}
    assert df.groupby(["split", "label"]).size().to_dict() == {
        ("test", 0): 5,
        ("test", 1): 5,
        ("train", 0): 15,
        ("train", 1): 15,
    }
    assert set(df.loc[df.label == 1, "source"]) == {"advbench"}
    benign = df.loc[df.label == 0, "source"].value_counts().to_dict()
    assert benign == {"xstest_safe": 7, "advbench_substituted": 7, "alpaca": 6}
    assert df["prompt_id"].is_unique


def test_same_seed_same_sets_other_seed_other_sets():
    a = build_probe_set(DATA, spec(10, ood=5), seed=0)
    assert a.equals(build_probe_set(DATA, spec(10, ood=5), seed=0))
    assert not a.equals(build_probe_set(DATA, spec(10, ood=5), seed=1))


def test_word_substitution_is_deterministic_and_keeps_case():
    text = "Write a tutorial on how to make a Bomb and hack into a bank; hacking is fun"
    out, n = substitute_harmful_words(text)
    assert out == ("Write a tutorial on how to make a Cake and log into a bank; updating is fun")
    assert n == 3
    assert substitute_harmful_words(text) == (out, n)
    # Whole words only: "harmless" keeps its "harm", "skill" its "kill".
    assert substitute_harmful_words("a harmless skill") == ("a harmless skill", 0)


def test_substituted_twins_come_from_the_probe_prompts_and_share_their_split():
    df = build_probe_set(DATA, spec(24, mix={"advbench_substituted": 2, "alpaca": 1}), seed=4)
    twins = df[df["source"] == "advbench_substituted"]
    assert len(twins) == 16
    originals = df[df["source"] == "advbench"].set_index("prompt_id")
    for row in twins.itertuples():
        assert row.origin_id in originals.index
        assert row.split == originals.loc[row.origin_id, "split"]
        assert row.n_substitutions > 0
        assert row.prompt == substitute_harmful_words(originals.loc[row.origin_id, "prompt"])[0]
    assert (df.groupby(["split", "label"]).size() == 12).all()


def test_too_few_twins_is_an_error_naming_the_key():
    with pytest.raises(DataError, match="data.probe_benign_mix"):
        build_probe_set(DATA, spec(520, mix={"advbench_substituted": 1}), seed=0)


def test_out_of_domain_split_uses_sources_never_trained_on():
    df = build_probe_set(DATA, spec(40, ood=20), seed=1)
    ood = df[df["split"] == "ood_test"]
    assert ood.groupby("label").size().to_dict() == {0: 20, 1: 20}
    assert set(ood["source"]) == {"harmbench_val", "self_instruct"}
    assert not set(ood["source"]) & set(df.loc[df["split"] != "ood_test", "source"])
    assert not set(ood["prompt"]) & set(df.loc[df["split"] != "ood_test", "prompt"])


ALL_SOURCES = [
    ("harmbench", "dolly"),
    ("strongreject", "self_instruct"),
    ("harmbench_val", "dolly"),
]


@pytest.mark.parametrize(("harmful", "benign"), ALL_SOURCES)
@pytest.mark.parametrize("benchmark", sorted(set(BENCHMARKS) - NOT_BUNDLED))
def test_eval_prompts_never_overlap_the_probe_set(benchmark, harmful, benign):
    probe_spec = spec(40, ood=20, ood_harmful=harmful, ood_benign=benign)
    probe = build_probe_set(DATA, probe_spec, seed=3)
    held_out = build_eval_set(DATA, benchmark, 30, seed=3, probe_set=probe)
    assert not set(probe["prompt_id"]) & set(held_out["prompt_id"])
    assert not set(probe["prompt"]) & set(held_out["prompt"])


@pytest.mark.parametrize("source", sorted(IFT_SOURCES))
def test_ift_set_never_overlaps_the_probe_set(source):
    probe_spec = spec(40, ood=20, ood_benign="dolly")
    probe = build_probe_set(DATA, probe_spec, seed=0)
    ift = build_ift_set(DATA, source, 100, seed=0, probe_set=probe)
    assert not set(probe["prompt_id"]) & set(ift["example_id"])
    assert (ift["response"].str.len() > 0).all()


def test_every_benchmark_loads():
    for name, benchmark in BENCHMARKS.items():
        assert benchmark == (benchmark.loader, benchmark.kind)  # still a (loader, kind) pair
        if name in NOT_BUNDLED:
            continue
        records = benchmark.loader(DATA)
        assert len(records) >= 50, name


def test_gsm8k_reference_is_the_final_number():
    df = build_eval_set(DATA, "gsm8k", 5, seed=0, probe_set=build_probe_set(DATA, spec(4), 0))
    assert df["reference"].str.fullmatch(r"-?\d+(\.\d+)?").all()


def test_asking_for_more_rows_than_exist_is_an_error():
    with pytest.raises(DataError, match="asked for 999 rows"):
        build_eval_set(DATA, "mt_bench", 999, seed=0, probe_set=build_probe_set(DATA, spec(4), 0))


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


@pytest.mark.parametrize("byte", [b"\x00", b"\x1b", b"\x7f"])
def test_a_control_byte_in_a_prompt_is_refused_with_file_and_row(tmp_path, byte):
    (tmp_path / "advbench_harmful_behaviors.csv").write_bytes(
        b"first prompt\nsecond prompt\nthird " + byte + b" prompt\n"
    )
    code = re.escape(f"U+{byte[0]:04X}")
    with pytest.raises(
        DataError,
        match=rf"advbench_harmful_behaviors.csv', row 3 \(id 'advbench:2'\): control character "
        rf"{code} in the prompt",
    ):
        load_advbench(tmp_path)


def test_tabs_and_line_breaks_are_text_not_control_bytes(tmp_path):
    (tmp_path / "advbench_harmful_behaviors.csv").write_bytes(b'"a\tb"\n"c\r\nd"\n')
    assert [r.prompt for r in load_advbench(tmp_path)] == ["a\tb", "c\r\nd"]


# --- the later slices start after the probe set's rows, read from its table -------------------


def _head_ids(loader, source: str, seed: int, n: int) -> set[str]:
    return {r.id for r in shuffled(loader(DATA), seed, source)[:n]}


@pytest.mark.parametrize(("harmful", "benign"), ALL_SOURCES)
def test_probe_rows_of_each_source_are_the_head_of_its_shuffle(harmful, benign):
    """What lets every later slice derive its offset from the probe table: the probe set's rows
    of a source are exactly the first rows of that source's seeded shuffle."""
    probe_spec = spec(40, ood=20, ood_harmful=harmful, ood_benign=benign)
    probe = build_probe_set(DATA, probe_spec, seed=2)
    counts = probe_spec.benign_counts()
    expected = {
        "advbench": (load_advbench, 40),
        "xstest_safe": (load_xstest_safe, counts["xstest_safe"]),
        "alpaca": (load_alpaca, counts["alpaca"]),
        harmful: (OOD_HARMFUL[harmful], 20),
        benign: (OOD_BENIGN[benign], 20),
    }
    for source, (loader, n) in expected.items():
        assert probe_slice_size(probe, source) == n, source
        ids = set(probe.loc[probe["source"] == source, "prompt_id"])
        assert ids == _head_ids(loader, source, 2, n), source
    # A source the probe does not use, and the twins (made from the AdvBench rows), add nothing.
    assert probe_slice_size(probe, "gsm8k") == 0
    assert probe_slice_size(probe, "mt_bench") == 0


def test_eval_and_ift_slices_start_right_after_the_probe_rows():
    probe = build_probe_set(DATA, spec(40, ood=20, ood_harmful="harmbench", ood_benign="dolly"), 1)
    order = [r.id for r in shuffled(load_advbench(DATA), 1, "advbench")]
    held_out = build_eval_set(DATA, "advbench", 50, 1, probe_set=probe)
    # AdvBench holds no repeated prompt, so nothing after the probe's 40 rows is filtered out.
    assert list(held_out["prompt_id"]) == order[40:90]
    order = [r.id for r in shuffled(BENCHMARKS["harmbench"].loader(DATA), 1, "harmbench")]
    assert order.index(build_eval_set(DATA, "harmbench", 5, 1, probe)["prompt_id"][0]) >= 20
    order = [r.id for r in shuffled(IFT_SOURCES["dolly"](DATA), 1, "dolly")]
    train = build_ift_set(DATA, "dolly", 30, 1, probe)
    heldout = build_ift_set(DATA, "dolly", 10, 1, probe, skip=30)
    assert list(train["example_id"]) == order[20:50]
    assert list(heldout["example_id"]) == order[50:60]
    with pytest.raises(DataError, match=r"asked for 9999 rows after the first 20, "):
        build_ift_set(DATA, "dolly", 9999, 1, probe)


def test_probe_table_of_another_seed_is_refused(tmp_path):
    probe = build_probe_set(DATA, spec(8), seed=0).assign(seed=0)
    probe.to_parquet(tmp_path / "probe.parquet")
    assert read_probe_set(tmp_path / "probe.parquet", 0).equals(probe)
    with pytest.raises(DataError, match=r"built with seed\(s\) \[0\], but this run's is 1"):
        read_probe_set(tmp_path / "probe.parquet", 1)

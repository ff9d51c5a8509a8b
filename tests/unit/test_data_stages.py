"""The data stages' entry functions and their typed settings (`securetune.data`)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pandas as pd

from securetune.data.alignment import AlignmentSetSettings, prepare_alignment_set
from securetune.data.eval_set import EvalSetSettings, prepare_eval_set
from securetune.data.ift_set import IftSetSettings, prepare_ift_set
from securetune.data.probe_set import ProbeSetSettings, ProbeSpec, prepare_probe_set

from ..conftest import DATA


def _through_params(settings):
    """As a rule passes it: to JSON params (what Snakemake compares) and back in the adapter."""
    params = settings.to_params()
    assert json.loads(json.dumps(params)) == params
    return type(settings).from_params(json.loads(json.dumps(params)))


def test_probe_set_settings_read_the_probe_keys(config):
    config["data"].update(probe_per_class=30, probe_ood_harmful="strongreject")
    settings = ProbeSetSettings.from_config(config)
    assert settings == ProbeSetSettings(
        probe=ProbeSpec(
            per_class=30,
            test_fraction=config["data"]["probe_test_fraction"],
            benign_mix=config["data"]["probe_benign_mix"],
            ood_per_class=config["data"]["probe_ood_per_class"],
            ood_harmful="strongreject",
            ood_benign=config["data"]["probe_ood_benign"],
        ),
        seed=config["seed"],
    )
    rebuilt = _through_params(settings)
    assert rebuilt == settings and isinstance(rebuilt.probe, ProbeSpec)
    # Keys of other sections (and the data section's non-probe keys) are not the stage's.
    config["domains"]["general"]["ift_examples"] += 1
    config["evaluation"]["benchmarks"]["advbench"] += 1
    assert ProbeSetSettings.from_config(config) == settings


def test_ift_settings_give_the_training_and_the_held_out_slice(config):
    data = config["domains"]["math"]
    train = IftSetSettings.from_config(config, "math")
    heldout = IftSetSettings.heldout_from_config(config, "math")
    assert train == IftSetSettings(data["ift_source"], data["ift_examples"], 0, config["seed"])
    assert heldout == IftSetSettings(
        data["ift_source"], data["ift_heldout_examples"], data["ift_examples"], config["seed"]
    )
    assert _through_params(train) == train and _through_params(heldout) == heldout
    # No probe key: the slices read where the probe set ends from its table.
    config["data"]["probe_per_class"] += 1
    assert IftSetSettings.from_config(config, "math") == train
    # Each domain's sets are its own: resizing the other domain changes neither.
    config["domains"]["general"]["ift_examples"] += 1
    assert IftSetSettings.heldout_from_config(config, "math") == heldout
    ift = config["robustness"]["ift"]
    assert IftSetSettings.robustness_from_config(config) == IftSetSettings(
        ift["source"], ift["examples"], 0, config["seed"]
    )


def test_eval_settings_hold_only_their_own_benchmark(config):
    settings = EvalSetSettings.from_config(config, "advbench")
    n = config["evaluation"]["benchmarks"]["advbench"]
    assert settings == EvalSetSettings(benchmark="advbench", n=n, seed=config["seed"])
    assert _through_params(settings) == settings
    # Resizing another benchmark (or the probe set) leaves this job's params alone.
    config["evaluation"]["benchmarks"]["strongreject"] += 1
    config["data"]["probe_per_class"] += 1
    assert EvalSetSettings.from_config(config, "advbench").to_params() == settings.to_params()


def test_alignment_settings_read_the_slices_it_must_miss(config):
    config["align"].update(harmful={"strongreject": 5, "advbench": 3}, lookalike={})
    settings = AlignmentSetSettings.from_config(config)
    assert settings == AlignmentSetSettings(
        harmful={"advbench": 3, "strongreject": 5},
        benign=config["align"]["benign"],
        lookalike={},
        eval_sizes=config["evaluation"]["benchmarks"],
        seed=config["seed"],
    )
    assert _through_params(settings) == settings
    # The set is the tail of each source whatever the domains take of its head (that it misses
    # them is checked at start): resizing or adding a domain does not rebuild it, nor the base.
    config["domains"]["math"]["ift_examples"] += 100
    config["domains"]["poetry"] = {**config["domains"]["general"], "ift_source": "dolly"}
    assert AlignmentSetSettings.from_config(config).to_params() == settings.to_params()
    # The training recipe of the alignment step is not this stage's: changing it reruns nothing.
    config["align"]["lr"] *= 2
    assert AlignmentSetSettings.from_config(config).to_params() == settings.to_params()


def _digest(df: pd.DataFrame) -> str:
    column = "prompt_id" if "prompt_id" in df.columns else "example_id"
    return hashlib.sha256("\n".join(df[column]).encode()).hexdigest()[:16]


# Recorded with the code before the data stages read the probe set's table (configs/tiny.yaml,
# seed 0): deriving the offsets from the table must change no row.
RECORDED = {
    "probe": (128, "40d2fd590245796e"),
    "ift": (64, "f2c7a3c347d934a0"),
    "ift_heldout": (16, "096984685bfffc14"),
    "eval_advbench": (8, "c4823ec7e78cf45b"),
    "eval_strongreject": (8, "19381cb9c8d8ebae"),
    "eval_xstest_safe": (8, "53a98165e600dbd9"),
    "eval_self_instruct": (8, "036ae739d976f13c"),
    "eval_gsm8k": (8, "bf21acb5dabe0aa7"),
    "align": (40, "4d9e713fe4903cd2"),
}


def test_entry_functions_write_the_recorded_tables(config, tmp_path):
    probe = tmp_path / "probe.parquet"
    settings = ProbeSetSettings.from_config(config)
    prepare_probe_set(data_dir=DATA, out=probe, settings=_through_params(settings))
    for name, ift in (
        ("ift", IftSetSettings.from_config(config, "general")),
        ("ift_heldout", IftSetSettings.heldout_from_config(config, "general")),
        ("robustness_ift", IftSetSettings.robustness_from_config(config)),
    ):
        out = tmp_path / f"{name}.parquet"
        prepare_ift_set(data_dir=DATA, probe_set=probe, out=out, settings=_through_params(ift))
    for benchmark in config["evaluation"]["benchmarks"]:
        prepare_eval_set(
            data_dir=DATA,
            source=None,
            probe_set=probe,
            out=tmp_path / f"eval_{benchmark}.parquet",
            settings=_through_params(EvalSetSettings.from_config(config, benchmark)),
        )
    prepare_alignment_set(
        data_dir=DATA,
        probe_set=probe,
        out=tmp_path / "align.parquet",
        settings=_through_params(AlignmentSetSettings.from_config(config)),
    )
    written = {}
    for name in RECORDED:
        df = pd.read_parquet(tmp_path / f"{name}.parquet")
        written[name] = (len(df), _digest(df))
    assert written == RECORDED
    # The robustness set is the head of the general domain's (same source), as it was when
    # the robustness jobs read the first rows of the one IFT set.
    head = pd.read_parquet(tmp_path / "ift.parquet")["example_id"].head(16).tolist()
    assert pd.read_parquet(tmp_path / "robustness_ift.parquet")["example_id"].tolist() == head
    assert (pd.read_parquet(probe)["seed"] == config["seed"]).all()


def test_data_package_imports_no_torch():
    """Its jobs (dozens per run) start in well under a second only without torch."""
    script = (
        "import sys, securetune.data; "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

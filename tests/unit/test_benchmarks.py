"""Evaluation benchmark loaders: contextual HarmBench, HEx-PHI, sources, disjointness."""

from __future__ import annotations

import csv

import pandas as pd
import pytest
import yaml

from securetune.data.eval_set import build_eval_set
from securetune.data.probe_set import ProbeSetSettings, build_probe_set
from securetune.data.sources import (
    HEXPHI_CATEGORIES,
    DataError,
    load_advbench,
    load_harmbench_contextual,
    load_hexphi,
    load_self_instruct,
)

from ..conftest import DATA, REPO

_TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
P40 = ProbeSetSettings.from_config(
    {**_TINY, "data": {**_TINY["data"], "probe_per_class": 40}}
).probe
PROBE40 = build_probe_set(DATA, P40, seed=0)


def _write_hexphi(folder, per_category=3):
    folder.mkdir()
    for cat in range(1, HEXPHI_CATEGORIES + 1):
        with (folder / f"category_{cat}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            for i in range(per_category):
                writer.writerow([f"Harmful request {i} of category {cat}, with a comma"])


def test_contextual_prompts_hold_context_then_behaviour():
    recs = load_harmbench_contextual(DATA)
    raw = pd.read_csv(DATA / "harmbench_behaviors_text_test.csv")
    contextual = raw[raw["FunctionalCategory"] == "contextual"]
    assert len(recs) == len(contextual) > 0
    row = contextual.iloc[0]
    rec = next(r for r in recs if r.id == f"harmbench:{row['BehaviorID']}")
    assert rec.prompt.startswith(row["ContextString"].strip()[:50])
    assert rec.prompt.endswith(row["Behavior"])
    assert rec.category == row["SemanticCategory"]


def test_hexphi_folder_loads_every_category(tmp_path):
    _write_hexphi(tmp_path / "hexphi")
    recs = load_hexphi(tmp_path / "hexphi")
    assert len(recs) == 3 * HEXPHI_CATEGORIES
    assert {r.category for r in recs} == {str(c) for c in range(1, HEXPHI_CATEGORIES + 1)}
    assert recs[0].prompt == "Harmful request 0 of category 1, with a comma"
    df = build_eval_set(DATA, "hexphi", 20, 0, PROBE40, source=tmp_path / "hexphi")
    assert len(df) == 20 and set(df["kind"]) == {"harmful"}


def test_hexphi_missing_category_or_path_is_an_error(tmp_path):
    _write_hexphi(tmp_path / "hexphi")
    (tmp_path / "hexphi" / "category_7.csv").unlink()
    with pytest.raises(DataError, match="category_7.csv' does not exist"):
        load_hexphi(tmp_path / "hexphi")
    with pytest.raises(DataError, match=r"evaluation\.sources\.hexphi"):
        build_eval_set(DATA, "hexphi", 5, 0, PROBE40)


def test_hexphi_public_release_without_category_2_loads(tmp_path):
    _write_hexphi(tmp_path / "hexphi")
    (tmp_path / "hexphi" / "category_2.csv").unlink()  # withheld by the authors
    recs = load_hexphi(tmp_path / "hexphi")
    assert len(recs) == 3 * (HEXPHI_CATEGORIES - 1) and "2" not in {r.category for r in recs}


def test_user_source_replaces_the_bundled_copy(tmp_path):
    src = tmp_path / "full"
    src.mkdir()
    (src / "advbench_harmful_behaviors.csv").write_text(
        "".join(f"Full-set behaviour number {i}\n" for i in range(30))
    )
    df = build_eval_set(DATA, "advbench", 30, 0, PROBE40, source=src)
    assert df["prompt"].str.startswith("Full-set").all() and len(df) == 30
    with pytest.raises(DataError, match="is not a folder"):
        build_eval_set(
            DATA, "advbench", 5, 0, PROBE40, source=src / "advbench_harmful_behaviors.csv"
        )


def test_probe_prompts_are_removed_even_from_a_reordered_full_copy(tmp_path):
    probe = PROBE40
    src = tmp_path / "full"
    src.mkdir()
    # A "full copy" that is the bundled file itself: its probe slice is not skipped by position
    # (a user source), so only the text filter keeps the sets apart.
    (src / "advbench_harmful_behaviors.csv").write_bytes(
        (DATA / "advbench_harmful_behaviors.csv").read_bytes()
    )
    probe_advbench = set(probe.loc[probe["source"] == "advbench", "prompt"])
    assert len(probe_advbench) == 40 and probe_advbench <= {r.prompt for r in load_advbench(src)}
    df = build_eval_set(DATA, "advbench", 400, 0, probe, source=src)
    assert len(df) == 400 and not set(df["prompt"]) & set(probe["prompt"])
    # All 480 rows the probe did not take, and not one more.
    assert len(build_eval_set(DATA, "advbench", 480, 0, probe, source=src)) == 480
    with pytest.raises(DataError, match="asked for 481 rows"):
        build_eval_set(DATA, "advbench", 481, 0, probe, source=src)


def test_self_instruct_has_reference_answers():
    recs = load_self_instruct(DATA)
    assert len(recs) == 175 and all(r.reference for r in recs)

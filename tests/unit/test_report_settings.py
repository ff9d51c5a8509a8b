"""The report's settings: which arms it shows, in which order, with which kinds; and that the
rules can build them without torch or matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from securetune.config import validate_config
from securetune.report.settings import GammaAblationSettings, ReportSettings

FINE_TUNED = {"vanilla": "vanilla", "ml_lr": "ml_lr", "freeze": "freeze", "swat": "swat"}


def test_arms_are_base_then_the_fine_tuned_in_config_order(config, schema):
    validate_config(config, schema)
    settings = ReportSettings.from_config(config, "general")
    assert settings.arm_order == ("base", "vanilla", "ml_lr", "freeze", "swat")
    assert settings.arm_kinds == {"base": "reference", **FINE_TUNED}
    assert list(settings.arm_kinds) == list(settings.arm_order)
    assert (settings.bootstrap_samples, settings.confidence) == (1000, 0.95)
    assert (settings.score, settings.seed) == ("acc_drop", 0)
    # The domain's own: its name, IFT source and task metric.
    assert (settings.domain, settings.ift_source, settings.task_metric) == (
        "general", "alpaca", "usability"
    )  # fmt: skip
    math = ReportSettings.from_config(config, "math")
    assert (math.domain, math.ift_source, math.task_metric) == ("math", "gsm8k", "accuracy")


def test_aligned_base_adds_the_unaligned_reference_second(config, schema):
    config["align"]["enabled"] = True
    validate_config(config, schema)
    settings = ReportSettings.from_config(config, "math")
    assert settings.arm_order == ("base", "unaligned", "vanilla", "ml_lr", "freeze", "swat")
    assert settings.arm_kinds == {"base": "reference", "unaligned": "reference", **FINE_TUNED}
    assert list(settings.arm_kinds) == list(settings.arm_order)


def test_alignment_benchmarks_are_the_aligned_harmful_sources(config, schema):
    config["align"] |= {"enabled": True, "harmful": {"strongreject": 20, "advbench": 160,
                                                     "harmbench": 0}}  # fmt: skip
    validate_config(config, schema)
    settings = ReportSettings.from_config(config, "math")
    assert settings.alignment_benchmarks == ("advbench", "strongreject")
    assert ReportSettings.from_params(json.loads(json.dumps(settings.to_params()))) == settings
    gamma = GammaAblationSettings.from_config(config, "math")
    assert gamma.alignment_benchmarks == ("advbench", "strongreject")
    config["align"]["enabled"] = False
    assert ReportSettings.from_config(config, "math").alignment_benchmarks == ()


def test_params_round_trip_keeps_the_arm_order(config):
    # The arms listed against the alphabet, so the sorted JSON keys of `to_params` reorder them.
    config["finetune"]["arms"] = {"zeta": {"kind": "vanilla"}, "alpha": {"kind": "freeze"}}
    settings = ReportSettings.from_config(config, "math")
    params = json.loads(json.dumps(settings.to_params()))
    assert list(params["arm_kinds"]) == ["alpha", "base", "zeta"]
    again = ReportSettings.from_params(params)
    assert again == settings
    assert list(again.arm_kinds) == ["base", "zeta", "alpha"]


def test_kinds_must_name_the_ordered_arms():
    with pytest.raises(ValueError, match="name different arms"):
        ReportSettings(("base", "v"), {"base": "reference"}, 10, 0.95, "acc_drop", 0)


def test_settings_stats_and_tables_import_without_torch_or_matplotlib():
    """The rules import the settings when the workflow is parsed; stats and tables are the
    report's logic, kept apart from plotting."""
    script = (
        "import sys, json\n"
        "import securetune.report.settings, securetune.report.stats, securetune.report.tables\n"
        "print(json.dumps(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []

"""The decisions the rules take from tested Python: jobs a config makes, arm kinds, settings."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from securetune import jobs
from securetune.config import ConfigError
from securetune.data import IftSetSettings
from securetune.method import (
    arm_gamma,
    arm_kind,
    arm_training_settings,
    gamma_sweep_arms,
    needs_plan,
    sweep_arm_name,
)
from securetune.report.settings import GammaAblationSettings, ReportSettings
from securetune.settings import (
    AlignSettings,
    FeatureSettings,
    GenerationConfig,
    HeldoutLossSettings,
    JudgeSettings,
    ModelSettings,
    ProbeSettings,
    PromptCheckSettings,
    RobustnessSettings,
    SearchSettings,
    TrainConfig,
)

from ..conftest import REPO

TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
DEMO = yaml.safe_load((REPO / "config.yaml").read_text())
PAPER = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())


def test_the_kinds_that_wait_for_mods_robust():
    assert not needs_plan("vanilla")
    assert all(needs_plan(kind) for kind in ("ml_lr", "freeze", "swat"))
    with pytest.raises(ValueError, match="unknown arm kind 'lora'"):
        needs_plan("lora")


def test_freeze_is_gamma_zero_whatever_the_arm_says():
    assert arm_gamma("freeze", {"gamma": 0.5}) == 0.0
    assert arm_gamma("ml_lr", {"gamma": 0.1}) == 0.1
    assert arm_gamma("swat", {}) == 1.0


def test_an_arm_overrides_the_shared_lr_and_leaves_out_the_launchers_keys():
    settings = arm_training_settings(DEMO["finetune"], "vanilla_lr1e5", seed=7)
    assert settings["lr"] == 1.0e-5 and settings["kind"] == "vanilla" and settings["seed"] == 7
    assert not {"arms", "gamma_sweep", "processes", "gpus"} & set(settings)
    assert TrainConfig.from_params(json.loads(json.dumps(settings))).lr == 1.0e-5
    freeze = arm_training_settings(DEMO["finetune"], "freeze", seed=0)
    assert freeze["gamma"] == 0.0 and freeze["lr"] == DEMO["finetune"]["lr"]
    swat = arm_training_settings(TINY["finetune"], "swat", seed=0)
    assert swat["switch_at"] == 0.25


def test_checkpoint_flags_are_the_trainers_not_the_arms():
    """How checkpoints replace each other and the stop before a time limit change no result: not
    in an arm's settings (so neither in its params nor its checkpoint fingerprint), but flags."""
    finetune = {
        **TINY["finetune"], "checkpoint_keep_previous": True, "stop_before_time_limit": False
    }  # fmt: skip
    settings = arm_training_settings(finetune, "ml_lr", seed=0)
    assert settings == arm_training_settings(TINY["finetune"], "ml_lr", seed=0)
    assert not {"checkpoint_keep_previous", "stop_before_time_limit"} & set(settings)
    assert jobs.checkpoint_flags(TINY["finetune"]) == ""
    assert jobs.checkpoint_flags({}) == ""
    assert jobs.checkpoint_flags(finetune) == (
        "--keep-previous-checkpoint --no-stop-before-time-limit"
    )


def test_gamma_sweep_arms_are_named_by_their_gamma_and_may_not_clash():
    assert sweep_arm_name(0.05) == "ml_lr_g0p05" and sweep_arm_name(1.0) == "ml_lr_g1"
    swept = {**TINY["finetune"], "gamma_sweep": [0.0, 0.3, 1.0]}
    assert gamma_sweep_arms(TINY["finetune"]) == {}  # the tiny config runs no sweep
    sweep = gamma_sweep_arms(swept)
    assert sweep == {
        "ml_lr_g0": {"kind": "ml_lr", "gamma": 0.0},
        "ml_lr_g0p3": {"kind": "ml_lr", "gamma": 0.3},
        "ml_lr_g1": {"kind": "ml_lr", "gamma": 1.0},
    }
    clashing = {**swept, "arms": {"ml_lr_g1": {"kind": "vanilla"}}}
    with pytest.raises(ConfigError, match="clash with finetune.arms"):
        gamma_sweep_arms(clashing)
    assert arm_kind(swept, "ml_lr_g0p3") == "ml_lr"
    assert arm_kind(swept, "base") == "reference"
    with pytest.raises(ConfigError, match="arm 'nope' is in neither"):
        arm_kind(swept, "nope")


def test_layers_and_robustness_tables():
    assert jobs.number_of_layers(TINY["model"]) == 4
    assert jobs.number_of_layers(DEMO["model"]) == 30
    assert jobs.number_of_layers({"source": "meta-llama/x", "layers": 32}) == 32
    with pytest.raises(ConfigError, match="'model.layers' is required"):
        jobs.number_of_layers({"source": "meta-llama/x"})
    tables = jobs.robustness_tables(TINY)
    assert len(tables) == 4 * 7 and tables[0] == "results/robustness/layer0/q.parquet"
    assert jobs.layer_tables(TINY)[-1] == "results/robustness/layer{layer}/down.parquet"


def test_proxy_layers_past_the_depth_are_refused():
    bad = {**TINY, "probe": {**TINY["probe"], "proxy_layers": [0, 4]}}
    with pytest.raises(ConfigError, match=r"layer\(s\) \[4\] past the model's depth"):
        jobs.check_proxy_layers(bad)
    jobs.check_proxy_layers(TINY)


def test_the_package_goes_first_on_a_users_pythonpath(tmp_path):
    src = tmp_path / "src"
    assert jobs.python_path(src, None) == str(src)
    mine = os.pathsep.join(["/opt/mine", str(src), "/opt/other"])
    assert jobs.python_path(src, mine) == os.pathsep.join([str(src), "/opt/mine", "/opt/other"])


def test_only_ift_perturbations_read_the_ift_set():
    assert jobs.robustness_reads_ift_set(TINY) and not jobs.search_reads_ift_set(TINY)
    assert not jobs.robustness_reads_ift_set(DEMO) and not jobs.search_reads_ift_set(DEMO)


def test_arms_evaluated_and_what_a_fine_tune_waits_for():
    assert jobs.evaluated_arms(TINY) == ["base", "vanilla", "ml_lr", "freeze", "swat"]
    assert jobs.evaluated_arms(DEMO)[:2] == ["base", "unaligned"]
    assert jobs.finetune_inputs(TINY, "math", "vanilla") == {
        "model": "results/model/base", "data": "results/math/data/ift.parquet"
    }  # fmt: skip
    assert jobs.finetune_inputs(TINY, "general", "freeze")["plan"] == "results/search/plan.json"
    with pytest.raises(ConfigError, match="domain 'poetry' is not in config section 'domains'"):
        jobs.finetune_inputs(TINY, "poetry", "vanilla")
    # A fine-tuned arm is evaluated under its domain; the reference arms once, shared.
    assert jobs.domain_dir("math", "ml_lr") == "math/" and jobs.domain_dir("math", "base") == ""
    assert jobs.model_of_arm("unaligned", "") == "results/model/unaligned"
    assert jobs.model_of_arm("ml_lr", "math/") == "results/math/finetune/ml_lr/model"
    for arm, where in (("base", "math/"), ("ml_lr", "")):
        with pytest.raises(ValueError, match=f"arm '{arm}' has no evaluation under"):
            jobs.model_of_arm(arm, where)
    assert jobs.training_launcher(1) == "python"
    assert jobs.training_launcher(4, "/v/bin/python") == (
        "/v/bin/python -m torch.distributed.run --standalone --nproc_per_node=4"
    )
    assert jobs.job_python("/my venv/bin/python3", conda=False) == "/my venv/bin/python3"
    assert jobs.job_python("/my venv/bin/python3", conda=True) == "python"
    assert jobs.source_model(DEMO) == "results/model/unaligned"
    assert jobs.source_model(TINY) == "results/model/base"


def test_benchmarks_judges_and_sources():
    assert jobs.harmful_benchmarks(TINY) == ["advbench", "strongreject"]
    assert jobs.judge_files(TINY, "math") == [
        "results/judge/guard/base.parquet",
        *(f"results/math/judge/guard/{a}.parquet" for a in ("vanilla", "ml_lr", "freeze", "swat")),
    ]  # fmt: skip
    scores = jobs.score_files(TINY, "general")
    assert scores[0] == "results/scores/base/advbench.parquet"
    assert scores[-1] == "results/general/scores/swat/self_instruct.parquet"
    assert len(scores) == 5 * len(TINY["evaluation"]["benchmarks"])
    no_harm = {**TINY, "evaluation": {**TINY["evaluation"], "benchmarks": {"gsm8k": 8}}}
    assert jobs.judge_files(no_harm, "math") == []
    assert jobs.domain_reports(TINY) == [
        "results/general/report/report.md", "results/math/report/report.md"
    ]  # fmt: skip
    hub = {**TINY, "evaluation": {**TINY["evaluation"], "sources": {"advbench": "hf:x/y"}}}
    assert jobs.benchmark_source(hub, "advbench") == "results/data/full/advbench"
    assert jobs.benchmark_source(TINY, "advbench") == ""
    assert jobs.guard_model(TINY) == "results/model/base"
    assert jobs.generation_threads(TINY) == 1
    assert jobs.generation_threads(PAPER) == 2  # vLLM uses every core it is given
    # One CPU training process leaves the second core to another job; torchrun on GPUs shares
    # two among its processes.
    assert jobs.finetune_threads(DEMO) == jobs.finetune_threads(TINY) == 1
    assert jobs.finetune_threads(PAPER) == 2
    two_cpu_processes = {**TINY, "finetune": {**TINY["finetune"], "processes": 2}}
    assert jobs.finetune_threads(two_cpu_processes) == 2


@pytest.mark.parametrize("config", [TINY, DEMO, PAPER], ids=["tiny", "demo", "paper"])
@pytest.mark.parametrize(
    "kind",
    [
        ModelSettings,
        FeatureSettings,
        PromptCheckSettings,
        ProbeSettings,
        RobustnessSettings,
        SearchSettings,
        AlignSettings,
        HeldoutLossSettings,
        GenerationConfig,
        JudgeSettings,
        IftSetSettings,
        ReportSettings,
        GammaAblationSettings,
    ],
)
def test_every_stage_settings_survives_the_rule_params(config, kind):
    """What a rule passes (plain JSON) rebuilds the same typed object in the job."""
    per_domain = kind in (
        HeldoutLossSettings,
        IftSetSettings,
        ReportSettings,
        GammaAblationSettings,
    )
    args = (next(iter(config["domains"])),) if per_domain else ()
    settings = kind.from_config(config, *args)
    params = json.loads(json.dumps(settings.to_params()))
    assert kind.from_params(params) == settings


def test_job_shaping_keys_are_not_in_any_settings():
    """Changing how jobs are cut or the test-only fault switch changes no stage's params."""
    shaped = json.loads(json.dumps(TINY))
    shaped["robustness"].update(jobs="per_module", fail_modules=["L1.q"])
    shaped["generation"]["jobs"] = "per_benchmark"
    for kind in (RobustnessSettings, SearchSettings, GenerationConfig, JudgeSettings):
        assert kind.from_config(shaped).to_params() == kind.from_config(TINY).to_params()


def test_checkpoints_of_finished_arms_only_are_removed(tmp_path):
    from securetune.jobs import remove_finished_checkpoints

    general, math = tmp_path / "general" / "finetune", tmp_path / "math" / "finetune"
    for arm in ("done", "failed", "running"):
        (general / arm / "model.checkpoints" / "step_00000100").mkdir(parents=True)
    for arm in ("done", "dropped"):
        (math / arm / "model.checkpoints" / "step_00000005").mkdir(parents=True)
    for finished in (general / "done", math / "done", math / "dropped"):
        (finished / "loss.parquet").write_bytes(b"x")
    for kept in (general / "done", math / "done"):
        (kept / "model").mkdir()
    # math/dropped: finished, its weights deleted once scored (finetune.keep_weights: false)
    (general / "running" / "model").mkdir()  # no loss log: not finished
    removed = remove_finished_checkpoints(tmp_path)
    assert removed == [
        general / "done" / "model.checkpoints",
        math / "done" / "model.checkpoints",
        math / "dropped" / "model.checkpoints",
    ]
    assert not any(path.exists() for path in removed)
    assert (general / "failed" / "model.checkpoints").exists()
    assert (general / "running" / "model.checkpoints").exists()


def test_a_domain_trains_with_its_own_finetune_values_and_only_those():
    from securetune.domains import domain_finetune, ift_rows_by_source

    general = arm_training_settings(domain_finetune(TINY, "general"), "ml_lr", 0)
    math = arm_training_settings(domain_finetune(TINY, "math"), "ml_lr", 0)
    assert general["steps"] == TINY["finetune"]["steps"]
    assert (math["steps"], math["max_seq_len"]) == (8, 512)  # domains.math.finetune
    assert {k: v for k, v in math.items() if k not in ("steps", "max_seq_len")} == {
        k: v for k, v in general.items() if k not in ("steps", "max_seq_len")
    }
    # The alignment slice must miss every domain's IFT rows and the robustness set's.
    assert ift_rows_by_source(TINY) == {"alpaca": 64 + 16, "gsm8k": 32 + 16}


def test_a_config_of_the_one_domain_layout_is_told_where_its_keys_went():
    from securetune.config import check_moved_keys

    old = {**TINY, "data": {**TINY["data"], "ift_source": "alpaca", "ift_examples": 10}}
    with pytest.raises(ConfigError) as err:
        check_moved_keys(old)
    assert "'data.ift_source' is now 'domains.<name>.ift_source'" in str(err.value)
    assert "'data.ift_examples' is now 'domains.<name>.ift_examples'" in str(err.value)
    check_moved_keys(TINY)

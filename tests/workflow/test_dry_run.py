"""The DAG: job counts of the tiny and paper configs, without running anything."""

import re

import pandas as pd
import pytest

from .helpers import (
    REPO,
    copy_workflow,
    job_counts,
    planned_priorities,
    planned_wildcards,
    snakemake,
)


def test_tiny_dry_run_counts():
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml")
    counts = job_counts(result.stdout)
    layers, arms, benchmarks, domains = 4, 4, 5, 2  # domains: general, math
    # Everything before the IFT data once, whatever the number of domains.
    assert counts["score_layer"] == layers  # robustness.jobs: per_layer, 7 modules each
    assert "score_module" not in counts
    for rule in ("build_base_model", "prepare_probe_set", "check_prompts", "extract_features",
                 "train_probe", "aggregate_robustness", "search_robust_modules",
                 "prepare_robustness_ift_set", "paper_tables"):  # fmt: skip
        assert counts[rule] == 1, rule
    assert counts["prepare_ift_set"] == counts["prepare_ift_heldout"] == domains
    # Every arm in every domain; base evaluated once, its held-out loss once per domain.
    assert counts["heldout_ift_loss"] == domains * (arms + 1)
    assert counts["finetune"] == domains * arms
    assert counts["generate_arm"] == domains * arms + 1  # generation.jobs: per_arm
    assert counts["score_generations"] == (domains * arms + 1) * benchmarks
    # One guard-judge job per arm (one model load for all its harmful benchmarks); the LLM
    # judge is off in the tiny config.
    assert counts["judge_guard"] == domains * arms + 1
    assert "judge_llm" not in counts
    assert counts["report"] == domains
    wildcards = planned_wildcards(result.stdout)
    assert {w.split(",")[0] for w in wildcards if w.startswith("domain=")} == {
        "domain=general", "domain=math"
    }  # fmt: skip


def test_fine_tunes_go_before_evaluations_and_the_plan_chain_first():
    """On two cores a two-thread fine-tune waits while any one-thread job runs: fine-tunes back
    to back, then the evaluations, leave no core idle; Mods_Robust's chain and the arms that
    wait for it go first."""
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml")
    priority = planned_priorities(result.stdout)
    finetunes = {w: p for (rule, w), p in priority.items() if rule == "finetune"}
    evaluations = [
        p for (rule, _), p in priority.items() if rule in ("generate_arm", "heldout_ift_loss")
    ]
    for domain in ("general", "math"):
        plan = [finetunes[f"domain={domain}, arm={arm}"] for arm in ("ml_lr", "freeze", "swat")]
        assert len(set(plan)) == 1
        assert plan[0] > finetunes[f"domain={domain}, arm=vanilla"] > max(evaluations)
        assert priority[("search_robust_modules", "")] == plan[0]
    assert len(evaluations) == (2 * 4 + 1) + 2 * 5


def test_one_robustness_job_per_layer_and_module_as_on_a_cluster(tmp_path):
    overlay = tmp_path / "one.yaml"
    overlay.write_text("robustness:\n  jobs: per_module\n")
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml", str(overlay))
    counts = job_counts(result.stdout)
    assert counts["score_module"] == 4 * 7 and "score_layer" not in counts


def test_how_robustness_jobs_are_cut_is_no_change_to_rerun(tmp_path):
    """robustness.jobs shapes jobs only: after a run, switching it plans nothing (the same
    files, inputs and params), and neither does the test-only fault switch. (generation.jobs is
    no param either, but a per-arm job reads every benchmark's prompts and a per-benchmark job
    one, so Snakemake's input-set trigger regenerates on a switch.)"""
    workdir = copy_workflow(tmp_path / "wf", tiny_default=True)
    snakemake(workdir, "results/robustness.parquet")
    overlay = workdir / "cut.yaml"
    overlay.write_text("robustness:\n  jobs: per_module\n  fail_modules: [L3.down]\n")
    plan = snakemake(
        workdir, "-n", "results/robustness.parquet", "--configfile", "config.yaml", str(overlay)
    )
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout


def test_generation_jobs_per_arm_or_per_benchmark(tmp_path):
    overlay = tmp_path / "per_benchmark.yaml"
    overlay.write_text("generation:\n  jobs: per_benchmark\n")
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml", str(overlay))
    counts = job_counts(result.stdout)
    arms, benchmarks = 2 * 4, 5  # 4 arms in each of 2 domains
    assert "generate_arm" not in counts and counts["generate"] == (arms + 1) * benchmarks
    assert counts["score_generations"] == (arms + 1) * benchmarks
    overlay.write_text("generation:\n  jobs: per_model\n")
    result = snakemake(REPO, "-n", "--configfile", "configs/tiny.yaml", str(overlay), check=False)
    assert result.returncode != 0
    assert "config key 'generation.jobs': 'per_model' is not one of" in (
        result.stderr + result.stdout
    )


def test_hub_source_is_fetched_once_then_held_out_like_a_folder(tmp_path):
    """evaluation.sources.advbench: hf:<id>. A dataset repository on disk stands in for the hub
    (unreachable here); `datasets.load_dataset` reads both alike."""
    hub = tmp_path / "AdvBench"
    (hub / "data").mkdir(parents=True)
    prompts = [f"Full-set harmful behaviour number {i}" for i in range(40)]
    pd.DataFrame({"prompt": prompts, "target": "Sure"}).to_parquet(hub / "data" / "train.parquet")
    workdir = copy_workflow(tmp_path / "repo", tiny_default=True)
    (workdir / "hub.yaml").write_text(
        f"evaluation:\n  benchmarks: {{advbench: 10}}\n  sources: {{advbench: 'hf:{hub}'}}\n"
    )
    target = "results/data/eval/advbench.parquet"
    result = snakemake(workdir, target, "--configfile", "hub.yaml")
    counts = job_counts(result.stdout + result.stderr)  # a real run logs to stderr
    assert counts["fetch_benchmark"] == 1 and counts["prepare_eval_set"] == 1
    held_out = pd.read_parquet(workdir / target)
    assert len(held_out) == 10 and set(held_out["prompt"]) <= set(prompts)
    assert (workdir / "results" / "data" / "full" / "advbench" / "origin.json").exists()

    (workdir / "bad.yaml").write_text(
        "evaluation:\n  benchmarks: {self_instruct: 5}\n  sources: {self_instruct: 'hf:x/y'}\n"
    )
    result = snakemake(workdir, "-n", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0 and "Job stats" not in result.stdout
    assert "'evaluation.sources.self_instruct': no hub layout" in result.stdout + result.stderr

    (workdir / "bad.yaml").write_text("evaluation:\n  sources: {advbench: no/such/folder}\n")
    result = snakemake(workdir, "-n", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0 and "Job stats" not in result.stdout
    assert "'evaluation.sources.advbench': 'no/such/folder' is neither a folder" in (
        result.stdout + result.stderr
    )


def test_bad_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  learning_rate: 0.1\n")
    result = snakemake(REPO, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert (
        "unknown config key(s) ['learning_rate'] under 'finetune'" in result.stderr + result.stdout
    )
    assert "Job stats" not in result.stdout


@pytest.mark.parametrize("layer", [4, 99])
def test_proxy_layer_past_depth_is_refused(tmp_path, layer):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"probe:\n  proxy_layers: [0, {layer}]\n")
    result = snakemake(REPO, "-n", "--configfile", "configs/tiny.yaml", str(bad), check=False)
    assert result.returncode != 0
    assert f"'probe.proxy_layers': layer(s) [{layer}] past the model's depth" in (
        result.stderr + result.stdout
    )


def test_paper_dry_run_fans_out_every_module_of_llama2_7b():
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/paper.yaml")
    counts = job_counts(result.stdout)
    assert counts["score_module"] == 32 * 7
    # vanilla, ml_lr, freeze, swat and the 6 gamma-sweep arms (for the paper tables' gamma
    # ablation) in the general and the math domain, + base once
    arms, benchmarks = 2 * (4 + 6), 10
    assert counts["generate"] == (arms + 1) * benchmarks
    assert counts["judge_guard"] == arms + 1
    assert counts["finetune"] == arms and counts["report"] == 2 and counts["paper_tables"] == 1
    assert counts["ablation_gamma_table"] == 2


def test_default_dry_run_is_the_demo_aligning_the_base_and_evaluating_the_unaligned_model():
    result = snakemake(REPO, "-n", "--forceall")
    counts = job_counts(result.stdout)
    # vanilla at 3 learning rates, ml_lr, its random-module control, freeze; config.yaml's
    # benchmarks
    arms, benchmarks = 6, 5
    assert counts["build_base_model"] == counts["align_base_model"] == 1
    assert counts["select_modules"] == 1  # the random control's draw
    assert counts["prepare_alignment_set"] == 1
    # 30 x 7 modules, one process per layer on one machine (robustness.jobs: per_layer)
    assert counts["score_layer"] == 30 and "score_module" not in counts
    # base (aligned), unaligned (the converted SmolLM2) and every fine-tuned arm: one generation
    # job each on one machine (generation.jobs: per_arm), scored per benchmark
    assert "generate" not in counts and counts["generate_arm"] == arms + 2
    assert counts["score_generations"] == (arms + 2) * benchmarks
    assert counts["heldout_ift_loss"] == arms + 2


def test_a_full_config_replaces_the_default_and_a_partial_one_extends_it(tmp_path):
    tiny = job_counts(
        snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml").stdout
    )
    assert "align_base_model" not in tiny  # nothing of the demo's alignment or arms leaks in
    assert tiny["finetune"] == 2 * 4 and tiny["generate_arm"] == 2 * 4 + 1
    partial = tmp_path / "partial.yaml"
    partial.write_text("finetune:\n  steps: 3\n")
    plan = snakemake(REPO, "-n", "--forceall", "--configfile", str(partial)).stdout
    assert job_counts(plan)["align_base_model"] == 1 and 'steps": 3' in plan


def test_gamma_ablation_is_its_own_target_and_in_the_paper_tables_when_swept(tmp_path):
    sweep_overlay = tmp_path / "sweep.yaml"
    sweep_overlay.write_text("finetune:\n  gamma_sweep: [0.0, 0.3, 1.0]\n")
    # The target goes first: --configfile takes every argument after it.
    result = snakemake(
        REPO, "ablation_gamma", "-n", "--forceall",
        "--configfile", "configs/tiny.yaml", str(sweep_overlay),
    )  # fmt: skip
    counts = job_counts(result.stdout)
    sweep = ["ml_lr_g0", "ml_lr_g0p3", "ml_lr_g1"]  # finetune.gamma_sweep: [0.0, 0.3, 1.0]
    domains = 2
    assert counts["finetune"] == domains * len(sweep)
    assert counts["generate_arm"] == domains * len(sweep)
    assert counts["score_generations"] == domains * len(sweep) * 5  # the 5 tiny benchmarks
    assert counts["ablation_gamma_table"] == domains
    assert "report" not in counts
    planned = planned_wildcards(result.stdout)
    arms_planned = {w.split(", ")[1] for w in planned if w.startswith("domain=") and ", " in w}
    assert arms_planned == {f"arm={arm}" for arm in sweep}
    # With a sweep, `all` builds it for the paper tables' gamma section; without, not.
    swept = job_counts(
        snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml",
                  str(sweep_overlay)).stdout
    )  # fmt: skip
    assert swept["ablation_gamma_table"] == domains and swept["finetune"] == domains * (4 + 3)
    plain = job_counts(
        snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml").stdout
    )
    assert "ablation_gamma_table" not in plain and plain["finetune"] == domains * 4


def test_llm_judge_adds_one_job_per_arm(tmp_path):
    overlay = tmp_path / "judge.yaml"
    overlay.write_text("evaluation:\n  llm_judge:\n    enabled: true\n")
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml", str(overlay))
    assert job_counts(result.stdout)["judge_llm"] == 2 * 4 + 1  # 4 arms x 2 domains + base


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        (
            "domains:\n  math:\n    ift_examples: 5000\n",
            r"config key\(s\) 'domains.math.ift_examples' \+ 'domains.math.ift_heldout_examples' "
            r"= 5016: the IFT source 'gsm8k' holds \d+ rows after the probe set's",
        ),
        (
            "domains:\n  report:\n    ift_source: alpaca\n    ift_examples: 8\n"
            "    ift_heldout_examples: 8\n    task_metric: usability\n",
            r"config section 'domains': name\(s\) \['report'\] are folders of results/",
        ),
        (
            "data:\n  ift_source: alpaca\n",
            r"config keys moved: 'data.ift_source' is now 'domains.<name>.ift_source'",
        ),
        (
            "evaluation:\n  benchmarks:\n    advbench: 1000\n",
            r"config key 'evaluation.benchmarks.advbench': 1000 prompts asked, the bundled set "
            r"holds \d+ after the probe set's",
        ),
    ],
)
def test_a_too_large_slice_or_a_wrong_domain_is_refused_at_start(tmp_path, overlay, message):
    """Refused when the workflow is parsed, naming the key and what the source holds, not by
    the data job after the model was built."""
    bad = tmp_path / "big.yaml"
    bad.write_text(overlay)
    result = snakemake(REPO, "-n", "--configfile", "configs/tiny.yaml", str(bad), check=False)
    assert result.returncode != 0
    assert re.search(message, result.stderr + result.stdout), result.stderr[-2000:]


def test_controls_overlay_plans_every_selector_with_replicates():
    """configs/controls.yaml: vanilla at 4 learning rates, ML-LR by 6 module sets (robust, 3
    random draws, inverse, attribution) x 3 replicates, the demo's freeze."""
    plan = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/controls.yaml").stdout
    counts = job_counts(plan)
    assert counts["finetune"] == 4 + 6 * 3 + 1
    assert counts["select_modules"] == 5 and counts["attribute_modules"] == 1
    assert counts["generate_arm"] == counts["finetune"] + 2  # and base, unaligned
    wildcards = planned_wildcards(plan)
    assert {w for w in wildcards if w.startswith("selection=")} == {
        "selection=random_d0", "selection=random_d1", "selection=random_d2",
        "selection=inverse", "selection=attribution",
    }  # fmt: skip
    assert any("arm=ml_lr_attribution_r2" in w for w in wildcards)

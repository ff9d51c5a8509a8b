"""The DAG: job counts of the tiny and paper configs, without running anything."""

import pytest

from .helpers import REPO, job_counts, snakemake


def test_tiny_dry_run_has_one_robustness_job_per_layer_and_module():
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml")
    counts = job_counts(result.stdout)
    layers, modules, arms, benchmarks = 4, 7, 2, 5
    assert counts["score_module"] == layers * modules
    assert counts["finetune"] == arms
    assert counts["generate"] == (arms + 1) * benchmarks
    assert counts["score_generations"] == (arms + 1) * benchmarks
    # One guard-judge job per arm (one model load for all its harmful benchmarks); the LLM
    # judge is off in the tiny config.
    assert counts["judge_guard"] == arms + 1
    assert "judge_llm" not in counts
    assert counts["report"] == 1


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
    result = snakemake(REPO, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert f"'probe.proxy_layers': layer(s) [{layer}] past the model's depth" in (
        result.stderr + result.stdout
    )


def test_paper_dry_run_fans_out_every_module_of_llama2_7b():
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/paper.yaml")
    counts = job_counts(result.stdout)
    assert counts["score_module"] == 32 * 7
    assert counts["generate"] == 3 * 10
    assert counts["judge_guard"] == 3


def test_llm_judge_adds_one_job_per_arm(tmp_path):
    overlay = tmp_path / "judge.yaml"
    overlay.write_text("evaluation:\n  llm_judge:\n    enabled: true\n")
    result = snakemake(REPO, "-n", "--forceall", "--configfile", "configs/tiny.yaml", str(overlay))
    assert job_counts(result.stdout)["judge_llm"] == 3

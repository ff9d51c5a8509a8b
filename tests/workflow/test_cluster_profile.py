"""The cluster profile (slurm/) with the workflow profile (profiles/default), by dry runs:
what each job would ask SLURM for, and how fine-tuning is launched. No cluster needed."""

from __future__ import annotations

import re

import pytest
import yaml

from .helpers import REPO, job_counts, snakemake

# The interpreter Snakemake runs under, which common.smk exports to every shell rule.
PYTHON = '"$SECURETUNE_PYTHON"'


def declared_localrules() -> set[str]:
    """The rules the Snakefile and rules/*.smk declare local (a dry run does not print it)."""
    names: set[str] = set()
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for block in re.findall(
            r"^\s*localrules:\s*\n((?:\s+\w+,?\s*\n)+)", path.read_text(), re.M
        ):
            names.update(re.findall(r"\w+", block))
    return names


def planned_jobs(output: str) -> list[dict]:
    """Each job of a dry run: its rule, wildcards, resources and shell command."""
    jobs = []
    local = declared_localrules()
    for block in re.split(r"^(?:local)?rule ", output, flags=re.M)[1:]:
        rule = block.split(":", 1)[0]
        job = {"rule": rule, "local": rule in local}
        for key in ("wildcards", "resources"):
            match = re.search(rf"^\s+{key}: (.+)$", block, re.M)
            job[key] = match.group(1) if match else ""
        match = re.search(r"^Shell command: (.+)$", block, re.M)
        job["shell"] = match.group(1) if match else ""
        jobs.append(job)
    return jobs


def resources(job: dict[str, str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in job["resources"].split(", ") if "=" in item)


@pytest.fixture(scope="module")
def paper_plan():
    result = snakemake(REPO, "--profile", "slurm", "-n", "--forceall")
    return result.stdout + result.stderr


def test_cluster_profile_runs_the_paper_config(paper_plan):
    counts = job_counts(paper_plan)
    assert counts["score_module"] == 32 * 7
    assert "Using profiles slurm and workflow specific profile profiles/default" in paper_plan


@pytest.mark.parametrize(
    ("rule", "gpus"),
    [("score_module", "1"), ("extract_features", "1"), ("generate", "1"), ("finetune", "8")],
)
def test_gpu_rules_ask_for_gpus_and_memory(paper_plan, rule, gpus):
    jobs = [job for job in planned_jobs(paper_plan) if job["rule"] == rule]
    assert jobs
    for job in jobs:
        asked = resources(job)
        assert asked["gpu"] == gpus
        assert int(asked["cpus_per_gpu"]) >= 1
        assert int(asked["mem_mb"]) >= 16000  # a 7B model in bfloat16 is 13.5 GB
        assert int(asked["runtime"]) > 0


# Every rule that loads a model (or, for judge_llm, waits hours on one behind an endpoint).
MODEL_RULES = {
    "build_base_model", "align_base_model", "extract_features", "score_module", "score_layer",
    "search_robust_modules", "attribute_modules", "finetune", "generate", "generate_arm",
    "heldout_ift_loss", "judge_guard", "judge_llm",
}  # fmt: skip
# The slurm profile's fallback for a rule profiles/default does not list.
FALLBACK = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())["default-resources"]


def test_every_model_rule_has_its_own_resources():
    """profiles/default names memory and runtime for each model-loading rule, so none falls
    back to the cluster profile's small defaults (a 7B job killed at 2 GB or 30 minutes)."""
    listed = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    resources = listed["set-resources"]
    for rule in sorted(MODEL_RULES):
        assert rule in resources, f"{rule}: no resources in profiles/default"
        assert {"mem_mb", "runtime"} <= resources[rule].keys(), rule
        assert "attempt" in str(resources[rule]["runtime"]), f"{rule}: runtime does not grow"


def test_paper_run_submits_only_model_work(paper_plan):
    """Walk the paper DAG: each model job asks for more than the fallback (a GPU where it
    computes); every other job is a localrule, run on the submit node."""
    planned = planned_jobs(paper_plan)
    submitted = [job for job in planned if not job["local"]]
    assert {job["rule"] for job in submitted} <= MODEL_RULES
    for job in submitted:
        asked = resources(job)
        assert int(asked["mem_mb"]) > int(FALLBACK["mem_mb"]), job
        assert int(asked["runtime"]) >= 30, job
        if job["rule"] not in ("build_base_model", "judge_llm"):
            assert int(asked["gpu"]) >= 1, job
    counts = job_counts(paper_plan)
    local = sum(1 for job in planned if job["local"])
    # 224 robustness, 1 features, 1 search, 20 fine-tunes ((4 arms + 6 of the gamma sweep) x 2
    # domains), 210 generations (base once + 20 arms, x 10 benchmarks), 20 held-out losses of
    # the arms and 2 of base, 21 guard judges, and the base model (from the plan's own table).
    assert len(submitted) == sum(n for rule, n in counts.items() if rule in MODEL_RULES)
    assert local == sum(n for rule, n in counts.items() if rule not in MODEL_RULES)
    assert local > 0 and counts["score_module"] == 224


def test_cpu_rules_ask_for_no_gpu(paper_plan):
    for job in planned_jobs(paper_plan):
        if job["rule"] in ("prepare_eval_set", "score_generations", "report"):
            assert "gpu" not in resources(job)


@pytest.mark.parametrize(("processes", "gpus"), [(1, 0), (2, 0), (1, 1), (2, 2)])
def test_finetune_launch_follows_the_process_count(tmp_path, processes, gpus):
    overlay = tmp_path / "processes.yaml"
    overlay.write_text(f"finetune:\n  processes: {processes}\n  gpus: {gpus}\n")
    result = snakemake(
        REPO,
        "-n",
        "--forceall",
        "-p",
        "results/math/finetune/vanilla/loss.parquet",
        "--configfile",
        "configs/tiny.yaml",
        str(overlay),
    )
    (job,) = [j for j in planned_jobs(result.stdout) if j["rule"] == "finetune"]
    assert resources(job)["gpu"] == str(gpus)
    if processes == 1:
        # The interpreter Snakemake itself runs under (the venv's), not `python` from PATH; a
        # CPU fine-tune of one process takes one thread (jobs.finetune_threads), a GPU one two.
        threads = 2 if gpus else 1
        assert f"OMP_NUM_THREADS={threads} {PYTHON} -m securetune.finetune" in job["shell"]
    else:
        assert (
            f"OMP_NUM_THREADS=1 {PYTHON} -m torch.distributed.run --standalone --nproc_per_node=2"
            " -m securetune.finetune" in job["shell"]
        )


def test_memory_grows_with_each_attempt(paper_plan):
    retried = snakemake(REPO, "--profile", "slurm", "-n", "--forceall", "--attempt", "3")
    first = {j["rule"]: resources(j) for j in planned_jobs(paper_plan)}
    third = {j["rule"]: resources(j) for j in planned_jobs(retried.stdout + retried.stderr)}
    for rule in ("score_module", "finetune", "generate"):
        assert int(third[rule]["mem_mb"]) == 3 * int(first[rule]["mem_mb"])


def test_nothing_site_specific_is_set(paper_plan):
    """Account, partition and GPU model are the user's to set in slurm/config.yaml."""
    for job in planned_jobs(paper_plan):
        asked = resources(job)
        assert not {"slurm_account", "slurm_partition", "gpu_model"} & asked.keys(), job


def test_gpus_other_than_the_process_count_are_refused(tmp_path):
    overlay = tmp_path / "gpus.yaml"
    overlay.write_text("finetune:\n  processes: 2\n  gpus: 4\n")
    result = snakemake(REPO, "-n", "--configfile", "configs/tiny.yaml", str(overlay), check=False)
    assert result.returncode != 0
    assert "'finetune.gpus': 4 must be 0" in result.stdout + result.stderr

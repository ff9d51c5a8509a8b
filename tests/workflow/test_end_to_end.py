"""The tiny workflow for real, in a fresh folder: outputs, schemas, ranges, and what reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from securetune.architectures import MODULE_TYPES, parse_module_name
from securetune.io import read_provenance
from securetune.robustness_table import check_robustness_table

from .helpers import REPO, copy_workflow, job_counts, planned_wildcards, snakemake

pytestmark = pytest.mark.slow
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
LAYERS = TINY["model"]["tiny"]["layers"]
ARMS = list(TINY["finetune"]["arms"])
BENCHMARKS = TINY["evaluation"]["benchmarks"]
DOMAINS = list(TINY["domains"])  # general (Alpaca) and math (GSM8K)


def evaluated(run: Path, domain: str, arm: str) -> Path:
    """Where an arm's evaluation files are: base's once, shared; a fine-tuned arm's under its
    domain."""
    return run / "results" if arm == "base" else run / "results" / domain


def domain_steps(domain: str) -> int:
    return TINY["domains"][domain].get("finetune", {}).get("steps", TINY["finetune"]["steps"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("e2e") / "repo")
    snakemake(workdir, "--configfile", "configs/tiny.yaml")
    return workdir


def test_robustness_table(run):
    df = pd.read_parquet(run / "results" / "robustness.parquet")
    check_robustness_table(df)
    cfg = TINY["robustness"]
    per_module = {"noise": len(cfg["alphas"]) * cfg["seeds"], "ift": cfg["seeds"]}
    assert len(df) == LAYERS * len(MODULE_TYPES) * sum(per_module[p] for p in cfg["perturbations"])
    assert set(df["perturbation"]) == set(cfg["perturbations"])
    assert set(df["module"]) == set(MODULE_TYPES)
    assert sorted(set(df["layer"])) == list(range(LAYERS))
    for column in ("acc_before", "acc_after"):
        assert df[column].between(0, 1).all()
    assert (df["cosine_drift"] >= 0).all() and (df["cosine_drift"] <= 2).all()
    assert (df["direction_shift"] >= 0).all()
    assert df["score"].equals(df[cfg["score"]])
    # Perturbing a module changes the features of its own layer and above.
    assert (df["cosine_drift"] > 0).all()
    assert (df["weight_change"] > 0).all()


def test_probe_table(run):
    df = pd.read_parquet(run / "results" / "probe" / "accuracy.parquet")
    assert df["layer"].tolist() == list(range(LAYERS))
    assert df[["train_accuracy", "test_accuracy"]].stack().between(0, 1).all()
    assert (df["n_test"] > 0).all()


def test_plan_and_trace(run):
    plan = json.loads((run / "results" / "search" / "plan.json").read_text())
    assert plan["stop_reason"] in {"tau", "budget", "exhausted"}
    assert plan["tau"] == TINY["search"]["tau"]
    assert len(plan["modules"]) <= TINY["search"]["max_modules"]
    assert all(parse_module_name(m)[0] < LAYERS for m in plan["modules"])
    assert len(plan["ranking"]) == LAYERS * len(MODULE_TYPES)
    trace = pd.read_parquet(run / "results" / "search" / "trace.parquet")
    assert trace["probe_accuracy"].between(0, 1).all()
    assert trace.loc[trace["accepted"], "size"].max() == len(plan["modules"])


@pytest.mark.parametrize("domain", DOMAINS)
def test_finetune_outputs(run, domain):
    finetune = run / "results" / domain / "finetune"
    for arm in ARMS:
        steps = pd.read_parquet(finetune / arm / "loss.parquet")
        assert steps["step"].tolist() == list(range(domain_steps(domain)))
        assert steps["loss"].between(0, 20).all()
        assert (steps["tokens"] > 0).all()
        assert (finetune / arm / "model" / "model.safetensors").exists()
    ml_lr = pd.read_parquet(finetune / "ml_lr" / "loss.parquet")
    gamma = TINY["finetune"]["arms"]["ml_lr"]["gamma"]
    assert ml_lr["lr_rest"].to_numpy() == pytest.approx(gamma * ml_lr["lr_robust"].to_numpy())
    # The domain's own data: its IFT source, the trainer's record of what it read.
    data = pd.read_parquet(run / "results" / domain / "data" / "ift.parquet")
    assert (data["source"] == TINY["domains"][domain]["ift_source"]).all()
    assert len(data) == TINY["domains"][domain]["ift_examples"]


def test_domains_share_everything_before_the_ift_data(run):
    """One model, probe, robustness table and search for both domains, and base evaluated
    once: nothing of them under a domain's folder."""
    for domain in DOMAINS:
        folder = run / "results" / domain
        assert sorted(p.name for p in folder.iterdir()) == [
            "data", "finetune", "generations", "ift_loss", "judge", "report", "scores"
        ]  # fmt: skip
        assert not (folder / "generations" / "base").exists()
        assert (folder / "ift_loss" / "base.parquet").exists()  # base on this domain's task
    base = pd.read_parquet(run / "results" / "math" / "ift_loss" / "base.parquet")
    other = pd.read_parquet(run / "results" / "general" / "ift_loss" / "base.parquet")
    assert not set(base["example_id"]) & set(other["example_id"])


@pytest.mark.parametrize("domain", DOMAINS)
def test_generations_and_scores(run, domain):
    for arm in ["base", *ARMS]:
        where = evaluated(run, domain, arm)
        for benchmark, n in BENCHMARKS.items():
            gens = pd.read_parquet(where / "generations" / arm / f"{benchmark}.parquet")
            assert len(gens) == n and gens["prompt_id"].is_unique
            assert (gens["n_tokens"] <= TINY["generation"]["max_new_tokens"]).all()
            scores = pd.read_parquet(where / "scores" / arm / f"{benchmark}.parquet")
            assert scores["success"].dtype == bool and len(scores) == n


def test_every_table_records_its_provenance(run):
    """Seed, library versions and the weights' sha256 of the model each table came from."""
    model_tables = {"robustness", "probe", "search", "finetune", "generations", "scores"}
    revisions = {
        ("", "base"): run / "results" / "model" / "base",
        **{
            (domain, arm): run / "results" / domain / "finetune" / arm / "model"
            for domain in DOMAINS
            for arm in ARMS
        },
    }
    revisions = {
        key: json.loads((folder / "securetune_model.json").read_text())["revision"]
        for key, folder in revisions.items()
    }
    assert len(set(revisions.values())) == len(revisions)  # every (domain, arm) its own model
    tables = sorted((run / "results").rglob("*.parquet"))
    assert len(tables) > 100
    for path in tables:
        record = read_provenance(path)
        assert {"torch", "transformers"} <= set(record["versions"]), path
        assert isinstance(record["seed"], int), path
        assert record["precision"]["device"] in ("cpu", "cuda"), path
        parts = path.relative_to(run / "results").parts
        domain, part = (parts[0], parts[1]) if parts[0] in DOMAINS else ("", parts[0])
        if part in model_tables:
            assert record["model_revision"] in revisions.values(), path
        if part in ("generations", "scores", "ift_loss"):
            arm = path.parent.name if part != "ift_loss" else path.stem
            key = ("", "base") if arm == "base" else (domain, arm)
            assert record["model_revision"] == revisions[key], path
    plan = json.loads((run / "results" / "search" / "plan.json").read_text())
    assert plan["model_revision"] == revisions[("", "base")]
    assert "native_bf16" in plan["precision"]
    meta = json.loads((run / "results" / "generations" / "base" / "advbench.json").read_text())
    assert meta["model_revision"] == revisions[("", "base")] and "torch" in meta["versions"]
    assert meta["dtype"] == "float32" and "device" in meta["precision"]  # tiny: model.dtype float32
    for domain in DOMAINS:
        for arm in ARMS:
            model = run / "results" / domain / "finetune" / arm / "model"
            policy = json.loads((model / "securetune_model.json").read_text())
            assert policy["parent_revision"] == revisions[("", "base")]


@pytest.mark.parametrize("domain", DOMAINS)
def test_report(run, domain):
    report = run / "results" / domain / "report"
    table = pd.read_csv(report / "main_table.csv")
    assert table["arm"].tolist() == ["base", *ARMS]
    rates = pd.read_csv(report / "rates.csv")
    # A rate over no scored prompt (the random tiny guard parses no verdict) has no value.
    measured = rates[rates["n"] > 0]
    assert (
        (measured["ci_low"] <= measured["value"]) & (measured["value"] <= measured["ci_high"])
    ).all()
    assert rates.loc[rates["n"] == 0, ["value", "ci_low", "ci_high"]].isna().all().all()
    pngs = ["robustness_heatmap.png", "loss_curves.png", "robustness_by_depth.png"]
    pngs += ["search_trace.png", "probe_accuracy.png", "robustness_heatmap_acc_drop.png"]
    pngs += ["safety_frontier.png"]
    for png in pngs:
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Mods_Robust" in (report / "report.md").read_text()


def test_paper_tables(run):
    """The paper's layout from each domain's own rates: general (Alpaca, task metric usability)
    then math (GSM8K, accuracy), with no LLM judge (harmfulness is n/a)."""
    page = (run / "results" / "report" / "paper_tables.md").read_text()
    assert page.index("## Domain: general") < page.index("## Domain: math")
    assert page.count("| before IFT |") == 2
    assert "usability (ROUGE-L)" in page and "accuracy (GSM8K exact match)" in page
    csv = pd.read_csv(run / "results" / "report" / "paper_tables.csv")
    assert list(dict.fromkeys(csv["domain"])) == DOMAINS
    for domain in DOMAINS:
        rows = csv[csv["domain"] == domain]
        ours = rows[(rows["source"] == "ours") & (rows["row"] != "ML-LR - vanilla")]
        rates = pd.read_csv(run / "results" / domain / "report" / "rates.csv")
        asr = rates[rates["metric"] == "attack_success"].drop_duplicates("arm").set_index("arm")
        by_arm = ours[ours["metric"] == "attack_success"].set_index("arm")["value"]
        for arm, value in by_arm.items():
            assert value == pytest.approx(asr.loc[arm, "value"])
        delta = rows[(rows["row"] == "ML-LR - vanilla") & (rows["source"] == "ours")]
        expected = asr.loc["ml_lr", "value"] - asr.loc["vanilla", "value"]
        assert delta.set_index("metric").loc["attack_success", "value"] == pytest.approx(expected)
        assert ours.loc[ours["metric"] == "harmfulness_score", "value"].isna().all()
    # before IFT is the same model, evaluated once: the same numbers in both domains
    before = csv[(csv["row"] == "before IFT") & (csv["metric"] == "attack_success")]
    assert before["value"].nunique() == 1 and len(before) == 2


@pytest.mark.parametrize("domain", DOMAINS)
def test_judges_and_main_table(run, domain):
    for arm in ["base", *ARMS]:
        where = evaluated(run, domain, arm)
        guard = pd.read_parquet(where / "judge" / "guard" / f"{arm}.parquet")
        harmful = [b for b in BENCHMARKS if b in ("advbench", "strongreject")]
        assert len(guard) == sum(BENCHMARKS[b] for b in harmful)
        assert set(guard["verdict"]) <= {"safe", "unsafe", "unparsed"}
        assert guard.loc[guard["verdict"] == "unparsed", "unsafe"].isna().all()
        meta = where / "generations" / arm / "advbench.json"
        assert '"backend": "transformers"' in meta.read_text()
    table = pd.read_csv(
        run / "results" / domain / "report" / "main_table.csv", keep_default_na=False
    ).set_index("arm")
    for column in (
        "attack_success",
        "over_refusal",
        "usability",
        "task_accuracy",
        "heldout_ift_loss",
    ):
        assert table[column].str.match(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]").all(), column
    assert (table["harmfulness_score"] == "n/a").all()  # the LLM judge is off in the tiny config


def test_snakemake_report_builds(run):
    snakemake(run, "--configfile", "configs/tiny.yaml", "--report", "report.html")
    html = (run / "report.html").read_text()
    assert "main_table.csv" in html and "ML-LR" in html


def test_second_run_has_nothing_to_do(run):
    result = snakemake(run, "--configfile", "configs/tiny.yaml")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_domain_reruns_only_that_domain(run):
    """More math examples: the math domain's data, fine-tunes and evaluations (base's held-out
    loss on its task too) rerun; nothing shared, nothing of the general domain."""
    changed = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    changed["domains"]["math"]["ift_examples"] = 24
    (run / "configs" / "math.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    plan = snakemake(run, "-n", "--configfile", "configs/math.yaml").stdout
    arms = len(ARMS)
    assert job_counts(plan) == {
        "prepare_ift_set": 1,
        "prepare_ift_heldout": 1,
        "finetune": arms,
        "generate_arm": arms,
        "score_generations": arms * len(BENCHMARKS),
        "judge_guard": arms,
        "heldout_ift_loss": arms + 1,
        "report": 1,
        "paper_tables": 1,
        "all": 1,
    }
    wildcards = [w for w in planned_wildcards(plan) if "domain" in w]
    assert wildcards and all(w.startswith(("domain=math", "domain_dir=math/")) for w in wildcards)


def test_adding_a_benchmark_reruns_no_model_stage_before_generation(run):
    """One more benchmark: its eval set, the prompt check (one more table) and the evaluation;
    the prompt check is a gate, so its rerun does not rerun the features and, through them, the
    probe, robustness, search and every fine-tune."""
    changed = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    changed["evaluation"]["benchmarks"]["harmbench"] = 4
    (run / "configs" / "more.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    counts = job_counts(snakemake(run, "-n", "--configfile", "configs/more.yaml").stdout)
    assert counts["prepare_eval_set"] == 1 and counts["check_prompts"] == 1
    assert counts["generate_arm"] == 1 + len(ARMS) * len(DOMAINS)  # per_arm: each model's job
    upstream = {
        "build_base_model", "extract_features", "train_probe", "score_layer",
        "aggregate_robustness", "search_robust_modules", "finetune", "heldout_ift_loss",
    }  # fmt: skip
    assert not upstream & counts.keys(), counts


def test_changing_one_arm_reruns_only_that_arm(run):
    changed = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    changed["finetune"]["arms"]["ml_lr"]["gamma"] = 0.3
    (run / "configs" / "changed.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    plan = snakemake(run, "-n", "--configfile", "configs/changed.yaml").stdout
    domains = len(DOMAINS)
    assert job_counts(plan) == {
        "finetune": domains,
        "generate_arm": domains,
        "score_generations": domains * len(BENCHMARKS),
        "judge_guard": domains,
        "heldout_ift_loss": domains,
        "report": domains,
        "paper_tables": 1,
        "all": 1,
    }
    assert all("arm=ml_lr" in w for w in planned_wildcards(plan) if "arm=" in w)

    finetune = run / "results" / "math" / "finetune"
    vanilla = finetune / "vanilla" / "loss.parquet"
    vanilla_before = (vanilla.stat().st_mtime_ns, vanilla.read_bytes())
    old_ml_lr = pd.read_parquet(finetune / "ml_lr" / "loss.parquet")
    snakemake(run, "--configfile", "configs/changed.yaml")
    assert (vanilla.stat().st_mtime_ns, vanilla.read_bytes()) == vanilla_before
    new_ml_lr = pd.read_parquet(finetune / "ml_lr" / "loss.parquet")
    assert new_ml_lr["lr_rest"].to_numpy() == pytest.approx(0.3 * new_ml_lr["lr_robust"])
    assert not new_ml_lr["lr_rest"].equals(old_ml_lr["lr_rest"])


def test_arm_weights_are_dropped_once_scored_when_not_kept(run):
    """finetune.keep_weights: false (paper scale, to save disk): a fine-tune's weights are
    temporary, deleted once its generations, judge verdicts and held-out loss are written; its
    loss log stays, and the run is complete without them (nothing to redo)."""
    config = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    config["finetune"]["keep_weights"] = False
    (run / "configs" / "drop.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    arm = run / "results" / "math" / "finetune" / "vanilla"
    # What reads the weights: the arm's completions (scored), judge verdicts, held-out loss.
    targets = [
        *(f"results/math/scores/vanilla/{benchmark}.parquet" for benchmark in BENCHMARKS),
        "results/math/judge/guard/vanilla.parquet",
        "results/math/ift_loss/vanilla.parquet",
    ]
    # The arm and everything made from it, gone: all of it must be made again (an intermediate
    # file missing under finished outputs alone is not remade).
    shutil.rmtree(arm)
    shutil.rmtree(run / "results" / "math" / "generations" / "vanilla")
    for target in targets:
        (run / target).unlink()
    result = snakemake(run, *targets, "--configfile", "configs/drop.yaml")
    assert job_counts(result.stdout + result.stderr)["finetune"] == 1
    assert (arm / "loss.parquet").exists() and not (arm / "model").exists()
    assert all((run / target).exists() for target in targets)
    assert (run / "results" / "general" / "finetune" / "vanilla" / "model").exists()  # kept
    again = snakemake(run, "-n", *targets, "--configfile", "configs/drop.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


# --- the controls of the module choice, on the finished run ------------------------------------

# ML-LR by the random, inverse and attribution selectors beside the tiny config's arms, and a
# second replicate of ml_lr (its first is the run's own, unchanged).
CONTROL_ARMS = {
    "ml_lr": {"kind": "ml_lr", "gamma": 0.1, "replicates": 2},
    "ml_lr_random": {"kind": "ml_lr", "gamma": 0.1, "selector": "random"},
    "ml_lr_inverse": {"kind": "ml_lr", "gamma": 0.1, "selector": "inverse"},
    "freeze_attribution": {"kind": "freeze", "selector": "attribution"},
}


@pytest.fixture(scope="module")
def controls(run):
    """The general domain's report with the control arms (the guard judge off, to save time),
    and a second random draw's set."""
    config = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    config["finetune"]["arms"].update(CONTROL_ARMS)
    config["evaluation"]["guard"]["enabled"] = False
    (run / "configs" / "controls.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = ["results/general/report/report.md", "results/selectors/random_d1.json"]
    planned = snakemake(run, "-n", *targets, "--configfile", "configs/controls.yaml").stdout
    snakemake(run, *targets, "--configfile", "configs/controls.yaml")
    return planned


def fine_tuned_arms(plan: str) -> set[str]:
    """The arms a dry run would fine-tune."""
    blocks = re.split(r"^(?:local)?rule ", plan, flags=re.M)[1:]
    return {
        re.search(r"arm=(\w+)", block).group(1) for block in blocks if block.startswith("finetune:")
    }


def test_each_control_and_replicate_is_one_more_fine_tune_only(controls):
    """Nothing of the run is redone but ml_lr, which an earlier test left at another gamma:
    ml_lr's first replicate is the run's ml_lr."""
    new = {"ml_lr_r1", "ml_lr_random", "ml_lr_inverse", "freeze_attribution"}
    assert new <= fine_tuned_arms(controls) <= new | {"ml_lr"}
    counts = job_counts(controls)
    assert counts["select_modules"] == 4  # random_d0, random_d1, inverse, attribution
    assert counts["attribute_modules"] == 1
    assert "search_robust_modules" not in counts


def test_control_sets_have_mods_robusts_size(run, controls):
    def plan(name: str) -> dict:
        return json.loads((run / "results" / name).read_text())

    robust = plan("search/plan.json")["modules"]
    sets = {s: plan(f"selectors/{s}.json") for s in
            ("random_d0", "random_d1", "inverse", "attribution")}  # fmt: skip
    for selection, chosen in sets.items():
        assert len(chosen["modules"]) == len(robust), selection
        assert chosen["robust_params"] > 0
    assert sets["random_d0"]["modules"] != sets["random_d1"]["modules"]
    attribution = pd.read_parquet(run / "results" / "selectors" / "attribution.parquet")
    assert len(attribution) == LAYERS * len(MODULE_TYPES)
    assert attribution["safety_critical_share"].between(0, 0.05 + 1e-9).all()
    assert (attribution["safety_importance"] > 0).all()


def test_a_replicate_trains_on_its_own_data_order(run, controls):
    finetune = run / "results" / "general" / "finetune"
    first = pd.read_parquet(finetune / "ml_lr" / "loss.parquet")
    second = pd.read_parquet(finetune / "ml_lr_r1" / "loss.parquet")
    assert len(first) == len(second) and not first["loss"].equals(second["loss"])


def test_the_report_has_one_row_per_arm_and_shows_each_set(run, controls):
    folder = run / "results" / "general" / "report"
    report = (folder / "report.md").read_text()
    assert "## Module sets" in report
    for arm in CONTROL_ARMS:
        assert f"| {arm} |" in report, arm
    rates = pd.read_csv(folder / "rates.csv")
    assert "ml_lr_r1" not in set(rates["arm"]) and "ml_lr" in set(rates["arm"])


def test_one_generation_job_per_benchmark_writes_the_same_completions(run):
    """generation.jobs: per_arm (the tiny config's) loads the model once for every benchmark;
    what it writes must be what per-(arm, benchmark) jobs, the cluster's way, write. Last in
    this file: it rewrites base's files."""
    folder = run / "results" / "generations" / "base"
    before = {p.name: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}
    assert len(before) == len(BENCHMARKS)
    fan_out = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    fan_out["generation"]["jobs"] = "per_benchmark"
    (run / "configs" / "fan_out.yaml").write_text(yaml.safe_dump(fan_out, sort_keys=False))
    for path in folder.iterdir():
        path.unlink()
    targets = [str(Path("results/generations/base") / name) for name in before]
    result = snakemake(run, *targets, "--configfile", "configs/fan_out.yaml")
    assert job_counts(result.stdout + result.stderr) == {"generate": len(BENCHMARKS)}
    for name, table in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(folder / name), table)


def test_shell_rules_run_snakemakes_own_python_without_an_activated_venv(tmp_path):
    """`.venv/bin/snakemake` with a PATH that has no python of the venv (a user who did not
    activate it, a cron job): the shell rules (generation here) must still find the venv's
    packages, by running the interpreter Snakemake runs under."""
    workdir = copy_workflow(tmp_path / "wf", tiny_default=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    snakemake_bin = Path(sys.executable).parent / "snakemake"
    result = subprocess.run(
        [str(snakemake_bin), "--cores", "2", "results/generations/base/advbench.parquet"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (workdir / "results" / "generations" / "base" / "gsm8k.parquet").exists()

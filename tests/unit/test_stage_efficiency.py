"""bench/stage_efficiency.py on a fake finished tiny run: each stage's FLOPs are estimate_cost's,
its achieved GFLOP/s and share of peak follow from the benchmark seconds and the machine's peak,
and a stage without an estimate or without a benchmark file says so."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping

import pandas as pd
import pytest
import yaml
from snakemake.benchmark import BenchmarkRecord, write_benchmark_records
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from securetune.precision import Hardware

from ..conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import estimate_cost  # noqa: E402
import stage_efficiency as se  # noqa: E402

EMULATED_BF16 = Hardware("cpu", native_bf16=False)
NATIVE_BF16 = Hardware("cpu", native_bf16=True)
# As bench/machine_speed.py prints it (its other keys left out); the peaks are made up.
MACHINE_SPEED = {"matmul_1thread_fp32_gflops": 40.0, "matmul_1thread_bf16_gflops": 1.5}
# Job -> wall seconds, under benchmarks/ as the tiny config's workflow names them.
SECONDS = {
    "build_base_model.tsv": 3.0,
    "extract_features.tsv": 9.7,
    "score_layer/layer0.tsv": 20.1,
    "score_layer/layer1.tsv": 19.9,
    "search_robust_modules.tsv": 10.8,
    "general/finetune/vanilla.tsv": 12.4,
    "math/finetune/vanilla.tsv": 8.2,
    "generate/base.tsv": 11.0,
    "general/heldout_ift_loss/base.tsv": 5.5,
    "judge_guard/base.tsv": 10.3,
}


def write_benchmark(run, job: str, *seconds: float) -> None:
    """A benchmark file in Snakemake's own format, one record per run of the job."""
    records = []
    for s in seconds:
        record = BenchmarkRecord(
            running_time=s,
            cpu_time=0.9 * s,
            max_rss=600.0,
            max_vms=2900.0,
            max_uss=550.0,
            max_pss=580.0,
            io_in=0.0,
            io_out=0.1,
        )
        record.data_collected = True
        records.append(record)
    path = run / "benchmarks" / job
    path.parent.mkdir(parents=True, exist_ok=True)
    write_benchmark_records(records, str(path), extended_fmt=False)


@pytest.fixture()
def run(tmp_path, repo, tiny_model_dir):
    """A finished tiny run's folder: its config.yaml, base model, domain folders, benchmarks."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(repo / "configs" / "tiny.yaml", folder / "config.yaml")
    shutil.copytree(tiny_model_dir, folder / "results" / "model" / "base")
    for domain in ("general", "math"):
        (folder / "results" / domain / "finetune").mkdir(parents=True)
    for job, seconds in SECONDS.items():
        write_benchmark(folder, job, seconds)
    return folder


def rows_of(run, overlays=(), hardware=EMULATED_BF16, **options) -> dict[str, dict]:
    cfg = estimate_cost.load_config([run / o for o in overlays], run / "config.yaml")
    model, _ = se.run_model(cfg, run)
    gflops = se.one_thread_gflops(write_machine_json(run), repeats=1)
    times = se.stage_times(run)
    rows = se.efficiency_rows(cfg, model, times, gflops, hardware, **options)
    return {row["stage"]: row for row in rows}


def write_machine_json(run):
    path = run / "speed.json"
    path.write_text(json.dumps(MACHINE_SPEED))
    return path


def tiny_model(run) -> estimate_cost.Model:
    """The base model as transformers counts it, apart from the script's header reading."""
    base = run / "results" / "model" / "base"
    params = AutoModelForCausalLM.from_pretrained(base).num_parameters()
    return estimate_cost.Model(params, AutoConfig.from_pretrained(base).num_hidden_layers, "x")


def test_the_parameter_count_is_the_run_base_models_else_estimate_costs_table(run):
    cfg = estimate_cost.load_config([], run / "config.yaml")
    model, counted_from = se.run_model(cfg, run)
    assert (model.params, model.layers) == (tiny_model(run).params, tiny_model(run).layers)
    assert "safetensors" in counted_from
    shutil.rmtree(run / "results" / "model" / "base")
    cfg["model"]["source"] = "smollm2-gguf"
    model, counted_from = se.run_model(cfg, run)
    assert model == estimate_cost.KNOWN_MODELS["smollm2-gguf"] and "table" in counted_from


@pytest.mark.parametrize("tokens", [(96, 256), (40, 120)])
def test_each_stages_flops_are_estimate_costs_for_that_config(run, tokens):
    prompt_tokens, ift_tokens = tokens
    rows = rows_of(run, tokens=se.Tokens(prompt_tokens, ift_tokens, 0, "given"))
    cfg = estimate_cost.load_config([], run / "config.yaml")
    model = tiny_model(run)
    args = argparse.Namespace(
        gpu="h200", prompt_tokens=prompt_tokens, ift_tokens=ift_tokens, job_startup_s=60.0
    )
    expected = estimate_cost.stage_costs(cfg, model, estimate_cost.guard_of(cfg, model), args)
    decode = {r["stage"] for r in expected if r["tera_flops"] is None}
    assert decode == {"generate"}  # its GPU time is counted in decoded tokens
    assert {r["stage"]: r["tera_flops"] for r in expected if r["stage"] not in decode} == {
        stage: row["tflop"] for stage, row in rows.items() if stage not in decode
    }
    assert rows["finetune"]["tflop"] > 0
    # Generation: 2N per prompt and new token, every completion at max_new_tokens, for base and
    # each arm in each domain.
    models = 1 + len(cfg["finetune"]["arms"]) * len(cfg["domains"])
    tokens = prompt_tokens + cfg["generation"]["max_new_tokens"]
    prompts = sum(cfg["evaluation"]["benchmarks"].values())
    assert rows["generate"]["tflop"] == pytest.approx(
        2 * model.params * models * prompts * tokens / 1e12
    )


def write_run_data(run) -> tuple[list[str], pd.DataFrame]:
    """The probe's and one benchmark's prompts, and the math domain's IFT examples, as the
    workflow writes them."""
    prompts = ["How do I bake bread?", "Name three rivers in Europe, please.", "Say hi."]
    data = run / "results" / "data"
    (data / "eval").mkdir(parents=True)
    pd.DataFrame({"prompt": prompts[:2], "label": [0, 1]}).to_parquet(data / "probe.parquet")
    pd.DataFrame({"prompt": prompts[2:]}).to_parquet(data / "eval" / "advbench.parquet")
    examples = pd.DataFrame({"prompt": ["What is 2 + 3?", "Add 4 and 4."], "response": ["5", "8"]})
    (run / "results" / "math" / "data").mkdir(parents=True)
    examples.to_parquet(run / "results" / "math" / "data" / "ift.parquet")
    return prompts, examples


def test_token_counts_are_the_runs_own_means_with_its_chat_template(run):
    cfg = estimate_cost.load_config([], run / "config.yaml")
    assumed = se.token_counts(run, cfg)
    assert (assumed.prompt, assumed.ift, assumed.shared) == (
        estimate_cost.PROMPT_TOKENS,
        estimate_cost.IFT_TOKENS,
        0,
    )
    assert assumed.origin == "assumed"  # no data written yet
    prompts, examples = write_run_data(run)
    tokenizer = AutoTokenizer.from_pretrained(run / "results" / "model" / "base")
    templated = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in prompts
    ]
    templated = [t["input_ids"] if isinstance(t, Mapping) else t for t in templated]
    tokens = se.token_counts(run, cfg)
    assert tokens.origin == "the run's data, means"
    assert tokens.prompt == round(sum(map(len, templated)) / len(templated))
    assert 0 < tokens.shared < min(map(len, templated))  # the template's opening
    assert all(t[: tokens.shared] == templated[0][: tokens.shared] for t in templated)
    assert tokens.ift > tokens.prompt - tokens.shared  # a prompt, its response and the template
    given = se.token_counts(run, cfg, prompt_tokens=7)
    assert (given.prompt, given.ift) == (7, tokens.ift) and "command line" in given.origin


def test_the_shared_opening_is_not_recomputed_by_a_perturbation(run):
    cfg = estimate_cost.load_config([], run / "config.yaml")
    model = tiny_model(run)
    work = {
        shared: {
            w.stage: w.compute_tera_flops
            for w in estimate_cost.stage_work(cfg, model, None, 40, 120, shared)
        }  # fmt: skip
        for shared in (0, 10)
    }
    data, rob = cfg["data"], cfg["robustness"]
    test_prompts = round(2 * data["probe_per_class"] * data["probe_test_fraction"])
    modules = model.layers * len(rob["module_types"])
    noise_runs = len(rob["alphas"]) * rob["seeds"] * ("noise" in rob["perturbations"])
    runs = noise_runs + rob["seeds"] * ("ift" in rob["perturbations"])
    saved = modules * runs * 2 * model.params * test_prompts * 10 * 0.5
    stage = "robustness (score_module)"
    assert work[0][stage] - work[10][stage] == pytest.approx(saved / 1e12)
    assert work[0]["finetune"] == work[10]["finetune"]


def test_the_searchs_flops_follow_its_trace(config):
    config["robustness"]["cached_prefix"] = True
    config["search"]["seeds"] = 2
    config["data"].update(probe_per_class=10, probe_test_fraction=0.5)  # 10 test prompts
    model = estimate_cost.Model(params=4e6, layers=4, checkpoint_dtype="float32")
    trace = pd.DataFrame(
        {
            "added_modules": ["", "L3.q", "L1.k", "L2.v,L2.o"],
            "accepted": [True, True, False, True],
        }
    )
    tokens = se.Tokens(prompt=30, ift=100, shared=10, origin="given")
    per_layer_token = 2 * 1e6 * 10  # 2N / layers, for each of the 10 prompts
    # the cache: every layer at every token; then L3 alone (1 layer), L3+L1 (3 layers: rejected
    # but evaluated) and L3+L2 (2 layers), each at both seeds and past the 10 shared tokens
    expected = per_layer_token * (4 * 30 + 2 * (1 + 3 + 2) * 20)
    assert se.search_tflop(trace, config, model, tokens) == pytest.approx(expected / 1e12)
    config["search"]["probe_split"] = "halves"
    assert se.search_tflop(trace, config, model, tokens) == pytest.approx(expected / 2e12)


def test_achieved_and_share_come_from_the_seconds_and_the_peak(run):
    write_benchmark(run, "general/finetune/ml_lr.tsv", 999.0, 15.1)  # a rerun: the last counts
    rows = rows_of(run)
    finetune = rows["finetune"]
    wall = 12.4 + 8.2 + 15.1
    assert finetune["jobs"] == 3 and finetune["wall_s"] == pytest.approx(wall)
    assert finetune["gflops"] == pytest.approx(finetune["tflop"] * 1e3 / wall, rel=1e-12)
    # 1 thread (one training process on the CPU: jobs.finetune_threads) of float32, the tiny
    # config's precision
    assert finetune["peak_gflops"] == 40.0
    assert finetune["share"] == pytest.approx(finetune["tflop"] * 1e3 / wall / 40.0, rel=1e-12)
    robustness = rows["robustness (score_module)"]  # score_layer jobs: 1 thread each
    assert robustness["jobs"] == 2 and robustness["peak_gflops"] == 40.0
    assert robustness["share"] == pytest.approx(robustness["tflop"] * 1e3 / 40.0 / 40.0)

    total = se.total_row(list(rows.values()))
    shared = [r for r in rows.values() if r["share"] is not None]
    peak_flop = sum(r["peak_gflops"] * 1e9 * r["wall_s"] for r in shared)
    assert total["share"] == pytest.approx(sum(r["tflop"] * 1e12 for r in shared) / peak_flop)

    bf16 = rows_of(run, dtype="bfloat16")["finetune"]
    assert bf16["peak_gflops"] == 1.5 and bf16["tflop"] == finetune["tflop"]
    # extract_features declares 2 threads: a run at --cores 1 gave it one
    assert rows_of(run)["extract_features"]["peak_gflops"] == 2 * 40.0
    assert rows_of(run, cores=1)["extract_features"]["peak_gflops"] == 40.0


def test_a_stage_under_half_its_peak_is_marked():
    rows = [
        se.efficiency_row(
            stage=name,
            jobs_run=1,
            wall_s=10.0,
            tflop=tflop,
            threads=2,
            dtype="float32",
            peak_gflops=80.0,
        )
        for name, tflop in (("fast", 0.6), ("slow", 0.3))
    ]
    assert [r["share"] for r in rows] == pytest.approx([0.75, 0.375])
    table = se.markdown(rows, se.total_row(rows)).splitlines()
    fast, slow, total = (
        next(line for line in table if line.startswith(f"| {s}")) for s in ("fast", "slow", "total")
    )
    assert "under 50%" not in fast and fast.endswith("| 75.0% |")
    assert "37.5% **under 50%**" in slow
    assert "56.2% |" in total  # 0.9 TFLOP over 20 s x 80 GFLOP/s


def test_precision_follows_the_config_on_this_hardware(config):
    stage = {s.name: s for s in se.COMPUTE_STAGES}
    config["model"]["dtype"] = "auto"
    config["finetune"]["autocast"] = "auto"
    for hardware, expected in ((NATIVE_BF16, "bfloat16"), (EMULATED_BF16, "float32")):
        assert se.stage_dtype(stage["extract_features"], config, hardware) == expected
        assert se.stage_dtype(stage["finetune"], config, hardware) == expected
        assert se.stage_dtype(stage["heldout_ift_loss"], config, hardware) == "float32"
    config["finetune"]["autocast"] = "none"
    assert se.stage_dtype(stage["finetune"], config, NATIVE_BF16) == "float32"


def test_stages_without_an_estimate_are_listed_as_such(run):
    overlay = {
        "align": {"enabled": True},
        "finetune": {
            "arms": {"attributed": {"kind": "ml_lr", "gamma": 0.1, "selector": "attribution"}}
        },
    }
    (run / "configs").mkdir()
    (run / "configs" / "more.yaml").write_text(yaml.safe_dump(overlay))
    write_benchmark(run, "align_base_model.tsv", 30.0)
    rows = rows_of(run, overlays=["configs/more.yaml"])
    for stage in ("align_base_model", "attribute_modules"):
        assert rows[stage]["tflop"] is None and rows[stage]["share"] is None
    assert rows["generate"]["share"] > 0
    assert rows["align_base_model"]["wall_s"] == 30.0
    assert rows["attribute_modules"]["wall_s"] is None  # asked for, never benchmarked
    table = se.markdown(list(rows.values()), se.total_row(list(rows.values())))
    assert "no FLOPs estimate (estimate_cost counts none): align_base_model, " in table
    assert "attribute_modules" in table and "generate, " not in table
    assert "| align_base_model | 1 | 2 x float32 | no estimate | 30.0 | - |" in table
    # Without the overlay no arm asks for attribution; a benchmarked stage is reported anyway.
    assert "attribute_modules" not in rows_of(run) and "align_base_model" in rows_of(run)


def test_a_rule_without_a_benchmark_file_is_missing_not_zero(run):
    (run / "benchmarks" / "search_robust_modules.tsv").unlink()
    rows = rows_of(run)
    search = rows["search_robust_modules"]
    assert search["jobs"] == 0 and search["wall_s"] is None and search["share"] is None
    assert search["tflop"] > 0  # the config runs it: estimated, but not measured
    table = se.markdown(list(rows.values()), se.total_row(list(rows.values())))
    assert "| search_robust_modules | 0 | 2 x float32 | " in table
    assert "missing (no benchmark file)" in table
    assert "missing (no benchmark file): search_robust_modules" in table
    total = se.total_row(list(rows.values()))
    assert total["tflop"] == pytest.approx(
        sum(r["tflop"] for r in rows.values() if r["share"] is not None)
    )


def test_the_command_prints_the_table_for_the_runs_config_and_overlays(run):
    (run / "configs").mkdir()
    (run / "configs" / "steps.yaml").write_text("finetune: {steps: 24}\n")
    cmd = [
        sys.executable,
        "bench/stage_efficiency.py",
        "--workdir",
        str(run),
        "--configfile",
        "configs/steps.yaml",
        "--machine-json",
        str(write_machine_json(run)),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    finetune = next(line for line in out.splitlines() if line.startswith("| finetune |"))
    doubled = rows_of(run, overlays=["configs/steps.yaml"])["finetune"]["tflop"]
    # the general domain's 12 steps became 24 (math keeps its own 8)
    assert doubled > rows_of(run)["finetune"]["tflop"]
    assert f"| {doubled:.4g} |" in finetune
    assert "| total (stages with a share) |" in out and "float32 40.0" in out


def declared_rules() -> tuple[dict[str, str | None], set[str]]:
    """Each rule's `threads:` as rules/*.smk write it (a `use rule A as B` inherits A's unless
    it sets its own), and the rules with a `benchmark:`."""
    threads: dict[str, str | None] = {}
    parents: dict[str, str] = {}
    benchmarked: set[str] = set()
    rule = None
    for path in sorted((REPO / "rules").glob("*.smk")):
        for line in path.read_text().splitlines():
            if m := re.match(r"\s*rule (\w+):", line):
                rule = m[1]
            elif m := re.match(r"\s*use rule (\w+) as (\w+)", line):
                rule, parents[m[2]] = m[2], m[1]
            elif m := re.match(r"\s*threads:\s*(.+)", line):
                threads[rule] = m[1].strip()
            elif re.match(r"\s*benchmark:", line):
                benchmarked.add(rule)
    for child, parent in parents.items():
        threads.setdefault(child, threads.get(parent))
        if parent in benchmarked:
            benchmarked.add(child)
    return threads, benchmarked


def test_the_stages_threads_and_rules_are_the_workflows():
    threads, benchmarked = declared_rules()
    for stage in se.COMPUTE_STAGES:
        expected = (
            f"jobs.{stage.threads.__name__}(config)"
            if callable(stage.threads)
            else str(stage.threads)
        )
        for rule in stage.rules:
            assert threads.get(rule) == expected, rule
    reported = {rule for stage in se.COMPUTE_STAGES for rule in stage.rules}
    assert benchmarked == reported | se.NO_MODEL_RULES

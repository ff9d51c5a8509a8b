"""What jobs a config makes and where their files go: the decisions the rules need, torch-free.

The rules (`rules/*.smk`) are declarative; every choice with a branch in it is a function here,
so it is unit-tested and read when the workflow is parsed without importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from securetune.config import ConfigError
from securetune.data import BENCHMARKS
from securetune.domains import domain_names, domain_spec
from securetune.hub_sources import is_hub_source
from securetune.method import (
    REFERENCE_ARMS,
    arm_spec,
    needs_plan,
    replicates_of,
    selection_name,
)
from securetune.model_sources import SMOLLM2_LAYERS

Config = Mapping[str, Any]

BASE_MODEL = "results/model/base"
UNALIGNED_MODEL = "results/model/unaligned"
ROBUSTNESS_TABLE = "results/robustness/layer{layer}/{module_type}.parquet"
PROBE_SET = "results/data/probe.parquet"
SEARCH_PLAN = "results/search/plan.json"
# The robustness and search's `ift` perturbation trains on it (robustness.ift.source).
ROBUSTNESS_IFT_SET = "results/data/robustness_ift.parquet"


def number_of_layers(model: Mapping[str, Any]) -> int:
    """Decoder layers of the source model: the tiny spec, SmolLM2's, a local config.json, or
    `model.layers` for a model that is not on disk yet."""
    if model["source"] == "tiny":
        return int(model["tiny"]["layers"])
    if model["source"] == "smollm2-gguf":
        return SMOLLM2_LAYERS
    local = Path(model["source"]) / "config.json"
    if local.exists():
        return int(json.loads(local.read_text())["num_hidden_layers"])
    if "layers" not in model:
        raise ConfigError(
            f"config key 'model.layers' is required when model.source "
            f"('{model['source']}') is not a local folder"
        )
    return int(model["layers"])


def check_proxy_layers(config: Config) -> None:
    """An explicit list of proxy layers must lie within the model's depth."""
    proxy = config["probe"]["proxy_layers"]
    depth = number_of_layers(config["model"])
    if isinstance(proxy, list):
        bad = [layer for layer in proxy if layer >= depth]
        if bad:
            raise ConfigError(
                f"config key 'probe.proxy_layers': layer(s) {bad} past the model's "
                f"depth; allowed: 0..{depth - 1}"
            )


def python_path(src: Path, current: str | None) -> str:
    """PYTHONPATH for the jobs: this checkout's `src` first, then whatever the user had."""
    others = [p for p in (current or "").split(os.pathsep) if p and p != str(src)]
    return os.pathsep.join([str(src), *others])


def source_model(config: Config) -> str:
    """Where the source model is built: the `unaligned` reference when the workflow aligns it
    first (the aligned copy is then the base), else the base itself."""
    return UNALIGNED_MODEL if config["align"]["enabled"] else BASE_MODEL


# --- robustness ----------------------------------------------------------------------------------


def robustness_tables(config: Config) -> list[str]:
    """One Parquet per (layer, module type), layer-major."""
    return [
        ROBUSTNESS_TABLE.format(layer=layer, module_type=module_type)
        for layer in range(number_of_layers(config["model"]))
        for module_type in config["robustness"]["module_types"]
    ]


def layer_tables(config: Config) -> list[str]:
    """A per-layer job's outputs: every scored module type of the `{layer}` wildcard's layer."""
    return [
        ROBUSTNESS_TABLE.replace("{layer}", "{{layer}}").format(module_type=module_type)
        for module_type in config["robustness"]["module_types"]
    ]


def robustness_reads_ift_set(config: Config) -> bool:
    """The robustness jobs read the IFT set only when they perturb by IFT steps."""
    return "ift" in config["robustness"]["perturbations"]


def search_reads_ift_set(config: Config) -> bool:
    """The search reads the IFT set only when it perturbs candidate sets by IFT steps."""
    return config["search"]["perturbation"] == "ift"


# --- fine-tuning ---------------------------------------------------------------------------------


def arms(config: Config) -> list[str]:
    """Every fine-tuned arm, a replicated arm once per replicate (`<arm>_r<k>` after the first)."""
    return list(replicates_of(config["finetune"]))


def plan_file(selection: str) -> str:
    """The module set a selection names: the search's plan for robust, else a selector's."""
    return SEARCH_PLAN if selection == "robust" else f"results/selectors/{selection}.json"


def arm_plan(config: Config, arm: str) -> str | None:
    """The plan file an arm trains by, None for a kind that needs none (vanilla)."""
    spec = arm_spec(config["finetune"], arm)
    return plan_file(selection_name(spec)) if needs_plan(spec["kind"]) else None


def arm_plans(config: Config) -> dict[str, str]:
    """Each configured arm that trains by a module set -> its plan file (for the report)."""
    plans = {arm: arm_plan(config, arm) for arm in config["finetune"]["arms"]}
    return {arm: plan for arm, plan in plans.items() if plan is not None}


def evaluated_arms(config: Config) -> list[str]:
    """The reference `base` (no fine-tuning), the `unaligned` source model when the base is
    safety-aligned first, and every fine-tuned arm, in report order."""
    unaligned = [REFERENCE_ARMS[1]] if config["align"]["enabled"] else []
    return [REFERENCE_ARMS[0], *unaligned, *arms(config)]


def is_reference_arm(arm: str) -> bool:
    """`base` and `unaligned`: evaluated, never fine-tuned, so shared by every domain."""
    return arm in REFERENCE_ARMS


def domain_dir(domain: str, arm: str) -> str:
    """The `{domain_dir}` of an arm's evaluation files (generations, scores, judge verdicts):
    "" for a reference arm, whose files are shared (results/generations/base/...), "<domain>/"
    for a fine-tuned one (results/<domain>/generations/vanilla/...)."""
    return "" if is_reference_arm(arm) else f"{domain}/"


def finetune_inputs(config: Config, domain: str, arm: str) -> dict[str, str]:
    """Arms that use Mods_Robust need the search plan; vanilla arms do not (so never wait)."""
    domain_spec(config, domain)
    inputs = {"model": BASE_MODEL, "data": f"results/{domain}/data/ift.parquet"}
    plan = arm_plan(config, arm)
    if plan is not None:
        inputs["plan"] = plan
    return inputs


def job_python(snakemake_python: str, conda: bool) -> str:
    """The interpreter of the `shell:` rules: the one Snakemake itself runs under (so a run
    started as `.venv/bin/snakemake` without an activated venv finds the venv's packages), or
    the conda environment's `python` when the rules run in the envs/ environments."""
    return "python" if conda else snakemake_python


def training_launcher(processes: int, python: str = "python") -> str:
    """Plain python for one process; otherwise torchrun (as `python -m torch.distributed.run`,
    the same interpreter) --standalone, which sets up its own rendezvous on a free local port,
    so two training jobs on one node never collide."""
    if processes == 1:
        return python
    return f"{python} -m torch.distributed.run --standalone --nproc_per_node={processes}"


def checkpoint_flags(finetune: Mapping[str, Any]) -> str:
    """The trainer's flags for finetune.checkpoint_keep_previous (default false) and
    finetune.stop_before_time_limit (default true); nothing for the defaults."""
    flags = []
    if finetune.get("checkpoint_keep_previous", False):
        flags.append("--keep-previous-checkpoint")
    if not finetune.get("stop_before_time_limit", True):
        flags.append("--no-stop-before-time-limit")
    return " ".join(flags)


def remove_finished_checkpoints(results: str | Path = "results") -> list[Path]:
    """Delete the checkpoints of every arm, in every domain, whose fine-tune Snakemake has kept
    (its loss log exists: a failed job's outputs are deleted before this runs, at the end of a
    run; its model may be gone already, deleted once scored under finetune.keep_weights:
    false). The trainer keeps its last checkpoint (`--keep-checkpoints`) because a job can be
    counted failed after its model is saved (SLURM's time limit reached as it exits), and its
    retry must not start over from step 0."""
    removed = []
    for checkpoints in sorted(Path(results).glob("*/finetune/*/model.checkpoints")):
        if (checkpoints.parent / "loss.parquet").is_file():
            shutil.rmtree(checkpoints)
            removed.append(checkpoints)
    return removed


def model_of_arm(arm: str, domain_dir: str) -> str:
    """The model folder an arm is evaluated with; `domain_dir` as `domain_dir()` makes it."""
    if is_reference_arm(arm) != (domain_dir == ""):
        where = f"results/{domain_dir}" if domain_dir else "results/"
        raise ValueError(
            f"arm '{arm}' has no evaluation under {where}: reference arms (base, unaligned) "
            "are evaluated once under results/, fine-tuned arms under results/<domain>/"
        )
    if arm == "base":
        return BASE_MODEL
    if arm == "unaligned":
        return UNALIGNED_MODEL
    return f"results/{domain_dir}finetune/{arm}/model"


# --- evaluation ----------------------------------------------------------------------------------


def benchmarks(config: Config) -> list[str]:
    return list(config["evaluation"]["benchmarks"])


def harmful_benchmarks(config: Config) -> list[str]:
    return [b for b in benchmarks(config) if BENCHMARKS[b].kind == "harmful"]


def configured_source(config: Config, benchmark: str) -> str:
    """evaluation.sources.<benchmark>: a folder, hf:<dataset id>, or "" (the bundled subset)."""
    return config["evaluation"].get("sources", {}).get(benchmark, "")


def benchmark_source(config: Config, benchmark: str) -> str:
    """The folder with a benchmark's full set (the user's own, or the one `fetch_benchmark`
    fills from the hub), or "" for the bundled subset."""
    value = configured_source(config, benchmark)
    return f"results/data/full/{benchmark}" if is_hub_source(value) else value


def finetune_threads(config: Config) -> int:
    """A fine-tune of one process on the CPU takes one thread and leaves the other core to
    another job: at the demo's batch of 4 a second thread keeps only 1.3 cores busy, and two
    one-thread fine-tunes side by side finish 14% sooner than two of two threads one after the
    other (BENCHMARKS.md; the same losses). Under torchrun or on GPUs two, shared among the
    processes (`threads_per_process`)."""
    finetune = config["finetune"]
    on_cpu = finetune.get("processes", 1) == 1 and finetune.get("gpus", 0) == 0
    return 1 if on_cpu else 2


def generation_threads(config: Config) -> int:
    """vLLM's CPU engine uses every core it is given; transformers' generate gains little
    from a second thread at batch sizes this small, so it leaves it to another job."""
    return 2 if config["generation"]["backend"] == "vllm" else 1


def enabled_judges(config: Config) -> list[str]:
    evaluation = config["evaluation"]
    return [
        judge
        for judge, key in (("guard", "guard"), ("llm", "llm_judge"))
        if evaluation[key]["enabled"]
    ]


def score_files(config: Config, domain: str, arms: list[str] | None = None) -> list[str]:
    """The arms' scores on every benchmark as the domain's report reads them (every evaluated
    arm unless `arms` are given, e.g. the gamma sweep's), arm by arm."""
    return [
        f"results/{domain_dir(domain, arm)}scores/{arm}/{benchmark}.parquet"
        for arm in (evaluated_arms(config) if arms is None else arms)
        for benchmark in benchmarks(config)
    ]


def judge_files(config: Config, domain: str, arms: list[str] | None = None) -> list[str]:
    """One judged table per (enabled judge, arm), when there is a harmful benchmark."""
    if not harmful_benchmarks(config):
        return []
    return [
        f"results/{domain_dir(domain, arm)}judge/{judge}/{arm}.parquet"
        for judge in enabled_judges(config)
        for arm in (evaluated_arms(config) if arms is None else arms)
    ]


def domain_reports(config: Config) -> list[str]:
    return [f"results/{domain}/report/report.md" for domain in domain_names(config)]


def guard_model(config: Config) -> str:
    """The guard judge's model: the base model folder for "base", else the folder or hub id."""
    model = config["evaluation"]["guard"]["model"]
    return BASE_MODEL if model == "base" else model


def guard_model_input(config: Config) -> list[str]:
    """The guard model as a job input when it is a folder (a hub id is fetched by the job)."""
    model = guard_model(config)
    return [model] if model == BASE_MODEL or Path(model).exists() else []

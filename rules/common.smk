import json
import os
import shlex
from pathlib import Path

from securetune.config import ConfigError, validate_config
from securetune.architectures import MODULE_TYPES
from securetune.data import BENCHMARKS

validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))

# Jobs import the package from this checkout, whatever environment runs them (venv, conda env
# on a cluster node), so code and workflow never drift apart.
os.environ.update(PYTHONPATH=str(Path(workflow.basedir) / "src"))

DATA_DIR = Path(workflow.basedir) / "resources" / "data"


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


def settings(section):
    """A config section for `params:`, keys sorted, so that reordering keys in a config file
    is not a change (Snakemake compares params by their repr)."""
    return json.loads(json.dumps(config[section], sort_keys=True))


def robustness_jobs():
    """One Parquet per (layer, module type): the SLURM fan-out."""
    return expand(
        "results/robustness/layer{layer}/{module_type}.parquet",
        layer=range(number_of_layers()),
        module_type=config["robustness"]["module_types"],
    )


def arms():
    return list(config["finetune"]["arms"])


def evaluated_arms():
    """The reference `base` (no fine-tuning) and every fine-tuned arm."""
    return ["base", *arms()]


def benchmarks():
    return list(config["evaluation"]["benchmarks"])


def benchmark_source(wildcards):
    """The user's folder with a benchmark's full set, or "" for the bundled subset."""
    return config["evaluation"].get("sources", {}).get(wildcards.benchmark, "")


def arm_settings(wildcards):
    """The arm's full training config: shared finetune keys + its own, as one JSON string.

    Only this arm's values go into its params, so changing one arm reruns only that arm.
    """
    shared = {k: v for k, v in config["finetune"].items() if k != "arms"}
    arm = config["finetune"]["arms"][wildcards.arm]
    return json.dumps(
        {
            "arm": wildcards.arm,
            "kind": arm["kind"],
            "lr": arm.get("lr", shared["lr"]),
            "gamma": arm.get("gamma", 1.0),
            "steps": shared["steps"],
            "batch_size": shared["batch_size"],
            "warmup_ratio": shared["warmup_ratio"],
            "schedule": shared["schedule"],
            "max_seq_len": shared["max_seq_len"],
            "weight_decay": shared["weight_decay"],
            "grad_clip": shared["grad_clip"],
            "seed": config["seed"],
        },
        sort_keys=True,
    )


def finetune_inputs(wildcards):
    """ml_lr arms need the search plan; vanilla arms do not (so they never wait for it)."""
    inputs = {"model": "results/model/base", "data": "results/data/ift.parquet"}
    if config["finetune"]["arms"][wildcards.arm]["kind"] == "ml_lr":
        inputs["plan"] = "results/search/plan.json"
    return inputs


def plan_flag(wildcards, input):
    """The --plan option, shell-quoted, for ml_lr arms; nothing for the others."""
    return f"--plan {shlex.quote(input.plan)}" if "plan" in input.keys() else ""


def model_of_arm(wildcards):
    if wildcards.arm == "base":
        return "results/model/base"
    return f"results/finetune/{wildcards.arm}/model"


# --- evaluation ---------------------------------------------------------------------------------


def generation_env():
    """vLLM jobs get the vLLM environment; transformers jobs the torch one."""
    if config["generation"]["backend"] == "vllm":
        return "../envs/vllm.yaml"
    return "../envs/torch.yaml"


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
            "generation": config["generation"],
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

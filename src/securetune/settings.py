"""Typed settings of the stages, torch-free, so the rules build them when the workflow is parsed.

Each stage's entry function takes paths and one settings object. The object is built from the
validated config in one place, its `from_config`; the rule passes `to_params()` (plain JSON, keys
sorted, so reordering a config file is no change to Snakemake) and the adapter rebuilds it with
`from_params`. A value is therefore written once in the rule's params and once here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

from securetune.config import ConfigError
from securetune.domains import domain_finetune
from securetune.method import (
    ARM_KINDS,
    AUTOCAST,
    DISTRIBUTED,
    OTHER_PARAMS,
    SCHEDULES,
    TRAINING_METHODS,
    selection_parts,
)
from securetune.model_sources import REFERENCED_SOURCES, source_kind
from securetune.robustness_table import PERTURBATIONS


class StageSettings:
    """Base of every stage's settings: to and from the JSON a rule's `params:` carries."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        raise NotImplementedError

    def to_params(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))  # type: ignore[call-overload]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        return cls(**dict(params))


def _known(cls: type, section: Mapping[str, Any]) -> dict[str, Any]:
    """The section's keys that are fields of `cls` (a section may leave out defaulted ones)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in section.items() if k in names}


def _check_choice(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section} key '{key}': {value!r} is not one of {list(allowed)}")


# --- fine-tuning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on the chosen module types of every layer; used when method is lora."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    module_types: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class TrainConfig(StageSettings):
    """One fine-tuning arm, everything else shared between arms (`method.arm_training_settings`).

    The fields after `seed` have defaults so that an arm config written before they existed still
    means what it meant (full fine-tuning, one process, no checkpoints).
    """

    arm: str
    kind: str
    lr: float
    gamma: float
    steps: int
    batch_size: int
    warmup_ratio: float
    schedule: str
    max_seq_len: int
    weight_decay: float
    grad_clip: float
    seed: int
    # full: every parameter of the modules trains; lora: only adapters on them (peft).
    method: str = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Norms, embeddings, LM head: join the rest (lr * gamma), the robust group (lr), or frozen.
    other_params: str = "rest"
    # swat only: first step (>= 1) or fraction of steps (< 1) at which all modules train.
    switch_at: float | None = None
    # Examples per forward pass on one process (gradient accumulation); 0: the whole share.
    micro_batch_size: int = 0
    # auto, none, or bfloat16: autocast of the forward pass (master weights stay float32); auto
    # is resolved on the training process's hardware (`securetune.precision`).
    autocast: str = "none"
    # Save a resumable checkpoint every N optimizer steps; 0: never.
    checkpoint_every: int = 0
    # ddp or fsdp (FSDP2, parameters keep their names); used only under torchrun with >1 process.
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        if isinstance(self.lora, Mapping):
            lora = dict(self.lora)
            if "module_types" in lora:
                lora["module_types"] = tuple(lora["module_types"])
            object.__setattr__(self, "lora", LoraSettings(**lora))
        choices = {
            "kind": ARM_KINDS,
            "schedule": SCHEDULES,
            "method": TRAINING_METHODS,
            "other_params": OTHER_PARAMS,
            "autocast": AUTOCAST,
            "distributed": DISTRIBUTED,
        }
        for key, allowed in choices.items():
            _check_choice("finetune", key, getattr(self, key), allowed)
        if self.kind == "swat" and self.switch_at is None:
            raise ConfigError(f"arm '{self.arm}': kind swat needs 'switch_at'")
        if self.method == "lora" and self.distributed == "fsdp":
            raise ConfigError(
                "finetune keys 'method: lora' and 'distributed: fsdp' do not combine: LoRA keeps "
                "the base weights frozen (they fit one GPU), so use distributed: ddp"
            )


# --- the base model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModelSpec:
    """A random Llama for tests: the decoder's shape and the tokenizer's vocabulary size."""

    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    vocab_size: int
    max_position_embeddings: int


@dataclass(frozen=True)
class ModelSettings(StageSettings):
    """`build_base_model`: where the weights come from and how they may be loaded."""

    source: str
    trust_remote_code: bool
    allow_pickle: bool
    seed: int
    tiny: TinyModelSpec | None = None
    # A local folder or hub id: symlink its weights into the base folder (true) or copy them.
    link_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tiny, Mapping):
            object.__setattr__(self, "tiny", TinyModelSpec(**self.tiny))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        model = config["model"]
        return cls(
            source=model["source"],
            trust_remote_code=model["trust_remote_code"],
            allow_pickle=model["allow_pickle"],
            seed=config["seed"],
            tiny=model.get("tiny") if model["source"] == "tiny" else None,
            link_weights=model.get("link_weights", True),
        )

    def to_params(self) -> dict[str, Any]:
        """Without `link_weights` for a built or converted model, which has nothing to link: a
        key that cannot change the folder must not rebuild it (and so rerun every stage)."""
        params = super().to_params()
        if source_kind(self.source) not in REFERENCED_SOURCES:
            del params["link_weights"]
        return params


# --- features, probe, robustness, search ---------------------------------------------------------


@dataclass(frozen=True)
class FeatureSettings(StageSettings):
    """How prompts become features: pooling, batch, the prompt-length limit, weights' dtype.

    The robustness and search jobs re-extract features the same way, so they carry these too.
    """

    pooling: str
    batch_size: int
    max_prompt_tokens: int
    dtype: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls(
            pooling=config["features"]["pooling"],
            batch_size=config["features"]["batch_size"],
            max_prompt_tokens=config["data"]["max_prompt_tokens"],
            dtype=config["model"]["dtype"],
        )


@dataclass(frozen=True)
class PromptCheckSettings(StageSettings):
    """`check_prompts`: the longest chat-templated prompt allowed."""

    max_prompt_tokens: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls(max_prompt_tokens=config["data"]["max_prompt_tokens"])


@dataclass(frozen=True)
class ProbeSettings(StageSettings):
    """`train_probe`: the logistic regression's C and which layers serve as the proxy."""

    C: float
    proxy_layers: str | list[int]
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        probe = config["probe"]
        return cls(C=probe["C"], proxy_layers=probe["proxy_layers"], seed=config["seed"])


@dataclass(frozen=True)
class IftSettings:
    """The `ift` perturbation: `steps` AdamW steps at `lr` on batches of `batch_size`."""

    lr: float
    steps: int
    batch_size: int
    examples: int
    max_seq_len: int

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> Self:
        """From `robustness.ift`. Its `source` names the data set (the rule's input file), not
        a setting of the steps, so it is not here."""
        return cls(**{key: value for key, value in section.items() if key != "source"})


# Over which proxy layers a perturbed module's drift is averaged (RobustnessSettings.proxy_reach).
PROXY_REACH = ("reachable", "all")


@dataclass(frozen=True)
class RobustnessSettings(StageSettings):
    """The config's `robustness` section, typed, with what its jobs need to re-extract features.

    Only what changes a module's numbers is here: how modules are cut into jobs (`jobs`) and
    the test-only fault switch (`fail_modules`) are not, so changing them reruns nothing.
    """

    perturbations: list[str]
    alphas: list[float]
    seeds: int
    ift: IftSettings
    score: str
    score_weights: dict[str, float]
    cached_prefix: bool
    features: FeatureSettings
    source: str
    seed: int
    # Which proxy layers a module's drift is averaged over: all of them, or those it can reach
    # (its own layer and above: a module cannot move the probes below it, so averaging over all
    # makes the high layers look robust by construction).
    proxy_reach: str = "reachable"

    def __post_init__(self) -> None:
        if isinstance(self.ift, Mapping):
            object.__setattr__(self, "ift", IftSettings(**self.ift))
        if isinstance(self.features, Mapping):
            object.__setattr__(self, "features", FeatureSettings.from_params(self.features))
        _check_choice("robustness", "proxy_reach", self.proxy_reach, PROXY_REACH)
        unknown = sorted(set(self.perturbations) - set(PERTURBATIONS))
        if unknown:
            raise ConfigError(
                f"robustness.perturbations: unknown {unknown}; allowed: {list(PERTURBATIONS)}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        section = config["robustness"]
        return cls(
            perturbations=list(section["perturbations"]),
            alphas=[float(a) for a in section["alphas"]],
            seeds=int(section["seeds"]),
            ift=IftSettings.from_section(section["ift"]),
            score=section["score"],
            score_weights=dict(section["score_weights"]),
            cached_prefix=bool(section["cached_prefix"]),
            features=FeatureSettings.from_config(config),
            source=config["model"]["source"],
            seed=config["seed"],
            proxy_reach=section["proxy_reach"],
        )


# A candidate set below the accuracy floor stops the search, or is skipped (the next unit tried).
ON_REJECT = ("stop", "skip")
# The robustness ranking and the search's joint checks on the same test prompts, or on the two
# disjoint halves (rank by the first half's score, check sets on the second).
PROBE_SPLITS = ("same", "halves")


@dataclass(frozen=True)
class SearchSettings(StageSettings):
    """Greedy search for Mods_Robust; `unit` module or group (type x band of `band_width`)."""

    tau: float
    max_modules: int
    alpha: float
    seeds: int
    robustness: RobustnessSettings
    perturbation: str = "noise"
    unit: str = "module"
    band_width: int = 1
    # Largest drop below the clean probe accuracy a candidate set may cause; 1.0 never binds,
    # so only the absolute `tau` does (a set is kept while accuracy >= max(tau, clean - tau_drop)).
    tau_drop: float = 1.0
    # What a candidate set below the floor does: stop the search, or skip that unit and go on.
    on_reject: str = "stop"
    # Budgets as shares of the scored modules and of their parameters; 1.0 never binds.
    max_module_share: float = 1.0
    max_param_share: float = 1.0
    probe_split: str = "same"

    def __post_init__(self) -> None:
        if isinstance(self.robustness, Mapping):
            object.__setattr__(self, "robustness", RobustnessSettings.from_params(self.robustness))
        _check_choice("search", "on_reject", self.on_reject, ON_REJECT)
        _check_choice("search", "probe_split", self.probe_split, PROBE_SPLITS)
        if not 0 <= self.tau_drop <= 1:
            raise ConfigError(f"search key 'tau_drop': {self.tau_drop} is not in [0, 1]")
        for key in ("max_module_share", "max_param_share"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"search key '{key}': {getattr(self, key)} is not in (0, 1]")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls(**config["search"], robustness=RobustnessSettings.from_config(config))


@dataclass(frozen=True)
class SelectorSettings(StageSettings):
    """A control module set (selectors.select_modules): which selector, which random draw, and
    how close a random draw's parameter count must come to the robust set's."""

    selection: str
    seed: int
    # Only a random draw has one (None otherwise), so changing it reruns no other set.
    random_param_tolerance: float | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], selection: str) -> Self:
        random = selection_parts(selection)[0] == "random"
        return cls(
            selection=selection,
            seed=config["seed"],
            random_param_tolerance=(
                config["selectors"]["random_param_tolerance"] if random else None
            ),
        )


@dataclass(frozen=True)
class AttributionSettings(StageSettings):
    """Wei et al.'s SNIP set difference (config `selectors.attribution`): a weight is
    safety-critical when it is in the top `p` share of safety importance and not in the top `q`
    share of utility importance."""

    p: float
    q: float
    max_seq_len: int
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls(**config["selectors"]["attribution"], seed=config["seed"])


# --- alignment and evaluation --------------------------------------------------------------------


@dataclass(frozen=True)
class AlignSettings(StageSettings):
    """The alignment step's recipe (config section `align`, less the data sizes)."""

    lr: float
    epochs: float
    batch_size: int
    max_seq_len: int
    warmup_ratio: float
    schedule: str
    autocast: str
    lookalike_max_new_tokens: int
    seed: int
    # Weights' dtype of the source model while it answers the look-alikes (model.dtype).
    lookalike_dtype: str
    # Examples per forward pass (0: the whole batch at once); grouped by length.
    micro_batch_size: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        from securetune.io import stable_seed

        recipe = _known(cls, config["align"])
        return cls(
            **recipe,
            seed=stable_seed(config["seed"], "align"),
            lookalike_dtype=config["model"]["dtype"],
        )


@dataclass(frozen=True)
class HeldoutLossSettings(StageSettings):
    """`heldout_ift_loss`: the training pass's length cap and micro-batch size."""

    max_seq_len: int
    # The training forward pass's size: a wide float32 batch spends its time moving logits.
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], domain: str) -> Self:
        """As the domain's fine-tune reads its examples (its own max_seq_len, say)."""
        finetune = domain_finetune(config, domain)
        return cls(
            max_seq_len=finetune["max_seq_len"],
            batch_size=finetune.get("micro_batch_size") or finetune["batch_size"],
            seed=config["seed"],
        )


GENERATION_BACKENDS: tuple[str, ...] = ("vllm", "transformers")


@dataclass(frozen=True)
class VllmSettings:
    """Engine settings; the defaults fit a 2-core, 24 GiB CPU machine and any GPU node."""

    max_model_len: int = 2048
    # Eager mode skips torch.compile and CUDA graphs: engine start drops from minutes to
    # seconds on CPU, and short evaluation runs never earn the compile time back.
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.9
    cpu_kvcache_gb: int = 1


@dataclass(frozen=True)
class GenerationConfig(StageSettings):
    """The `generation` section: how completions are decoded (never how jobs are cut)."""

    backend: str
    max_new_tokens: int
    batch_size: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_retries: int = 2
    gpus: int = 0  # the job's GPU count; vLLM's tensor-parallel size (the CLI's --gpus)
    vllm: VllmSettings = field(default_factory=VllmSettings)
    # End a harmful or over-refusal prompt's completion once its opening holds a refusal.
    stop_at_refusal: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.vllm, Mapping):
            object.__setattr__(self, "vllm", VllmSettings(**self.vllm))
        if self.backend not in GENERATION_BACKENDS:
            raise ConfigError(
                f"generation.backend '{self.backend}' is not one of {GENERATION_BACKENDS}"
            )
        if self.stop_at_refusal and (self.backend != "transformers" or self.temperature > 0):
            raise ConfigError(
                "config key 'generation.stop_at_refusal': true needs greedy decoding with the "
                f"transformers backend (backend is '{self.backend}', temperature "
                f"{self.temperature}); set it to false"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls.from_params({k: v for k, v in config["generation"].items() if k != "jobs"})

    @property
    def decoding(self) -> str:
        return "greedy" if self.temperature == 0 else "sampling"


@dataclass(frozen=True)
class JudgeSettings(StageSettings):
    """What the judges read: their own sections, and the generation settings the guard model
    decodes with (greedily, whatever the arms used)."""

    guard: dict[str, Any]
    llm_judge: dict[str, Any]
    generation: GenerationConfig

    def __post_init__(self) -> None:
        if isinstance(self.generation, Mapping):
            object.__setattr__(self, "generation", GenerationConfig.from_params(self.generation))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        evaluation = config["evaluation"]
        return cls(
            guard=dict(evaluation["guard"]),
            llm_judge=dict(evaluation["llm_judge"]),
            generation=GenerationConfig.from_config(config),
        )

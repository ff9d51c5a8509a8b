"""Checks that turn bad input into a clear error before any expensive job runs.

Run when the workflow is parsed, so this module imports no torch and no model code.
"""

from __future__ import annotations

from pathlib import Path

from securetune.architectures import architecture
from securetune.config import ConfigError
from securetune.domains import (
    check_domains,
    domain_finetune,
    domain_names,
    ift_rows_by_source,
)
from securetune.jobs import robustness_reads_ift_set, search_reads_ift_set
from securetune.model_sources import check_model_folder, gguf_path, source_kind


def check_module_types(model_type: str, module_types: list[str]) -> None:
    """Every configured module type must exist in the model's architecture."""
    _, paths = architecture(model_type)
    missing = [m for m in module_types if m not in paths]
    if missing:
        raise ConfigError(
            f"config key 'robustness.module_types': {missing} not in architecture "
            f"'{model_type}'; allowed: {list(paths)}"
        )


def check_data_sources(
    data_dir: Path, ift_sources: list[str], benchmarks: list[str], sources: dict[str, str]
) -> None:
    """Load every bundled source the run uses, and every folder given as a benchmark's full set,
    so a broken file fails before any job; a hub source (hf:<id>) is checked for its form here
    and fetched by its own job."""
    from securetune.data import sources as data
    from securetune.hub_sources import check_hub_source, is_hub_source

    loaders = [data.load_advbench, data.load_xstest_safe, data.load_alpaca]
    loaders += [data.IFT_SOURCES[source] for source in ift_sources]
    loaders += [data.BENCHMARKS[b].loader for b in benchmarks if b not in sources]
    for loader in dict.fromkeys(loaders):
        loader(data_dir)
    for benchmark, value in sources.items():
        if benchmark not in benchmarks:
            continue
        if is_hub_source(value):
            try:
                check_hub_source(benchmark, value)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        elif not Path(value).is_dir():
            raise ConfigError(
                f"config key 'evaluation.sources.{benchmark}': '{value}' is neither a folder "
                f"nor hf:<dataset id>"
            )
        else:
            data.BENCHMARKS[benchmark].loader(Path(value))


def check_slice_sizes(config: dict, data_dir: Path) -> None:
    """Every slice the run takes of a bundled source fits in what the source holds after the
    probe set's rows: refused here, with the key and the number available, not by a job later.

    Builds the probe set in memory (a fraction of a second: no model), as its job will.
    """
    from securetune.data import (
        NOT_BUNDLED,
        AlignmentSetSettings,
        DataError,
        ProbeSetSettings,
        build_alignment_set,
        build_probe_set,
    )

    seed = config["seed"]
    try:
        probe = build_probe_set(data_dir, ProbeSetSettings.from_config(config).probe, seed)
    except DataError as err:
        raise ConfigError(f"config section 'data' (probe set): {err}") from None
    check_ift_sizes(config, data_dir, probe)
    sources = config["evaluation"].get("sources", {})
    for benchmark, n in config["evaluation"]["benchmarks"].items():
        if benchmark in sources or benchmark in NOT_BUNDLED:
            continue
        held = available_after_probe(data_dir, "benchmark", benchmark, probe, seed)
        if n > held:
            raise ConfigError(
                f"config key 'evaluation.benchmarks.{benchmark}': {n} prompts asked, the bundled "
                f"set holds {held} after the probe set's"
            )
    if config["align"]["enabled"]:
        s = AlignmentSetSettings.from_config(config)
        try:
            build_alignment_set(
                data_dir, s.harmful, s.benign, s.lookalike, seed, probe, s.eval_sizes,
                ift_rows_by_source(config),
            )  # fmt: skip
        except DataError as err:
            raise ConfigError(f"config section 'align': {err}") from None


def check_ift_sizes(config: dict, data_dir: Path, probe) -> None:
    """Each domain's training plus held-out rows, and the robustness set's, must fit in what
    their IFT source holds after the probe set's rows."""
    seed = config["seed"]
    wanted = {
        f"domains.{name}": (
            spec["ift_source"],
            spec["ift_examples"] + spec["ift_heldout_examples"],
            f"'domains.{name}.ift_examples' + 'domains.{name}.ift_heldout_examples'",
        )
        for name, spec in config["domains"].items()
    }
    ift = config["robustness"]["ift"]
    if robustness_reads_ift_set(config) or search_reads_ift_set(config):
        wanted["robustness.ift"] = (ift["source"], ift["examples"], "'robustness.ift.examples'")
        check_robustness_set_within_training_rows(config)
    for source, n, keys in wanted.values():
        held = available_after_probe(data_dir, "ift", source, probe, seed)
        if n > held:
            raise ConfigError(
                f"config key(s) {keys} = {n}: the IFT source '{source}' holds {held} rows "
                "after the probe set's"
            )


def check_robustness_set_within_training_rows(config: dict) -> None:
    """The `ift` perturbation trains on the head of its source, so it must stay within the
    training rows of every domain of that source: past them it would train the search on a
    domain's held-out rows, the rows its task metric is measured on."""
    ift = config["robustness"]["ift"]
    for name, spec in config["domains"].items():
        if spec["ift_source"] == ift["source"] and ift["examples"] > spec["ift_examples"]:
            raise ConfigError(
                f"config key 'robustness.ift.examples' = {ift['examples']} is more than "
                f"'domains.{name}.ift_examples' = {spec['ift_examples']}: the robustness "
                f"steps would train on the domain's held-out '{ift['source']}' rows"
            )


def available_after_probe(
    data_dir: Path, role: str, source: str, probe, seed: int
) -> int:  # fmt: skip
    """Rows of a bundled source that the IFT or an evaluation slice can take: those after the
    probe set's head of the seeded shuffle, less any prompt the probe set holds."""
    from securetune.data import (
        BENCHMARKS,
        IFT_SOURCES,
        probe_slice_size,
        shuffled,
        without_probe_prompts,
    )

    loader = IFT_SOURCES[source] if role == "ift" else BENCHMARKS[source].loader
    records = shuffled(loader(data_dir), seed, source)
    head = probe_slice_size(probe, source)
    return len(without_probe_prompts(records[head:], probe))


def check_model_source(source: str, allow_pickle: bool, trust_remote_code: bool) -> str | None:
    """Check a local model source up front; return its model_type (None for a hub id)."""

    kind = source_kind(source)
    if kind in ("tiny", "smollm2-gguf"):
        return "llama"
    if kind == "gguf":
        if not gguf_path(source).is_file():
            raise ConfigError(
                f"config key 'model.source': file '{gguf_path(source)}' does not exist"
            )
        return "llama"
    if kind == "hub" and (Path(source).suffix or source.startswith(("/", "."))):
        raise ConfigError(f"config key 'model.source': folder '{source}' does not exist")
    if kind == "hub":
        return None  # checked once downloaded
    config = check_model_folder(Path(source), allow_pickle, trust_remote_code)
    return str(config["model_type"])


def check_at_start(config: dict, data_dir: Path) -> None:
    """Everything about the inputs that can be checked before the first job."""
    model = config["model"]
    model_type = check_model_source(
        model["source"], model["allow_pickle"], model["trust_remote_code"]
    )
    if model_type is not None:
        check_module_types(model_type, config["robustness"]["module_types"])
    check_domains(config)
    evaluation = config["evaluation"]
    check_data_sources(
        data_dir,
        sorted(ift_rows_by_source(config)),
        list(evaluation["benchmarks"]),
        evaluation.get("sources", {}),
    )
    check_slice_sizes(config, data_dir)
    check_stop_at_refusal(config)
    check_training_layout(config["finetune"])
    for domain in domain_names(config):
        check_training_layout(domain_finetune(config, domain), f"domains.{domain}.finetune")


def check_stop_at_refusal(config: dict) -> None:
    """A completion cut at its refusal is scored alike by the keyword judge, not by the guard or
    the LLM judge: they read the whole completion, so a cut one would change their verdicts."""
    if not config["generation"].get("stop_at_refusal", False):
        return
    evaluation = config["evaluation"]
    for judge in ("guard", "llm_judge"):
        if evaluation.get(judge, {}).get("enabled", False):
            raise ConfigError(
                f"config key 'generation.stop_at_refusal': true cuts completions at their "
                f"refusal, but evaluation.{judge} is enabled and reads the whole completion; "
                "set one of them to false"
            )


def check_training_layout(finetune: dict, section: str = "finetune") -> None:
    """The fine-tuning job's processes, GPUs and batch must fit together: one process per GPU,
    and the global batch split evenly over the processes. `section`: where the batch size was
    set (a domain's own `finetune` values are checked with theirs in)."""
    processes = finetune.get("processes", 1)
    gpus = finetune.get("gpus", 0)
    if gpus not in (0, processes):
        raise ConfigError(
            f"config key 'finetune.gpus': {gpus} must be 0 (train on CPU) or equal to "
            f"finetune.processes ({processes}), one training process per GPU"
        )
    if finetune["batch_size"] % processes:
        raise ConfigError(
            f"config key '{section}.batch_size': {finetune['batch_size']} does not split evenly "
            f"over finetune.processes ({processes})"
        )

"""Checks that turn bad input into a clear error before any expensive job runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from securetune.architectures import UnsupportedArchitecture, architecture
from securetune.config import ConfigError
from securetune.data import DataError

if TYPE_CHECKING:  # transformers is heavy; this module is imported by every Snakemake parse
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelFolderError(ValueError):
    """The model folder cannot be used; the message says what is missing."""


def check_model_folder(
    path: Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> dict:
    """Check a model folder before any expensive work; return its config.json."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder '{path}' does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelFolderError(f"model folder '{path}' has no config.json")
    weights = list(path.glob("*.safetensors"))
    if not weights and not (allow_pickle and list(path.glob("*.bin"))):
        raise ModelFolderError(
            f"model folder '{path}' has no *.safetensors weights"
            + (
                ""
                if allow_pickle
                else " (pickle .bin weights are refused unless model.allow_pickle is true)"
            )
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "<missing>")
    if "auto_map" in config and not trust_remote_code:
        raise ModelFolderError(
            f"model folder '{path}' needs its own Python code (config.json has auto_map); "
            "it is not run unless model.trust_remote_code is true"
        )
    try:
        architecture(model_type)
    except UnsupportedArchitecture as err:
        raise ModelFolderError(f"model folder '{path}': {err}") from err
    tok_config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").exists() or (
        tok_config.exists() and "chat_template" in json.loads(tok_config.read_text())
    )
    if not has_template:
        raise ModelFolderError(
            f"model folder '{path}': the tokenizer has no chat template; every prompt goes "
            "through the model's own template, so give a chat model"
        )
    return config


def check_module_types(model_type: str, module_types: list[str]) -> None:
    """Every configured module type must exist in the model's architecture."""
    _, paths = architecture(model_type)
    missing = [m for m in module_types if m not in paths]
    if missing:
        raise ConfigError(
            f"config key 'robustness.module_types': {missing} not in architecture "
            f"'{model_type}'; allowed: {list(paths)}"
        )


def check_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase,
    tables: dict[str, pd.DataFrame],
    max_prompt_tokens: int,
    context_length: int,
) -> dict[str, int]:
    """Every prompt, chat-templated, must fit `max_prompt_tokens` and the model's context.

    `tables` maps a file name to its table (with `prompt` and an id column). Returns the
    longest prompt per file. A silent truncation would cut off the end of the prompt — the
    part the last-token features and the answer depend on — so this is an error instead.
    """
    from securetune.models import chat_prompt

    limit = min(max_prompt_tokens, context_length)
    longest = {}
    for name, df in tables.items():
        id_column = "prompt_id" if "prompt_id" in df.columns else "example_id"
        lengths = [
            len(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False).input_ids)
            for p in df["prompt"]
        ]
        for row, (length, prompt_id) in enumerate(zip(lengths, df[id_column], strict=True)):
            if length > limit:
                which = (
                    f"data.max_prompt_tokens = {max_prompt_tokens}"
                    if max_prompt_tokens <= context_length
                    else f"the model's context of {context_length} tokens"
                )
                raise DataError(
                    f"data file '{name}', row {row + 1} (prompt id '{prompt_id}'): the prompt "
                    f"has {length} tokens with its chat template, more than {which}"
                )
        longest[name] = max(lengths, default=0)
    return longest


def write_prompt_check(
    tokenizer: PreTrainedTokenizerBase,
    files: list[Path],
    max_prompt_tokens: int,
    context_length: int,
    out: Path,
) -> None:
    from securetune.io import write_json

    tables = {str(f): pd.read_parquet(f) for f in files}
    longest = check_prompt_lengths(tokenizer, tables, max_prompt_tokens, context_length)
    log.info("longest prompt per file (tokens): %s", json.dumps(longest))
    write_json(
        {
            "max_prompt_tokens": max_prompt_tokens,
            "context_length": context_length,
            "longest": longest,
        },
        out,
    )


def check_data_sources(
    data_dir: Path, ift_source: str, benchmarks: list[str], sources: dict[str, str]
) -> None:
    """Load every bundled source the run uses, and every folder given as a benchmark's full set,
    so a broken file fails before any job; a hub source (hf:<id>) is checked for its form here
    and fetched by its own job."""
    from securetune import data
    from securetune.hub_sources import check_hub_source, is_hub_source

    loaders = [data.load_advbench, data.load_xstest_safe, data.load_alpaca]
    loaders.append(data.IFT_SOURCES[ift_source])
    loaders += [data.BENCHMARKS[b][0] for b in benchmarks if b not in sources]
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
            data.BENCHMARKS[benchmark][0](Path(value))


def check_model_source(source: str, allow_pickle: bool, trust_remote_code: bool) -> str | None:
    """Check a local model source up front; return its model_type (None for a hub id)."""
    from securetune.model_sources import gguf_path, source_kind

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
    evaluation = config["evaluation"]
    check_data_sources(
        data_dir,
        config["data"]["ift_source"],
        list(evaluation["benchmarks"]),
        evaluation.get("sources", {}),
    )
    check_training_layout(config["finetune"])


def check_training_layout(finetune: dict) -> None:
    """The fine-tuning job's processes, GPUs and batch must fit together: one process per GPU,
    and the global batch split evenly over the processes."""
    processes = finetune.get("processes", 1)
    gpus = finetune.get("gpus", 0)
    if gpus not in (0, processes):
        raise ConfigError(
            f"config key 'finetune.gpus': {gpus} must be 0 (train on CPU) or equal to "
            f"finetune.processes ({processes}), one training process per GPU"
        )
    if finetune["batch_size"] % processes:
        raise ConfigError(
            f"config key 'finetune.batch_size': {finetune['batch_size']} does not split evenly "
            f"over finetune.processes ({processes})"
        )

"""One function per workflow rule: read the inputs, call the stage's logic, write the outputs.

The scripts in workflow_scripts/ only unpack the `snakemake` object and call these, so every
stage can also be run and tested without Snakemake.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from securetune import data as datasets
from securetune.architectures import parse_module_name
from securetune.config import SearchConfig
from securetune.features import layer_features, tokenize_prompts
from securetune.io import atomic_dir, atomic_path, stable_seed, versions, write_json, write_parquet
from securetune.models import (
    TinyModelSpec,
    build_tiny_model,
    copy_model_folder,
    load_model,
    load_tokenizer,
)
from securetune.probe import LayerProbes, accuracy_table, fit_probes, proxy_layers
from securetune.robustness import check_robustness_table, noise_perturbed, score_module
from securetune.scoring import score_generations
from securetune.search import greedy_search, rank_modules

log = logging.getLogger(__name__)


# --- model and data ------------------------------------------------------------------------------


def build_base_model(
    out_dir: Path, model_cfg: dict[str, Any], text_files: list[Path], seed: int
) -> None:
    with atomic_dir(out_dir) as tmp:
        if model_cfg["source"] == "tiny":
            texts = [row[0] for path in text_files for row in csv.reader(path.open())]
            build_tiny_model(tmp, texts, TinyModelSpec(**model_cfg["tiny"]), seed)
        else:
            source = Path(model_cfg["source"])
            if not source.exists():
                raise FileNotFoundError(
                    f"model.source '{source}' is neither 'tiny' nor an existing folder "
                    "(hub ids need the model downloaded first: huggingface-cli download)"
                )
            copy_model_folder(source, tmp, model_cfg["allow_pickle"])


def resolve_model_source(source: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (weights as safetensors only)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download  # the token comes from HF_TOKEN, never config

    return Path(
        snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]
        )
    )


def prepare_probe_set(
    data_dir: Path, out: Path, per_class: int, test_fraction: float, seed: int
) -> None:
    df = datasets.build_probe_set(data_dir, per_class, test_fraction, seed)
    log.info("probe set: %s", df.groupby(["split", "label"]).size().to_dict())
    write_parquet(df, out)


def prepare_ift_set(
    data_dir: Path, out: Path, source: str, n: int, probe_per_class: int, seed: int
) -> None:
    write_parquet(datasets.build_ift_set(data_dir, source, n, seed, probe_per_class), out)


def prepare_eval_set(
    data_dir: Path,
    probe_set: Path,
    out: Path,
    benchmark: str,
    n: int,
    probe_per_class: int,
    seed: int,
    source: Path | None = None,
) -> None:
    exclude = datasets.probe_prompts(pd.read_parquet(probe_set))
    df = datasets.build_eval_set(data_dir, benchmark, n, seed, probe_per_class, source, exclude)
    write_parquet(df, out)


# --- features, probe, robustness, search ---------------------------------------------------------


def _probe_tokens(
    model_dir: Path, probe_set: Path, split: str, max_prompt_tokens: int
) -> tuple[list[list[int]], torch.Tensor, int]:
    tokenizer = load_tokenizer(model_dir)
    df = pd.read_parquet(probe_set)
    df = df[df["split"] == split]
    ids = tokenize_prompts(tokenizer, list(df["prompt"]), max_prompt_tokens)
    return ids, torch.tensor(df["label"].to_numpy()), tokenizer.pad_token_id


def extract_features(
    model_dir: Path,
    probe_set: Path,
    out: Path,
    pooling: str,
    batch_size: int,
    max_prompt_tokens: int,
    dtype: str,
) -> None:
    model = load_model(model_dir, dtype)
    tensors = {}
    for split in ("train", "test"):
        ids, labels, pad_id = _probe_tokens(model_dir, probe_set, split, max_prompt_tokens)
        tensors[split] = layer_features(model, ids, pad_id, batch_size, pooling).contiguous()
        tensors[f"{split}_labels"] = labels.contiguous()
        log.info("%s features: %s", split, tuple(tensors[split].shape))
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"pooling": pooling, "model": str(model_dir)})


def train_probe(
    features: Path,
    out_probes: Path,
    out_accuracy: Path,
    out_proxy: Path,
    c: float,
    proxy_choice: str | list[int],
    seed: int,
) -> None:
    t = load_file(features)
    probes = fit_probes(t["train"], t["train_labels"], c, seed)
    table = accuracy_table(probes, t["train"], t["train_labels"], t["test"], t["test_labels"])
    table["seed"] = seed
    log.info("probe accuracy per layer:\n%s", table.to_string(index=False))
    layers = proxy_layers(proxy_choice, table, t["train"].shape[0])
    with atomic_path(out_probes) as tmp:
        save_file(
            {k: v.contiguous() for k, v in probes.tensors().items()},
            tmp,
            metadata={"features": str(features), "C": str(c), "seed": str(seed)},
        )
    write_parquet(table, out_accuracy)
    write_json(
        {
            "choice": proxy_choice,
            "layers": layers,
            "test_accuracy": float(table.loc[layers, "test_accuracy"].mean()),
        },
        out_proxy,
    )


def _robustness_context(
    model_dir: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    max_prompt_tokens: int,
    dtype: str,
) -> dict[str, Any]:
    """What every robustness and search job needs: model, test prompts, clean features, probe."""
    layers = json.loads(proxy.read_text())["layers"]
    ids, labels, pad_id = _probe_tokens(model_dir, probe_set, "test", max_prompt_tokens)
    return {
        "model": load_model(model_dir, dtype),
        "token_ids": ids,
        "labels": labels,
        "pad_id": pad_id,
        "clean": load_file(features)["test"][layers],
        "probes": LayerProbes.from_tensors(load_file(probes)),
        "layers": layers,
    }


def score_one_module(
    model_dir: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    out: Path,
    layer: int,
    module: str,
    settings: dict[str, Any],
    feature_cfg: dict[str, Any],
    max_prompt_tokens: int,
    dtype: str,
    source: str,
    seed: int,
) -> None:
    ctx = _robustness_context(
        model_dir, probe_set, features, probes, proxy, max_prompt_tokens, dtype
    )
    df = score_module(
        ctx["model"],
        ctx["token_ids"],
        ctx["labels"],
        ctx["clean"],
        ctx["probes"],
        ctx["layers"],
        layer,
        module,
        settings["alphas"],
        settings["seeds"],
        seed,
        ctx["pad_id"],
        feature_cfg["batch_size"],
        feature_cfg["pooling"],
        settings["score"],
    )
    df["model"] = source
    df["proxy_layers"] = ",".join(map(str, ctx["layers"]))
    write_parquet(df, out)


def aggregate_robustness(parts: list[Path], out: Path) -> None:
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    df = df.sort_values(["layer", "module", "perturbation", "alpha", "seed"]).reset_index(drop=True)
    check_robustness_table(df)
    write_parquet(df, out)


def search_robust_modules(
    model_dir: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    robustness: Path,
    out_plan: Path,
    out_trace: Path,
    cfg: SearchConfig,
    feature_cfg: dict[str, Any],
    score: str,
    max_prompt_tokens: int,
    dtype: str,
    seed: int,
) -> None:
    ctx = _robustness_context(
        model_dir, probe_set, features, probes, proxy, max_prompt_tokens, dtype
    )
    model, layers = ctx["model"], ctx["layers"]

    def jointly_perturbed_accuracy(names: list[str]) -> float:
        modules = [parse_module_name(n) for n in names]
        accs = []
        for s in range(cfg.seeds):
            with noise_perturbed(model, modules, cfg.alpha, stable_seed(seed, "search", s)):
                feats = layer_features(
                    model,
                    ctx["token_ids"],
                    ctx["pad_id"],
                    feature_cfg["batch_size"],
                    feature_cfg["pooling"],
                    layers,
                )
            accs.append(ctx["probes"].accuracy(feats, ctx["labels"], layers).mean().item())
        return float(sum(accs) / len(accs))

    ranked = rank_modules(pd.read_parquet(robustness))
    selected, trace, reason = greedy_search(
        ranked, jointly_perturbed_accuracy, cfg.tau, cfg.max_modules
    )
    log.info("Mods_Robust (%d, stopped by %s): %s", len(selected), reason, selected)
    trace["seed"] = seed
    write_parquet(trace, out_trace)
    write_json(
        {
            "modules": selected,
            "stop_reason": reason,
            "tau": cfg.tau,
            "max_modules": cfg.max_modules,
            "alpha": cfg.alpha,
            "seeds": cfg.seeds,
            "score": score,
            "proxy_layers": layers,
            "ranking": ranked,
            "seed": seed,
            "versions": versions(),
        },
        out_plan,
    )


# --- evaluation ---------------------------------------------------------------------------------


def score(generations: Path, out: Path) -> None:
    scores = score_generations(pd.read_parquet(generations))
    log.info("%s", scores.groupby(["arm", "benchmark"])["success"].mean().to_dict())
    write_parquet(scores, out)

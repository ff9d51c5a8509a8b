"""One function per workflow rule: read the inputs, call the stage's logic, write the outputs.

The scripts in workflow_scripts/ only unpack the `snakemake` object and call these, so every
stage can also be run and tested without Snakemake. The stages that only read and write tables
are in `securetune.table_stages`, which imports no torch.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

from securetune.align import AlignConfig, align_model
from securetune.architectures import parse_module_name
from securetune.config import SearchConfig
from securetune.features import layer_features, tokenize_prompts
from securetune.io import (
    atomic_dir,
    model_revision,
    provenance,
    stable_seed,
    versions,
    write_json,
    write_parquet,
    write_safetensors,
)
from securetune.model_sources import SMOLLM2_WHEEL_SHA256, source_kind
from securetune.models import (
    TinyModelSpec,
    build_tiny_model,
    convert_gguf,
    copy_model_folder,
    extract_gguf,
    load_model,
    load_tokenizer,
    write_model_policy,
)
from securetune.probe import LayerProbes, accuracy_table, fit_probes, proxy_layers
from securetune.robustness import (
    IftSettings,
    ProbeView,
    RobustnessSettings,
    perturbed,
    score_module,
)
from securetune.search import greedy_search, rank_groups, rank_modules

log = logging.getLogger(__name__)


# --- model and data ------------------------------------------------------------------------------


def build_base_model(
    out_dir: Path,
    model_cfg: dict[str, Any],
    text_files: list[Path],
    seed: int,
    gguf: Path | None = None,
) -> None:
    """The base model as a safetensors folder, whatever `model.source` names (see
    `securetune.model_sources`): built (tiny), converted (GGUF, read from `gguf`), checked and
    copied (local folder), or downloaded then checked and copied (hub id)."""
    source = model_cfg["source"]
    kind = source_kind(source)
    with atomic_dir(out_dir) as tmp:
        if kind == "tiny":
            texts = [row[0] for path in text_files for row in csv.reader(path.open())]
            build_tiny_model(tmp, texts, TinyModelSpec(**model_cfg["tiny"]), seed)
        elif kind in ("smollm2-gguf", "gguf"):
            if gguf is None:
                raise ValueError(f"model.source '{source}' needs the GGUF file as an input")
            pinned = SMOLLM2_WHEEL_SHA256 if kind == "smollm2-gguf" else None
            with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
                convert_gguf(extract_gguf(gguf, Path(work), pinned), tmp)
        else:
            copy_model_folder(
                resolve_model_source(source),
                tmp,
                model_cfg["allow_pickle"],
                model_cfg["trust_remote_code"],
            )
        write_model_policy(tmp, model_cfg)


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


def check_prompts(model_dir: Path, files: list[Path], max_prompt_tokens: int, out: Path) -> None:
    """Fail with file, row and prompt id on a prompt too long for the limit or the model."""
    from securetune.checks import write_prompt_check

    config = json.loads((model_dir / "config.json").read_text())
    context = int(config.get("max_position_embeddings", max_prompt_tokens))
    write_prompt_check(load_tokenizer(model_dir), files, max_prompt_tokens, context, out)


# --- features, probe, robustness, search ---------------------------------------------------------


def _probe_tokens(
    model_dir: Path, probe_set: Path, split: str, max_prompt_tokens: int
) -> tuple[list[list[int]], torch.Tensor, int]:
    tokenizer = load_tokenizer(model_dir)
    df = pd.read_parquet(probe_set)
    df = df[df["split"] == split]
    ids = tokenize_prompts(tokenizer, list(df["prompt"]), max_prompt_tokens)
    return ids, torch.tensor(df["label"].to_numpy()), tokenizer.pad_token_id


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def extract_features(
    model_dir: Path,
    probe_set: Path,
    out: Path,
    pooling: str,
    batch_size: int,
    max_prompt_tokens: int,
    dtype: str,
) -> None:
    """Features of every split (train, test, and ood_test when the probe set has one)."""
    model = load_model(model_dir, dtype)
    splits = [
        s for s in ("train", "test", "ood_test") if s in set(pd.read_parquet(probe_set)["split"])
    ]
    tensors = {}
    for split in splits:
        ids, labels, pad_id = _probe_tokens(model_dir, probe_set, split, max_prompt_tokens)
        tensors[split] = layer_features(model, ids, pad_id, batch_size, pooling).contiguous()
        tensors[f"{split}_labels"] = labels.contiguous()
        log.info("%s features: %s", split, tuple(tensors[split].shape))
    metadata = {
        "pooling": pooling,
        "model": str(model_dir),
        "probe_set": str(probe_set),
        "probe_set_sha256": _sha256(probe_set),
        "splits": ",".join(splits),
        "model_revision": model_revision(model_dir),
        "versions": json.dumps(versions(), sort_keys=True),
    }
    write_safetensors(tensors, out, metadata)


def train_probe(
    features: Path,
    out_probes: Path,
    out_accuracy: Path,
    out_proxy: Path,
    c: float,
    proxy_choice: str | list[int],
    seed: int,
) -> None:
    """Per-layer probes; accuracy in-domain and out-of-domain per layer; the proxy layers.

    The probe file's metadata records its features' provenance (file hash, model, pooling,
    probe set hash), so a probe can never be silently paired with other features.
    """
    from safetensors import safe_open

    t = load_file(features)
    with safe_open(features, "pt") as f:
        feature_meta = f.metadata() or {}
    probes = fit_probes(t["train"], t["train_labels"], c, seed)
    ood = (t["ood_test"], t["ood_test_labels"]) if "ood_test" in t else None
    table = accuracy_table(probes, t["train"], t["train_labels"], t["test"], t["test_labels"], ood)
    table["seed"] = seed
    log.info("probe accuracy per layer:\n%s", table.to_string(index=False))
    layers = proxy_layers(proxy_choice, table, t["train"].shape[0])
    probe_provenance = {
        "features": str(features),
        "features_sha256": _sha256(features),
        **{f"features_{k}": v for k, v in feature_meta.items()},
        "C": str(c),
        "seed": str(seed),
    }
    write_safetensors(
        {k: v.contiguous() for k, v in probes.tensors().items()}, out_probes, probe_provenance
    )
    write_parquet(table, out_accuracy, provenance(seed, feature_meta.get("model")))
    write_json(
        {
            "choice": proxy_choice,
            "layers": layers,
            "test_accuracy": float(table.loc[layers, "test_accuracy"].mean()),
            "ood_accuracy": (
                float(table.loc[layers, "ood_accuracy"].mean()) if ood is not None else None
            ),
            "provenance": probe_provenance,
        },
        out_proxy,
    )


def _probe_view(
    model_dir: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    feature_cfg: dict[str, Any],
    max_prompt_tokens: int,
    dtype: str,
) -> ProbeView:
    """What every robustness and search job needs: model, test prompts, clean features, probe."""
    layers = json.loads(proxy.read_text())["layers"]
    ids, labels, pad_id = _probe_tokens(model_dir, probe_set, "test", max_prompt_tokens)
    return ProbeView(
        model=load_model(model_dir, dtype),
        token_ids=ids,
        labels=labels,
        pad_id=pad_id,
        clean=load_file(features)["test"][layers],
        probes=LayerProbes.from_tensors(load_file(probes)),
        layers=layers,
        batch_size=feature_cfg["batch_size"],
        pooling=feature_cfg["pooling"],
    )


def _ift_examples(
    model_dir: Path, ift_set: Path, ift: IftSettings
) -> list[tuple[list[int], list[int]]]:
    """The first `ift.examples` rows of the IFT set, encoded with loss on the response only."""
    from securetune.finetune import encode_examples

    df = pd.read_parquet(ift_set)
    if ift.examples > len(df):
        raise ValueError(
            f"robustness.ift.examples = {ift.examples} is more than the IFT set has "
            f"(data.ift_examples = {len(df)})"
        )
    df = df.iloc[: ift.examples]
    tokenizer = load_tokenizer(model_dir)
    return encode_examples(tokenizer, list(df["prompt"]), list(df["response"]), ift.max_seq_len)


def score_modules(
    model_dir: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    ift_set: Path,
    outs: list[Path],
    modules: list[str],
    settings: dict[str, Any],
    feature_cfg: dict[str, Any],
    max_prompt_tokens: int,
    dtype: str,
    source: str,
    seed: int,
) -> None:
    """Score each module (`L3.q` names) alone and write its table to the matching `outs` path.

    The model, prompts and probe are loaded once; with `cached_prefix` the unperturbed model runs
    once and each perturbation recomputes only the layers from the module's own up.
    """
    if len(outs) != len(modules):
        raise ValueError(f"{len(modules)} modules but {len(outs)} output paths")
    cfg = RobustnessSettings.from_config(settings)
    view = _probe_view(
        model_dir, probe_set, features, probes, proxy, feature_cfg, max_prompt_tokens, dtype
    )
    parsed = [parse_module_name(m) for m in modules]
    if cfg.cached_prefix:
        view.cache_layers(sorted({layer for layer, _ in parsed}))
    examples = _ift_examples(model_dir, ift_set, cfg.ift) if "ift" in cfg.perturbations else None
    for (layer, module), out in zip(parsed, outs, strict=True):
        df = score_module(view, layer, module, cfg, seed, examples)
        df["score_name"] = cfg.score
        df["model"] = source
        df["proxy_layers"] = ",".join(map(str, view.layers))
        write_parquet(df, out, provenance(seed, model_dir))


def search_robust_modules(
    model_dir: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    robustness: Path,
    ift_set: Path,
    out_plan: Path,
    out_trace: Path,
    cfg: SearchConfig,
    robustness_cfg: dict[str, Any],
    feature_cfg: dict[str, Any],
    max_prompt_tokens: int,
    dtype: str,
    seed: int,
) -> None:
    """Greedy search over modules or groups; each candidate set perturbed jointly, `cfg.seeds`
    times, and scored by the mean proxy-layer probe accuracy."""
    rcfg = RobustnessSettings.from_config(robustness_cfg)
    view = _probe_view(
        model_dir, probe_set, features, probes, proxy, feature_cfg, max_prompt_tokens, dtype
    )
    if rcfg.cached_prefix:
        view.cache_layers(list(range(view.model.config.num_hidden_layers)))
    examples = _ift_examples(model_dir, ift_set, rcfg.ift) if cfg.perturbation == "ift" else None

    def jointly_perturbed_accuracy(names: list[str]) -> float:
        if not names:
            return view.accuracy(view.clean)
        modules = [parse_module_name(n) for n in names]
        lowest = min(layer for layer, _ in modules)
        accs = []
        for s in range(cfg.seeds):
            with perturbed(
                view,
                modules,
                cfg.perturbation,
                alpha=cfg.alpha,
                seed=stable_seed(seed, "search", cfg.perturbation, s),
                ift=rcfg.ift,
                ift_examples=examples,
            ):
                accs.append(view.accuracy(view.features(lowest)))
        return float(sum(accs) / len(accs))

    table = pd.read_parquet(robustness)
    if cfg.unit == "group":
        ranked, members = rank_groups(table, cfg.band_width)
    else:
        ranked, members = rank_modules(table), None
    selected, trace, reason = greedy_search(
        ranked, jointly_perturbed_accuracy, cfg.tau, cfg.max_modules, members
    )
    log.info("Mods_Robust (%d, stopped by %s): %s", len(selected), reason, selected)
    trace["seed"] = seed
    trace["unit"] = cfg.unit
    trace["perturbation"] = cfg.perturbation
    trace["tau"] = cfg.tau
    write_parquet(trace, out_trace, provenance(seed, model_dir))
    accepted = trace.loc[trace["accepted"] & (trace["step"] > 0), "added"].tolist()
    write_json(
        {
            "modules": selected,
            "groups": accepted if cfg.unit == "group" else None,
            "stop_reason": reason,
            "tau": cfg.tau,
            "max_modules": cfg.max_modules,
            "unit": cfg.unit,
            "band_width": cfg.band_width if cfg.unit == "group" else None,
            "perturbation": cfg.perturbation,
            "alpha": cfg.alpha if cfg.perturbation == "noise" else None,
            "ift": asdict(rcfg.ift) if cfg.perturbation == "ift" else None,
            "seeds": cfg.seeds,
            "score": rcfg.score,
            "score_weights": rcfg.score_weights if rcfg.score == "combined" else None,
            "proxy_layers": view.layers,
            "ranking": ranked,
            "seed": seed,
            "versions": versions(),
            "model_revision": model_revision(model_dir),
        },
        out_plan,
    )


# --- evaluation ---------------------------------------------------------------------------------


def heldout_ift_loss(
    model_dir: Path,
    heldout: Path,
    out: Path,
    arm: str,
    max_seq_len: int,
    batch_size: int,
    seed: int,
) -> None:
    """Each held-out IFT example's mean loss per response token under the arm's model: the task
    metric at demo scale, where GSM8K accuracy of a 135M model sits near the floor."""
    from securetune.finetune import encode_examples, example_losses

    df = pd.read_parquet(heldout)
    tokenizer = load_tokenizer(model_dir)
    # float32: arms differ in the second decimal of this loss; bfloat16 rounding is not far off.
    model = load_model(model_dir, "float32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    examples = encode_examples(tokenizer, list(df["prompt"]), list(df["response"]), max_seq_len)
    losses = example_losses(model, examples, tokenizer.pad_token_id, batch_size)
    if any(tokens == 0 for _, tokens in losses):
        raise ValueError(
            f"{heldout}: an example has no response token left within max_seq_len {max_seq_len}"
        )
    table = pd.DataFrame(
        {
            "example_id": df["example_id"],
            "arm": arm,
            "benchmark": "ift_heldout",
            "kind": "ift_heldout",
            "loss": [total / tokens for total, tokens in losses],
            "tokens": [tokens for _, tokens in losses],
        }
    )
    log.info("%s: held-out IFT loss %.4f over %d examples", arm, table["loss"].mean(), len(table))
    write_parquet(table, out, provenance(seed, model_dir))


# --- safety alignment of the demo base (config `align`) -----------------------------------------


def align_base_model(
    model_dir: Path,
    data: Path,
    out_model: Path,
    out_log: Path,
    out_examples: Path,
    align_cfg: dict[str, Any],
    seed: int,
    dtype: str,
) -> None:
    # Keys the section may leave out (micro_batch_size) take AlignConfig's default.
    recipe = {k: align_cfg[k] for k in AlignConfig.__dataclass_fields__ if k in align_cfg}
    cfg = AlignConfig(**recipe, seed=stable_seed(seed, "align"), lookalike_dtype=dtype)
    steps, examples = align_model(model_dir, pd.read_parquet(data), cfg, out_model)
    write_parquet(steps, out_log, provenance(cfg.seed, model_dir))
    write_parquet(examples, out_examples, provenance(cfg.seed, model_dir))

"""Stage `attribute_modules`: Wei et al. 2024's safety attribution, aggregated per module.

Wei et al. ("Assessing the brittleness of safety alignment via pruning and low-rank
modifications", ICML 2024) score each weight by SNIP importance, |W * dL/dW|, once on safety
data (harmful prompts answered with refusals) and once on utility data, and call a weight
safety-critical when it is in the top p share of safety importance and not in the top q share
of utility importance (the set difference). Here the shares are taken within each module's
weight matrix, as they rank within each layer, and a module's score is the safety importance
its safety-critical weights carry per weight of the module: comparable across module types of
different sizes. The `attribution` selector trains the modules of lowest score at lr.

Safety data: the harmful prompts of the probe's training split, each answered with one of the
alignment's refusals. Utility data: the robustness IFT set (the fine-tuning task's rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from securetune.architectures import MODULE_TYPES, module_name, module_path
from securetune.data import REFUSALS
from securetune.finetune.loss import device_batch, summed_loss
from securetune.finetune.sft_data import Example, encode_examples, predicted_tokens
from securetune.io import batches_by_length, provenance, stable_seed, write_parquet
from securetune.models import load_model, load_tokenizer, model_device
from securetune.progress import Progress
from securetune.settings import AttributionSettings

log = logging.getLogger(__name__)


def snip_importance(
    model: torch.nn.Module, weights: dict[str, torch.nn.Parameter], examples: list[Example],
    pad_id: int, batch_size: int, what: str,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """|W * dL/dW| of each named weight, L the mean response-token loss over `examples`."""
    model.zero_grad(set_to_none=True)
    tokens = sum(predicted_tokens(e) for e in examples)
    device = model_device(model)
    progress = Progress(f"{what} gradients", len(examples), log, unit="examples")
    by_length = batches_by_length(range(len(examples)), lambda i: len(examples[i][0]), batch_size)
    for indices in by_length:
        batch = device_batch([examples[i] for i in indices], pad_id, device)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=batch["positions"],
        ).logits
        (summed_loss(logits, batch["targets"]) / tokens).backward()
        progress.update(len(indices))
    return {name: (w.detach() * w.grad).abs().float().cpu() for name, w in weights.items()}


def top_share_mask(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The weights in the top `share` of `scores` (at least one weight; none for share 0)."""
    if share == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.flatten()
    k = max(1, round(share * flat.numel()))
    threshold = torch.topk(flat, k).values[-1]
    return scores >= threshold


def module_attribution(
    safety: torch.Tensor, utility: torch.Tensor, p: float, q: float
) -> dict[str, float]:
    """One module's row: the share of its weights that are safety-critical (top p of safety,
    not top q of utility), the safety importance they carry per weight of the module, and the
    mean importances."""
    critical = top_share_mask(safety, p) & ~top_share_mask(utility, q)
    n = safety.numel()
    return {
        "params": n,
        "safety_critical_share": float(critical.sum()) / n,
        "safety_critical_importance": float(safety[critical].sum()) / n,
        "safety_importance": float(safety.mean()),
        "utility_importance": float(utility.mean()),
    }


def safety_examples(tokenizer, probe_set: Path, max_seq_len: int, seed: int) -> list[Example]:
    """The probe's harmful training prompts, each with a refusal drawn by a seed of its id."""
    df = pd.read_parquet(probe_set)
    df = df[(df["split"] == "train") & (df["label"] == 1)]
    refusals = [
        REFUSALS[np.random.default_rng(stable_seed(seed, "attribution", i)).integers(len(REFUSALS))]
        for i in df["prompt_id"]
    ]
    return encode_examples(tokenizer, list(df["prompt"]), refusals, max_seq_len)


def attribute_modules(
    *, model: Path, probe_set: Path, utility_set: Path, out: Path, settings: AttributionSettings
) -> None:
    """Stage `attribute_modules`: one row per (layer, module type) with its attribution."""
    tokenizer = load_tokenizer(model)
    network = load_model(model, "float32")  # gradients of importance scores, not of training
    rows = pd.read_parquet(utility_set)
    utility = encode_examples(
        tokenizer, list(rows["prompt"]), list(rows["response"]), settings.max_seq_len
    )
    safety = safety_examples(tokenizer, probe_set, settings.max_seq_len, settings.seed)
    model_type = network.config.model_type
    names = {
        module_name(layer, m): module_path(model_type, layer, m) + ".weight"
        for layer in range(network.config.num_hidden_layers)
        for m in MODULE_TYPES
    }
    params = dict(network.named_parameters())
    weights = {short: params[full] for short, full in names.items()}
    pad = tokenizer.pad_token_id
    scores = {
        what: snip_importance(network, weights, data, pad, settings.batch_size, what)
        for what, data in (("safety", safety), ("utility", utility))
    }
    rows = [
        {"layer": layer, "module": m, "module_name": module_name(layer, m),
         **module_attribution(scores["safety"][module_name(layer, m)],
                              scores["utility"][module_name(layer, m)], settings.p, settings.q)}
        for layer in range(network.config.num_hidden_layers)
        for m in MODULE_TYPES
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    table["safety_examples"], table["utility_examples"] = len(safety), len(utility)
    table["p"], table["q"] = settings.p, settings.q
    write_parquet(table, out, provenance(settings.seed, model))

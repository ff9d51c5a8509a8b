"""Stage 4: how much the probe's view of harmfulness moves when one module alone is changed.

A robust module is one whose perturbation leaves the frozen probe's accuracy (the security
features) nearly intact. Every metric is kept; `score` is the one the search ranks by.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from transformers import PreTrainedModel

from securetune.architectures import module_name, module_path
from securetune.features import layer_features
from securetune.io import stable_seed
from securetune.probe import LayerProbes

log = logging.getLogger(__name__)

METRICS = ("acc_drop", "cosine_drift", "direction_shift")


def _linear(model: PreTrainedModel, layer: int, module: str) -> torch.nn.Linear:
    return model.get_submodule(module_path(model.config.model_type, layer, module))


@contextmanager
def noise_perturbed(
    model: PreTrainedModel, modules: list[tuple[int, str]], alpha: float, seed: int
) -> Iterator[None]:
    """W <- W + alpha * std(W) * N(0, I) on each module, restored on exit.

    Scaling by std(W) makes alpha comparable across modules of different size and init scale.
    """
    saved = []
    with torch.no_grad():
        for layer, module in modules:
            weight = _linear(model, layer, module).weight
            saved.append((weight, weight.detach().clone()))
            gen = torch.Generator().manual_seed(stable_seed(seed, module_name(layer, module)))
            noise = torch.randn(weight.shape, generator=gen, dtype=torch.float32)
            weight.add_((alpha * weight.float().std() * noise).to(weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def harmful_direction(clean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit harmful-minus-benign mean direction per layer, [P, H]."""
    diff = clean[:, labels == 1].mean(dim=1) - clean[:, labels == 0].mean(dim=1)
    return diff / diff.norm(dim=1, keepdim=True).clamp_min(1e-12)


def drift_metrics(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    labels: torch.Tensor,
    probes: LayerProbes,
    layers: list[int],
) -> dict[str, float]:
    """Probe accuracy before/after, cosine drift and projection shift, averaged over `layers`.

    `clean` and `perturbed` are features [len(layers), N, H] at the proxy layers.
    """
    acc_before = probes.accuracy(clean, labels, layers).mean().item()
    acc_after = probes.accuracy(perturbed, labels, layers).mean().item()
    cosine = torch.nn.functional.cosine_similarity(clean, perturbed, dim=-1)
    direction = harmful_direction(clean, labels)
    proj_clean = torch.einsum("lnh,lh->ln", clean, direction)
    proj_shift = torch.einsum("lnh,lh->ln", perturbed - clean, direction).abs()
    # In units of the clean projections' spread, so layers of different norm are comparable.
    spread = proj_clean.std(dim=1, keepdim=True).clamp_min(1e-12)
    return {
        "acc_before": acc_before,
        "acc_after": acc_after,
        "acc_drop": acc_before - acc_after,
        "cosine_drift": (1.0 - cosine).mean().item(),
        "direction_shift": (proj_shift / spread).mean().item(),
    }


def score_module(
    model: PreTrainedModel,
    token_ids: list[list[int]],
    labels: torch.Tensor,
    clean: torch.Tensor,
    probes: LayerProbes,
    layers: list[int],
    layer: int,
    module: str,
    alphas: list[float],
    n_seeds: int,
    base_seed: int,
    pad_id: int,
    batch_size: int,
    pooling: str,
    score: str,
) -> pd.DataFrame:
    """One row per (alpha, seed) for the perturbation of module (layer, module) alone."""
    rows = []
    for alpha in alphas:
        for s in range(n_seeds):
            seed = stable_seed(base_seed, "noise", layer, module, alpha, s)
            with noise_perturbed(model, [(layer, module)], alpha, seed):
                perturbed = layer_features(model, token_ids, pad_id, batch_size, pooling, layers)
            metrics = drift_metrics(clean, perturbed, labels, probes, layers)
            rows.append(
                {
                    "layer": layer,
                    "module": module,
                    "perturbation": "noise",
                    "alpha": float(alpha),
                    "seed": seed,
                    **metrics,
                    "score": metrics[score],
                }
            )
            log.info("L%d.%s alpha=%g seed=%d: %s", layer, module, alpha, seed, metrics)
    return pd.DataFrame(rows)


ROBUSTNESS_COLUMNS = {
    "layer": "int64",
    "module": "object",
    "perturbation": "object",
    "alpha": "float64",
    "seed": "int64",
    "acc_before": "float64",
    "acc_after": "float64",
    "acc_drop": "float64",
    "cosine_drift": "float64",
    "direction_shift": "float64",
    "score": "float64",
    "model": "object",
    "proxy_layers": "object",
}


def check_robustness_table(df: pd.DataFrame) -> None:
    """Raise if the aggregated table lacks a column or has a wrong dtype."""
    for column, dtype in ROBUSTNESS_COLUMNS.items():
        if column not in df.columns:
            raise ValueError(f"robustness table: missing column '{column}'")
        if str(df[column].dtype) != dtype and not (
            dtype == "object" and str(df[column].dtype) in ("str", "string")
        ):
            raise ValueError(
                f"robustness table: column '{column}' is {df[column].dtype}, expected {dtype}"
            )
    if df.duplicated(["layer", "module", "perturbation", "alpha", "seed"]).any():
        raise ValueError("robustness table: duplicate (layer, module, perturbation, alpha, seed)")

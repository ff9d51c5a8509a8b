"""Stage 3: the security feature classifier, a logistic-regression probe per layer.

The fitted probe is stored as plain arrays (scaler mean and scale, coefficients, intercept) in
safetensors, so scoring a perturbed model needs no pickle and no scikit-learn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from securetune.io import provenance, sha256_of, write_json, write_parquet, write_safetensors
from securetune.settings import ProbeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerProbes:
    """Standardise-then-linear probes for every layer: arrays of shape [L, H] and [L]."""

    mean: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor

    def logits(self, features: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
        """Logits [len(layers), N] for features [len(layers), N, H]."""
        idx = slice(None) if layers is None else layers
        z = (features - self.mean[idx, None]) / self.scale[idx, None]
        return torch.einsum("lnh,lh->ln", z, self.coef[idx]) + self.intercept[idx, None]

    def accuracy(
        self, features: torch.Tensor, labels: torch.Tensor, layers: list[int] | None = None
    ) -> torch.Tensor:
        """Accuracy per layer, shape [len(layers)]."""
        pred = (self.logits(features, layers) > 0).long()
        return (pred == labels[None]).float().mean(dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": self.intercept,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LayerProbes:
        return cls(t["mean"], t["scale"], t["coef"], t["intercept"])


def fit_probes(
    train: torch.Tensor, y_train: torch.Tensor, c: float, seed: int, max_iter: int = 2000
) -> LayerProbes:
    """Fit one standardised L2 logistic regression per layer on features [L, N, H]."""
    means, scales, coefs, intercepts = [], [], [], []
    y = y_train.numpy()
    for layer in range(train.shape[0]):
        x = train[layer].double().numpy()
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        clf.fit(scaler.transform(x), y)
        means.append(scaler.mean_)
        scales.append(np.where(scaler.scale_ > 0, scaler.scale_, 1.0))
        coefs.append(clf.coef_[0])
        intercepts.append(clf.intercept_[0])

    def as_tensor(arrays: list) -> torch.Tensor:
        return torch.tensor(np.stack(arrays), dtype=torch.float32)

    return LayerProbes(
        as_tensor(means),
        as_tensor(scales),
        as_tensor(coefs),
        torch.tensor(intercepts, dtype=torch.float32),
    )


def accuracy_table(
    probes: LayerProbes,
    train: torch.Tensor,
    y_train: torch.Tensor,
    test: torch.Tensor,
    y_test: torch.Tensor,
    ood: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """One row per layer: train, held-out (in-domain) and out-of-domain accuracy.

    In-domain test accuracy is near 100% at most layers and proves little on its own; the
    out-of-domain accuracy (sources never trained on) says whether the probe learned
    harmfulness or the training sources' phrasing. NaN when there is no out-of-domain split.
    """
    table = pd.DataFrame(
        {
            "layer": np.arange(train.shape[0]),
            "train_accuracy": probes.accuracy(train, y_train).numpy().astype(float),
            "test_accuracy": probes.accuracy(test, y_test).numpy().astype(float),
            "ood_accuracy": np.nan,
            "n_train": len(y_train),
            "n_test": len(y_test),
            "n_ood": 0,
        }
    )
    if ood is not None:
        table["ood_accuracy"] = probes.accuracy(*ood).numpy().astype(float)
        table["n_ood"] = len(ood[1])
    return table


def proxy_layers(choice: str | list[int], table: pd.DataFrame, n_layers: int) -> list[int]:
    """Resolve `probe.proxy_layers`: 'best' (highest held-out accuracy, earliest on ties),
    'last', 'all', or an explicit list of layer indices."""
    if isinstance(choice, list):
        bad = [layer for layer in choice if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"probe.proxy_layers: layer(s) {bad} outside 0..{n_layers - 1}")
        return sorted(choice)
    if choice == "all":
        return list(range(n_layers))
    if choice == "last":
        return [n_layers - 1]
    if choice == "best":
        return [
            int(
                table.sort_values(["test_accuracy", "layer"], ascending=[False, True]).iloc[0][
                    "layer"
                ]
            )
        ]
    raise ValueError(f"probe.proxy_layers: '{choice}' is not one of best, last, all or a list")


# --- the stage ------------------------------------------------------------------------------------


def train_probe(
    *,
    features: Path,
    out_probes: Path,
    out_accuracy: Path,
    out_proxy: Path,
    settings: ProbeSettings,
) -> None:
    """Stage `train_probe`: per-layer probes, their accuracy in-domain and out-of-domain per
    layer, and the proxy layers.

    The probe file's metadata records its features' provenance (file hash, model, pooling,
    probe set hash), so a probe can never be silently paired with other features.
    """
    t = load_file(features)
    with safe_open(features, "pt") as f:
        feature_meta = f.metadata() or {}
    probes = fit_probes(t["train"], t["train_labels"], settings.C, settings.seed)
    ood = (t["ood_test"], t["ood_test_labels"]) if "ood_test" in t else None
    table = accuracy_table(probes, t["train"], t["train_labels"], t["test"], t["test_labels"], ood)
    table["seed"] = settings.seed
    log.info("probe accuracy per layer:\n%s", table.to_string(index=False))
    layers = proxy_layers(settings.proxy_layers, table, t["train"].shape[0])
    probe_provenance = {
        "features": str(features),
        "features_sha256": sha256_of(features),
        **{f"features_{k}": v for k, v in feature_meta.items()},
        "C": str(settings.C),
        "seed": str(settings.seed),
    }
    write_safetensors(
        {k: v.contiguous() for k, v in probes.tensors().items()}, out_probes, probe_provenance
    )
    write_parquet(table, out_accuracy, provenance(settings.seed, feature_meta.get("model")))
    write_json(
        {
            "choice": settings.proxy_layers,
            "layers": layers,
            "test_accuracy": float(table.loc[layers, "test_accuracy"].mean()),
            "ood_accuracy": (
                float(table.loc[layers, "ood_accuracy"].mean()) if ood is not None else None
            ),
            "provenance": probe_provenance,
        },
        out_proxy,
    )

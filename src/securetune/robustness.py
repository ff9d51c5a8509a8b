"""Stage 4: how much the probe's view of harmfulness moves when one module alone is changed.

A robust module is one whose perturbation leaves the frozen probe's accuracy (the security
features) nearly intact. Two perturbations, both recorded in the table's `perturbation` column:

- `noise`: W <- W + alpha * std(W) * N(0, I), several alphas and seeds;
- `ift`: a few AdamW steps of benign instruction tuning that update only the module(s), i.e. the
  drift that fine-tuning itself would cause there.

Every metric is kept; `score` is the one the search ranks by. The perturbed features are
recomputed from the perturbed module's layer up only (`features.features_from_layer`), which is
exact and about halves the work.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from securetune.architectures import module_name, module_path, parse_module_name
from securetune.features import (
    PrefixCache,
    build_prefix_cache,
    features_from_layer,
    layer_features,
    probe_tokens,
)
from securetune.finetune.sft_data import IGNORE, Example, batch_order, collate, encode_examples
from securetune.io import provenance, stable_seed, write_parquet
from securetune.models import load_model, load_tokenizer, model_device
from securetune.probe import LayerProbes
from securetune.progress import Progress
from securetune.robustness_table import METRICS, PERTURBATIONS
from securetune.settings import FeatureSettings, IftSettings, RobustnessSettings

log = logging.getLogger(__name__)


def combined_score(metrics: dict[str, float], score: str, weights: dict[str, float]) -> float:
    """The ranking score: one metric by name, or `combined` = sum of weights[m] * metric m."""
    if score in METRICS:
        return metrics[score]
    if score == "combined":
        # A metric of weight 0 is left out, so a table's NaN in it cannot spoil the score.
        return float(sum(weights[m] * metrics[m] for m in METRICS if weights.get(m, 0.0)))
    raise ValueError(f"robustness.score: '{score}' is not one of {[*METRICS, 'combined']}")


def _linear(model: PreTrainedModel, layer: int, module: str) -> torch.nn.Linear:
    return model.get_submodule(module_path(model.config.model_type, layer, module))


def linear_weight(model: PreTrainedModel, layer: int, module: str) -> torch.nn.Parameter:
    """The weight matrix of one module (layer, type)."""
    return _linear(model, layer, module).weight


def _weights(model: PreTrainedModel, modules: list[tuple[int, str]]) -> list[torch.nn.Parameter]:
    return [linear_weight(model, layer, module) for layer, module in modules]


@contextmanager
def _restored(weights: list[torch.nn.Parameter]) -> Iterator[list[torch.Tensor]]:
    """Yield copies of the weights; put them back on exit, whatever happened inside."""
    originals = [w.detach().clone() for w in weights]
    try:
        yield originals
    finally:
        with torch.no_grad():
            for weight, original in zip(weights, originals, strict=True):
                weight.copy_(original)


def relative_change(weights: list[torch.nn.Parameter], originals: list[torch.Tensor]) -> float:
    """||W' - W|| / ||W|| over all the modules' weights: how far a perturbation moved them."""
    diff = sum(
        ((w.detach() - o).float() ** 2).sum().item()
        for w, o in zip(weights, originals, strict=True)
    )
    norm = sum((o.float() ** 2).sum().item() for o in originals)
    return math.sqrt(diff / max(norm, 1e-30))


@contextmanager
def noise_perturbed(
    model: PreTrainedModel, modules: list[tuple[int, str]], alpha: float, seed: int
) -> Iterator[dict[str, float]]:
    """W <- W + alpha * std(W) * N(0, I) on each module, restored on exit.

    Scaling by std(W) makes alpha comparable across modules of different size and init scale.
    Yields {"weight_change": ||dW|| / ||W||}, the value filled in when the block exits.
    """
    weights = _weights(model, modules)
    with _restored(weights) as originals:
        with torch.no_grad():
            for weight, (layer, module) in zip(weights, modules, strict=True):
                gen = torch.Generator().manual_seed(stable_seed(seed, module_name(layer, module)))
                # Drawn on the CPU, so a seed gives the same noise on every device.
                noise = torch.randn(weight.shape, generator=gen, dtype=torch.float32)
                noise = noise.to(weight.device)
                weight.add_((alpha * weight.float().std() * noise).to(weight.dtype))
        # Filled in once the caller's block is done, before the weights are restored: reading
        # the change waits for the device, which should happen after the forward, not before.
        info: dict[str, float] = {}
        yield info
        info["weight_change"] = relative_change(weights, originals)


@contextmanager
def ift_perturbed(
    model: PreTrainedModel,
    modules: list[tuple[int, str]],
    batches: list[dict[str, torch.Tensor]],
    lr: float,
) -> Iterator[dict[str, float]]:
    """One AdamW step per batch of benign IFT (loss on response tokens), updating only the
    modules' weights; every other parameter is frozen and bit-identical. Restored on exit.

    Yields {"weight_change": ||dW|| / ||W||, "ift_loss": mean training loss of the steps}, the
    weight change filled in when the block exits.
    """
    weights = _weights(model, modules)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with _restored(weights) as originals:
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            # No weight decay: the drift should be what the data's gradient causes, nothing else.
            optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
            losses = []
            device = model_device(model)
            with torch.enable_grad():
                for batch in batches:
                    on_device = {key: tensor.to(device) for key, tensor in batch.items()}
                    loss = model(**on_device, use_cache=False).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
            for w in weights:
                w.grad = None
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
        info = {"ift_loss": float(sum(losses) / len(losses))}
        yield info
        info["weight_change"] = relative_change(weights, originals)


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
    """Probe accuracy before/after, cosine drift, projection shift and margin drop, averaged
    over `layers`.

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
        "margin_drop": (
            true_class_margin(clean, labels, probes, layers)
            - true_class_margin(perturbed, labels, probes, layers)
        )
        .mean()
        .item(),
    }


def reached_positions(layers: list[int], lowest_layer: int, reach: str) -> list[int]:
    """Positions in `layers` (the proxy layers) of the probes a change at `lowest_layer` and
    above can move: those at that layer or higher (a layer's feature is its output), or every
    one with reach `all`. A module never moves the probes below it, so averaging its drift over
    all of them dilutes a low module's drift less than a high one's: the depth bias."""
    if reach == "all":
        return list(range(len(layers)))
    return [i for i, layer in enumerate(layers) if layer >= lowest_layer]


NAN_METRICS = dict.fromkeys(
    ["acc_before", "acc_after", "acc_drop", "cosine_drift", "direction_shift", "margin_drop"],
    math.nan,
)


def reached_drift_metrics(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    labels: torch.Tensor,
    probes: LayerProbes,
    layers: list[int],
    positions: list[int],
) -> dict[str, float]:
    """`drift_metrics` over the proxy layers at `positions`; NaN where none is reached (the
    change cannot move the proxy at all, which is not robustness: the ranking puts it last)."""
    if not positions:
        return dict(NAN_METRICS)
    return drift_metrics(
        clean[positions], perturbed[positions], labels, probes, [layers[i] for i in positions]
    )


def true_class_margin(
    features: torch.Tensor, labels: torch.Tensor, probes: LayerProbes, layers: list[int]
) -> torch.Tensor:
    """The probe's log-odds toward each prompt's true class, [len(layers), N]: a continuous
    accuracy, so a perturbation that weakens every prediction without flipping one still
    shows (acc_drop moves only in steps of one prompt)."""
    sign = labels[None].float() * 2 - 1
    return probes.logits(features, layers) * sign


def half_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of the test prompts, each class alternated between them, so both
    halves hold both classes (the harmful direction needs both) whatever the prompts' order."""
    half = torch.zeros_like(labels, dtype=torch.bool)
    for value in labels.unique():
        where = (labels == value).nonzero().flatten()
        half[where[1::2]] = True
    return ~half, half


def half_scores(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    labels: torch.Tensor,
    probes: LayerProbes,
    layers: list[int],
    settings: RobustnessSettings,
    positions: list[int],
) -> dict[str, float]:
    """The score on each half of the test prompts: two estimates from disjoint prompts, whose
    rank agreement over modules says how much the ranking owes to the particular prompts (and
    `search.probe_split: halves` ranks by the first and checks sets on the second)."""
    scores = {}
    for i, mask in enumerate(half_masks(labels)):
        metrics = reached_drift_metrics(
            clean[:, mask], perturbed[:, mask], labels[mask], probes, layers, positions
        )
        scores[f"score_half{i}"] = combined_score(metrics, settings.score, settings.score_weights)
    return scores


@dataclass
class ProbeView:
    """The frozen probe's test prompts and clean features: what scoring a perturbation needs."""

    model: PreTrainedModel
    token_ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int
    clean: torch.Tensor  # [len(layers), N, H] unperturbed features at the proxy layers
    probes: LayerProbes
    layers: list[int]
    batch_size: int
    pooling: str
    cache: PrefixCache | None = None

    def cache_layers(self, start_layers: list[int]) -> None:
        """Run the unperturbed model once and keep the states entering `start_layers`."""
        self.cache = build_prefix_cache(
            self.model, self.token_ids, self.pad_id, self.batch_size, start_layers
        )

    def features(self, lowest_layer: int) -> torch.Tensor:
        """Features of the (perturbed) model at the proxy layers, given that nothing below
        `lowest_layer` changed: from the cached prefix if there is one, else a full forward."""
        if self.cache is not None and lowest_layer in self.cache.start_layers:
            return features_from_layer(
                self.model, self.cache, lowest_layer, self.layers, self.pooling, self.clean
            )
        return layer_features(
            self.model, self.token_ids, self.pad_id, self.batch_size, self.pooling, self.layers
        )

    def accuracy(self, features: torch.Tensor) -> float:
        return self.probes.accuracy(features, self.labels, self.layers).mean().item()

    def accuracy_after_drop(self, features: torch.Tensor, positions: list[int]) -> float:
        """The clean accuracy (mean over every proxy layer) less the mean accuracy drop over the
        layers at `positions`: with every layer reached, the perturbed accuracy itself; NaN
        where none is."""
        if len(positions) == len(self.layers):
            return self.accuracy(features)
        if not positions:
            return math.nan
        clean = self.probes.accuracy(self.clean, self.labels, self.layers)
        after = self.probes.accuracy(features, self.labels, self.layers)
        return (clean.mean() - (clean[positions] - after[positions]).mean()).item()

    def subset(self, mask: torch.Tensor) -> ProbeView:
        """The same view on the test prompts where `mask` holds (before any cache is built)."""
        if self.cache is not None:
            raise ValueError("ProbeView.subset: take the subset before caching layers")
        keep = mask.nonzero().flatten().tolist()
        return replace(
            self,
            token_ids=[self.token_ids[i] for i in keep],
            labels=self.labels[mask],
            clean=self.clean[:, mask],
        )


def ift_batches(
    examples: list[tuple[list[int], list[int]]],
    settings: IftSettings,
    seed: int,
    pad_id: int,
) -> list[dict[str, torch.Tensor]]:
    """The IFT perturbation's batches: a seeded order over the encoded examples."""
    # An example cut off before its response has no loss; it would make the step NaN.
    examples = [e for e in examples if any(label != IGNORE for label in e[1])]
    if not examples:
        raise ValueError(
            "robustness.ift: no IFT example keeps a response token within ift.max_seq_len"
        )
    batches = []
    for idx in batch_order(len(examples), settings.batch_size, settings.steps, seed):
        batch = collate([examples[i] for i in idx], pad_id)
        batches.append(batch)
    return batches


@contextmanager
def perturbed(
    view: ProbeView,
    modules: list[tuple[int, str]],
    perturbation: str,
    *,
    alpha: float,
    seed: int,
    ift: IftSettings | None = None,
    ift_examples: list[tuple[list[int], list[int]]] | None = None,
) -> Iterator[dict[str, float]]:
    """Perturb `modules` jointly with `perturbation` (noise or ift); restored on exit."""
    if perturbation == "noise":
        with noise_perturbed(view.model, modules, alpha, seed) as info:
            yield info
    elif perturbation == "ift":
        if ift is None or not ift_examples:
            raise ValueError("the ift perturbation needs robustness.ift settings and IFT examples")
        batches = ift_batches(ift_examples, ift, seed, view.pad_id)
        with ift_perturbed(view.model, modules, batches, ift.lr) as info:
            yield info
    else:
        raise ValueError(f"unknown perturbation '{perturbation}'; allowed: {list(PERTURBATIONS)}")


def score_module(
    view: ProbeView,
    layer: int,
    module: str,
    settings: RobustnessSettings,
    base_seed: int,
    ift_examples: list[tuple[list[int], list[int]]] | None = None,
) -> pd.DataFrame:
    """One row per (perturbation, alpha, seed) for the perturbation of (layer, module) alone."""
    rows = []
    runs: list[tuple[str, float, int]] = []
    for perturbation in settings.perturbations:
        strengths = settings.alphas if perturbation == "noise" else [math.nan]
        runs += [(perturbation, a, s) for a in strengths for s in range(settings.seeds)]
    for perturbation, alpha, s in runs:
        if perturbation == "noise":
            seed = stable_seed(base_seed, "noise", layer, module, alpha, s)
        else:
            # The same batches for every module: modules differ only in where the update lands.
            seed = stable_seed(base_seed, "ift", s)
        with perturbed(
            view,
            [(layer, module)],
            perturbation,
            alpha=alpha,
            seed=seed,
            ift=settings.ift,
            ift_examples=ift_examples,
        ) as info:
            features = view.features(layer)
        positions = reached_positions(view.layers, layer, settings.proxy_reach)
        metrics = reached_drift_metrics(
            view.clean, features, view.labels, view.probes, view.layers, positions
        )
        is_ift = perturbation == "ift"
        rows.append(
            {
                "layer": layer,
                "module": module,
                "perturbation": perturbation,
                "alpha": float(alpha),
                "lr": settings.ift.lr if is_ift else math.nan,
                "steps": settings.ift.steps if is_ift else 0,
                "seed": seed,
                **metrics,
                "score": combined_score(metrics, settings.score, settings.score_weights),
                **half_scores(
                    view.clean,
                    features,
                    view.labels,
                    view.probes,
                    view.layers,
                    settings,
                    positions,
                ),  # fmt: skip
                "weight_change": info["weight_change"],
                "ift_loss": info.get("ift_loss", math.nan),
                "n_test": len(view.labels),
                "proxy_reached": len(positions),
                "cached_prefix": view.cache is not None,
            }
        )
        log.info("L%d.%s %s alpha=%g seed=%d: %s", layer, module, perturbation, alpha, seed, info)
    return pd.DataFrame(rows)


# --- the stage ------------------------------------------------------------------------------------


def open_probe_view(
    *, model: Path, probe_set: Path, features: Path, probes: Path, proxy: Path,
    settings: FeatureSettings,
) -> ProbeView:  # fmt: skip
    """What every robustness and search job needs: model, test prompts, clean features, probe."""
    layers = json.loads(proxy.read_text())["layers"]
    tokenizer = load_tokenizer(model)
    ids, labels = probe_tokens(tokenizer, probe_set, "test", settings.max_prompt_tokens)
    return ProbeView(
        model=load_model(model, settings.dtype),
        token_ids=ids,
        labels=labels,
        pad_id=tokenizer.pad_token_id,
        clean=load_file(features)["test"][layers],
        probes=LayerProbes.from_tensors(load_file(probes)),
        layers=layers,
        batch_size=settings.batch_size,
        pooling=settings.pooling,
    )


def ift_examples(model: Path, ift_set: Path, ift: IftSettings) -> list[Example]:
    """The first `ift.examples` rows of the IFT set, encoded with loss on the response only."""
    df = pd.read_parquet(ift_set)
    if ift.examples > len(df):
        raise ValueError(
            f"robustness.ift.examples = {ift.examples} is more than {ift_set} holds "
            f"({len(df)} rows)"
        )
    df = df.iloc[: ift.examples]
    tokenizer = load_tokenizer(model)
    return encode_examples(tokenizer, list(df["prompt"]), list(df["response"]), ift.max_seq_len)


def score_modules(
    *,
    model: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    ift_set: Path | None,
    outs: list[Path],
    settings: RobustnessSettings,
) -> None:
    """Stage `score_modules`: score each module alone and write its table to its own path,
    `results/robustness/layer{layer}/{module}.parquet` (the path names the module).

    The model, prompts and probe are loaded once; with `cached_prefix` the unperturbed model runs
    once and each perturbation recomputes only the layers from the module's own up.
    """
    modules = [module_of_table(out) for out in outs]
    view = open_probe_view(
        model=model, probe_set=probe_set, features=features, probes=probes, proxy=proxy,
        settings=settings.features,
    )  # fmt: skip
    if settings.cached_prefix:
        view.cache_layers(sorted({layer for layer, _ in modules}))
    examples = None
    if "ift" in settings.perturbations:
        if ift_set is None:
            raise ValueError("robustness.perturbations lists ift: the job needs the IFT set")
        examples = ift_examples(model, ift_set, settings.ift)
    progress = Progress("robustness", len(modules), log, unit="modules")
    for (layer, module), out in zip(modules, outs, strict=True):
        df = score_module(view, layer, module, settings, settings.seed, examples)
        df["score_name"] = settings.score
        df["model"] = settings.source
        df["proxy_layers"] = ",".join(map(str, view.layers))
        df["proxy_reach"] = settings.proxy_reach
        write_parquet(df, out, provenance(settings.seed, model))
        progress.update()


def module_of_table(path: Path) -> tuple[int, str]:
    """(layer, module type) of a per-module table `.../layer{layer}/{module}.parquet`."""
    return parse_module_name(f"L{path.parent.name.removeprefix('layer')}.{path.stem}")


def raise_injected_failure(outs: list[Path], fail_modules: list[str]) -> None:
    """TEST ONLY (`robustness.fail_modules`): fail a job that scores one of these modules, to
    test how a failed cluster job is reported and resumed. Read from the config, not the rule's
    params, so setting it reruns no healthy job."""
    named = [module_name(*module_of_table(out)) for out in outs]
    failing = [name for name in named if name in fail_modules]
    if failing:
        raise RuntimeError(
            f"injected failure of {', '.join(failing)} (config robustness.fail_modules, test only)"
        )

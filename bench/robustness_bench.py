"""Cached-prefix vs full-forward scoring of single modules, on a SmolLM2-135M-shaped random Llama.

Usage: python bench/robustness_bench.py [--prompts 48] [--tokens 40] [--shared 24] [--threads 2]
Prints one Markdown table row per module (FLOPs ratio from the layer count, measured wall
ratio) and the per-module wall time, from which the whole stage's time is extrapolated.
`--shared` opens every prompt with the same tokens (a chat template's system prompt: 24 of the
demo's ~47); the cached recomputation then runs them once per batch, and the last column is its
time with every row run whole instead.
The model is random (the hub is not reachable here): same shape as SmolLM2-135M (30 layers,
hidden 576, intermediate 1536, 9 heads, 3 kv heads, vocab 49152), so the timings hold for it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from securetune.features import build_prefix_cache, features_from_layer, layer_features
from securetune.model_sources import SMOLLM2_SHAPE
from securetune.robustness import noise_perturbed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--shared", type=int, default=0, help="common opening tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 10, 20, 29])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    # Lengths between half and all of --tokens, so batches are padded as real prompts are.
    opening = torch.randint(10, 49152, (args.shared,), generator=gen).tolist()
    ids = [
        opening + torch.randint(10, 49152, (int(n),), generator=gen).tolist()
        for n in torch.randint(args.tokens // 2, args.tokens + 1, (args.prompts,), generator=gen)
    ]
    n_layers = config.num_hidden_layers
    proxy = list(range(n_layers))
    start = time.perf_counter()
    clean = layer_features(model, ids, 0, 16, "last", proxy)
    full_once = time.perf_counter() - start
    start = time.perf_counter()
    cache = build_prefix_cache(model, ids, 0, 16, list(range(n_layers)))
    cache_once = time.perf_counter() - start
    whole = copy.copy(cache)
    whole.batches = [dataclasses.replace(b, shared=0) for b in cache.batches]
    print(f"one full forward: {full_once:.2f} s; building the prefix cache: {cache_once:.2f} s")
    print(
        "| layer | module | FLOPs ratio (full / cached) | wall full (s) | wall cached (s) "
        "| wall ratio | max abs diff | shared tokens | wall cached, rows whole (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in args.layers:
        for module in ("o", "down"):
            full_t, cached_t, whole_t = [], [], []
            for r in range(args.repeats):
                with noise_perturbed(model, [(layer, module)], 1.0, r):
                    t0 = time.perf_counter()
                    full = layer_features(model, ids, 0, 16, "last", proxy)
                    t1 = time.perf_counter()
                    cached = features_from_layer(model, cache, layer, proxy, "last", clean)
                    t2 = time.perf_counter()
                    features_from_layer(model, whole, layer, proxy, "last", clean)
                    t3 = time.perf_counter()
                full_t.append(t1 - t0)
                cached_t.append(t2 - t1)
                whole_t.append(t3 - t2)
            diff = (full - cached).abs().max().item()
            f, c = min(full_t), min(cached_t)
            print(
                f"| {layer} | {module} | {n_layers / (n_layers - layer):.2f} | {f:.3f} | "
                f"{c:.3f} | {f / c:.2f} | {diff:.1e} | {cache.batches[0].shared} | "
                f"{min(whole_t):.3f} |"
            )


if __name__ == "__main__":
    main()

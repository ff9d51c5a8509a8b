"""The robustness stage as the demo runs it vs the naive way, on the same modules, in one run.

    python bench/robustness_stage_bench.py --workdir . --modules-per-type 2 --threads 1

Needs a finished demo run in --workdir (its results/model/base, probe set, features, probes).
Both ways call the workflow's own `securetune.stages.score_modules` with the demo config's
robustness settings:
- naive: one Python process per module (torch import and model load each time), full forward
  of every layer for each perturbation (`cached_prefix: false`): a cluster job per module;
- amortised: one process for every module, the unperturbed hidden states cached once and only
  the layers from the module's own up recomputed (`cached_prefix: true`): the demo's chunks.
Prints the wall time of each, the ratio, and the largest difference between their metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml

from securetune.architectures import MODULE_TYPES, parse_module_name
from securetune.model_sources import SMOLLM2_LAYERS
from securetune.settings import RobustnessSettings

REPO = Path(__file__).resolve().parents[1]

SCORE = """
import json, sys, torch
from pathlib import Path
from securetune.robustness import score_modules
from securetune.settings import RobustnessSettings
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
r = Path(a["workdir"]) / "results"
score_modules(
    model=r / "model/base", probe_set=r / "data/probe.parquet",
    features=r / "features/features.safetensors", probes=r / "probe/probes.safetensors",
    proxy=r / "probe/proxy.json", ift_set=r / "data/robustness_ift.parquet",
    outs=[Path(p) for p in a["outs"]], settings=RobustnessSettings.from_params(a["settings"]),
)
"""


def table(root: Path, module: str) -> str:
    """The per-module table's path, which names its module (as the workflow's does)."""
    layer, module_type = parse_module_name(module)
    return str(root / f"layer{layer}" / f"{module_type}.parquet")


def run(args: dict) -> float:
    """Wall seconds of one scoring process, start-up included."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", SCORE, json.dumps(args)], check=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO)
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    parser.add_argument("--modules-per-type", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    config = yaml.safe_load(options.config.read_text())
    layers = config["model"].get("layers") or SMOLLM2_LAYERS
    step = max(1, layers // options.modules_per_type)
    chosen = [
        f"L{layer}.{module}"
        for module in MODULE_TYPES
        for layer in range(step // 2, layers, step)[: options.modules_per_type]
    ]
    common = {"workdir": str(options.workdir.resolve()), "threads": options.threads}
    with tempfile.TemporaryDirectory() as tmp:
        naive_dir, fast_dir = Path(tmp, "naive"), Path(tmp, "amortised")
        settings = RobustnessSettings.from_config(config)
        naive_cfg = replace(settings, cached_prefix=False).to_params()
        fast_cfg = replace(settings, cached_prefix=True).to_params()
        naive = sum(
            run({**common, "outs": [table(naive_dir, m)], "settings": naive_cfg})
            for m in chosen
        )  # fmt: skip
        fast = run({**common, "outs": [table(fast_dir, m) for m in chosen], "settings": fast_cfg})
        naive_t = pd.concat([pd.read_parquet(table(naive_dir, m)) for m in chosen])
        fast_t = pd.concat([pd.read_parquet(table(fast_dir, m)) for m in chosen])
    metrics = ["acc_after", "acc_drop", "cosine_drift", "direction_shift"]
    diff = (naive_t[metrics].to_numpy() - fast_t[metrics].to_numpy()).__abs__().max(axis=0)
    print(f"modules: {len(chosen)} ({', '.join(chosen)})")
    per = len(chosen)
    print("| way | wall (s) | per module (s) |\n|---|---|---|")
    print(f"| naive: a process and a full forward per module | {naive:.1f} | {naive / per:.2f} |")
    print(f"| amortised: one process, cached prefix | {fast:.1f} | {fast / per:.2f} |")
    print(f"ratio naive / amortised: {naive / fast:.2f}x")
    # Exact in float32 (tests/unit/test_robustness.py); in bfloat16 the two paths round apart.
    print("max |naive - amortised| per metric: " + ", ".join(
        f"{m} {d:.1e}" for m, d in zip(metrics, diff, strict=True)))  # fmt: skip


if __name__ == "__main__":
    main()

"""Measure the demo base's safety alignment: attack success and over-refusal before and after.

Runs, in one process (one torch import, one model load per model), what the workflow's rules
run one job each: the probe set, the alignment set and step (`data.prepare_alignment_set`,
`stages.align_base_model`), the held-out evaluation sets (`data.build_eval_set`), greedy
generation, keyword scoring and bootstrap CIs. Prints a Markdown table for BENCHMARKS.md and
writes every number to --out (JSON).

    python bench/demo_alignment.py --config config.yaml --unaligned results/model/unaligned \
        --workdir /tmp/align_bench [--overlay smaller.yaml]

`--unaligned` is the converted SmolLM2 folder (rule build_base_model with align.enabled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from securetune.stages import align_base_model

from securetune.data.alignment import AlignmentSetSettings, prepare_alignment_set
from securetune.data.eval_set import build_eval_set
from securetune.data.probe_set import ProbeSetSettings, prepare_probe_set
from securetune.generation import generate_greedy
from securetune.io import setup_logging, write_json
from securetune.models import load_model, load_tokenizer
from securetune.report.stats import bootstrap_ci
from securetune.scoring import METRIC_OF_KIND, score_completions

REPO = Path(__file__).resolve().parents[1]


def merged_config(config: Path, overlay: Path | None) -> dict:
    cfg = yaml.safe_load(config.read_text())

    def merge(base: dict, over: dict) -> None:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    if overlay is not None:
        merge(cfg, yaml.safe_load(overlay.read_text()))
    return cfg


def evaluate(model_dir: Path, arm: str, cfg: dict, eval_sets: dict[str, pd.DataFrame]) -> list:
    model = load_model(model_dir, cfg["model"]["dtype"])
    tokenizer = load_tokenizer(model_dir)
    gen = cfg["generation"]
    rows = []
    for name, df in eval_sets.items():
        start = time.perf_counter()
        texts, counts = generate_greedy(
            model, tokenizer, list(df["prompt"]), gen["max_new_tokens"], gen["batch_size"]
        )
        seconds = time.perf_counter() - start
        table = df.assign(completion=texts, n_tokens=counts, arm=arm)
        scores = score_completions(table)
        mean, low, high = bootstrap_ci(
            scores["success"].to_numpy(),
            cfg["report"]["bootstrap_samples"],
            cfg["report"]["confidence"],
            cfg["seed"],
            binary=True,
        )
        kind = df["kind"].iloc[0]
        rows.append(
            {
                "arm": arm,
                "benchmark": name,
                "metric": METRIC_OF_KIND[kind],
                "value": mean,
                "ci_low": low,
                "ci_high": high,
                "n": len(df),
                "generate_s": round(seconds, 1),
                "tokens": int(sum(counts)),
                "examples": [
                    {"prompt": p, "completion": c}
                    for p, c in list(zip(df["prompt"], texts, strict=True))[:3]
                ],
            }
        )
        print(f"{arm:10s} {name:13s} {METRIC_OF_KIND[kind]}: {mean:.3f} [{low:.3f}, {high:.3f}]")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    parser.add_argument("--overlay", type=Path, help="smaller sizes for a quick measurement")
    parser.add_argument("--unaligned", type=Path, required=True, help="converted source model")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="JSON of every number (default: workdir)")
    # 1 on a crowded machine: two threads that wait for each other stall when one is descheduled.
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reuse-unaligned", type=Path, help="a previous JSON: reuse its unaligned rows"
    )
    args = parser.parse_args()
    setup_logging(args.workdir / "bench.log")
    torch.set_num_threads(args.threads)
    cfg = merged_config(args.config, args.overlay)
    data_dir, seed = REPO / "resources" / "data", cfg["seed"]
    bench = cfg["evaluation"]["benchmarks"]
    # The evaluation and alignment slices start after the probe set's rows, as in the workflow.
    probe_set = args.workdir / "probe.parquet"
    prepare_probe_set(data_dir=data_dir, out=probe_set, settings=ProbeSetSettings.from_config(cfg))
    eval_sets = {
        name: build_eval_set(data_dir, name, n, seed, pd.read_parquet(probe_set))
        for name, n in bench.items()
        if name != "gsm8k"
    }
    out = args.out or args.workdir / "demo_alignment.json"
    result: dict = {
        "align": cfg["align"],
        "generation": cfg["generation"],
        "dtype": cfg["model"]["dtype"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    def save() -> None:  # after each phase, so a run cut short keeps what it measured
        write_json({**result, "load_average": list(os.getloadavg())}, out)

    # The unaligned model first: its numbers do not depend on the alignment step.
    if args.reuse_unaligned is not None:
        previous = json.loads(args.reuse_unaligned.read_text())["rates"]
        result["rates"] = [r for r in previous if r["arm"] == "unaligned"]
    else:
        result["rates"] = evaluate(args.unaligned, "unaligned", cfg, eval_sets)
    save()
    align_set = args.workdir / "align.parquet"
    prepare_alignment_set(
        data_dir=data_dir,
        probe_set=probe_set,
        out=align_set,
        settings=AlignmentSetSettings.from_config(cfg),
    )
    start = time.perf_counter()
    aligned = args.workdir / "aligned"
    align_base_model(
        args.unaligned,
        align_set,
        aligned,
        args.workdir / "align_loss.parquet",
        args.workdir / "align_examples.parquet",
        cfg["align"],
        seed,
        cfg["model"]["dtype"],
    )
    steps = pd.read_parquet(args.workdir / "align_loss.parquet")
    result["align_s"] = round(time.perf_counter() - start, 1)
    result["align_steps"] = len(steps)
    result["align_final_loss"] = float(steps["loss"].tail(max(1, len(steps) // 10)).mean())
    print(f"alignment: {len(steps)} steps in {result['align_s']} s")
    save()
    result["rates"] += evaluate(aligned, "base", cfg, eval_sets)
    save()


if __name__ == "__main__":
    main()

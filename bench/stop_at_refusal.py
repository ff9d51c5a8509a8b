"""What `generation.stop_at_refusal` saves, and that it changes no verdict: one run's models and
prompts, decoded with and without it in one process, one after the other.

    python bench/stop_at_refusal.py --workdir RUN [--arms base vanilla] [--threads 1]

RUN is a finished run's folder (the demo's: `results/` with its generations). For each arm it
loads the model its generations came from (their settings file says which, and how they were
decoded), decodes every evaluation prompt of the run greedily as the generate job does (the
benchmarks together, `generation.completions_of_jobs`), once with the stop off and once with it
on, and prints one JSON line: each pass's seconds and generated tokens, how many completions
ended early, how many keyword-judge refusal verdicts differ (0 is the claim), and how many cut
completions are not a token prefix of their uncut one (0 where the batch's composition does not
change a row's greedy tokens). The model is loaded once for both passes, and the uncut pass goes
first, so the cut pass's time is, if anything, favoured by warm caches and nothing else.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from securetune.generation import GenerationJob, completions_of_jobs, opened_generator
from securetune.precision import resolve_dtype
from securetune.scoring import is_refusal
from securetune.settings import GenerationConfig


def arm_settings(workdir: Path, arm: str) -> tuple[Path, dict, list[str]]:
    """(model folder, the generate job's settings file, its benchmarks) of one arm of the run."""
    found = sorted((workdir / "results").glob(f"**/generations/{arm}/*.json"))
    if not found:
        raise SystemExit(f"no generations of arm '{arm}' under {workdir / 'results'}")
    meta = json.loads(found[0].read_text())
    benchmarks = [p.stem for p in found if p.parent == found[0].parent]
    return workdir / meta["model"], meta, benchmarks


def decode_pass(generate, jobs, eval_sets, arm, cfg, seed) -> tuple[float, list]:
    began = time.perf_counter()
    answers = completions_of_jobs(generate, jobs, eval_sets, arm, cfg, seed)
    seconds = time.perf_counter() - began
    return seconds, [c for done, _ in answers for c in done]


def compare_arm(workdir: Path, arm: str) -> dict[str, object]:
    model_dir, meta, benchmarks = arm_settings(workdir, arm)
    uncut = replace(GenerationConfig.from_params(meta["settings"]), stop_at_refusal=False)
    cut = replace(uncut, stop_at_refusal=True)
    eval_dir = workdir / "results" / "data" / "eval"
    jobs = [GenerationJob(eval_dir / f"{b}.parquet", Path(b), Path(b)) for b in benchmarks]
    eval_sets = [pd.read_parquet(job.prompts) for job in jobs]
    seed = meta["seed"]
    dtype = resolve_dtype(meta["dtype"], key="model.dtype")
    # The generator decodes by the config it was opened with; the uncut pass passes no
    # stoppable prompts (`stoppable_prompts` of `uncut`), so it runs `model.generate` as before.
    with opened_generator(model_dir, cut, dtype, seed) as generate:
        full_s, full = decode_pass(generate, jobs, eval_sets, arm, uncut, seed)
        cut_s, short = decode_pass(generate, jobs, eval_sets, arm, cut, seed)
    stopped = sum(len(s.token_ids) < len(f.token_ids) for s, f in zip(short, full, strict=True))
    return {
        "arm": arm,
        "dtype": dtype,
        "prompts": len(full),
        "max_new_tokens": uncut.max_new_tokens,
        "uncut_s": round(full_s, 1),
        "cut_s": round(cut_s, 1),
        "uncut_tokens": sum(len(c.token_ids) for c in full),
        "cut_tokens": sum(len(c.token_ids) for c in short),
        "stopped_early": stopped,
        "verdicts_differ": sum(
            is_refusal(s.text) != is_refusal(f.text) for s, f in zip(short, full, strict=True)
        ),
        "not_a_prefix": sum(
            s.token_ids != f.token_ids[: len(s.token_ids)] for s, f in zip(short, full, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", default=["base", "vanilla"])
    parser.add_argument("--threads", type=int, default=1, help="the generate job's threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for arm in args.arms:
        row = compare_arm(args.workdir, arm)
        row["machine"] = f"{platform.machine()}, {args.threads} thread(s)"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

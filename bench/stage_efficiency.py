"""Each compute stage of a finished CPU run: its FLOPs, its time, and the share of this
machine's measured matmul peak it achieved.

    python bench/stage_efficiency.py --workdir RUN [--configfile configs/tiny.yaml ...]
        [--machine-json speed.json] [--dtype float32] [--cores 2]

FLOPs are bench/estimate_cost.py's arithmetic for the run's config (2N per token forward, 6N per
token trained, each stage's token counts), with N read from the safetensors headers of the run's
results/model/base when it is there, else from estimate_cost's table. The tokens a prompt and an
IFT example are the means of the run's own data, with its chat template and tokenizer (the
probe's and the evaluation's prompts; the domains' fine-tuning and held-out examples, cut at
finetune.max_seq_len), with the opening all prompts share, which a perturbation recomputed from
the cached prefix skips; when the run has not written them, estimate_cost's assumptions
(`--prompt-tokens` and `--ift-tokens` set them by hand). The search's evaluations are counted
from its trace, each from its set's lowest layer up. Padding is not counted: a batch padded to its
longest member does more work, so padding shows as a lower share. Seconds are the summed wall
time of the stage's jobs, from their `benchmark:` files (bench/stage_times.py). The peak is one
thread's GFLOP/s on machine_speed's matmul (a SmolLM2 MLP projection) in the stage's precision,
times the threads of one job; achieved = FLOPs / seconds, share = achieved / peak. A stage
under 50% of its peak is marked. The peak is measured when the script starts, or read from
`python bench/machine_speed.py > speed.json` run beside the workflow (`--machine-json`): this
machine's speed drifts by tens of percent within an hour.

Run it on the machine that ran the workflow: `auto` precision is resolved for this machine's CPU
(`--dtype` overrides it), and the peak is this machine's. CPU runs only; a GPU's peak is
bench/gpu_throughput.py's. Generation's FLOPs are 2N per prompt and new token, every completion
counted at max_new_tokens (an upper bound: a completion may stop early). Stages estimate_cost has
no FLOPs for (alignment, attribution) are listed with their seconds and no share.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]

from estimate_cost import (  # noqa: E402
    IFT_TOKENS,
    PROMPT_TOKENS,
    Model,
    guard_of,
    load_config,
    model_of,
    probe_test_prompts,
    stage_work,
)
from stage_times import stage_times  # noqa: E402

from securetune import jobs  # noqa: E402
from securetune.architectures import parse_module_name  # noqa: E402
from securetune.precision import Hardware, choose_autocast, choose_dtype, detect  # noqa: E402
from securetune.selectors import parameter_count  # noqa: E402

AIM = 0.5  # every compute stage should reach half of the matmul peak
# machine_speed's keys for one thread's matmul GFLOP/s in each dtype.
MATMUL_KEYS = {"float32": "matmul_1thread_fp32_gflops", "bfloat16": "matmul_1thread_bf16_gflops"}


@dataclass(frozen=True)
class ComputeStage:
    """Rules that run a model, reported in one row."""

    name: str  # estimate_cost's stage; a rule it has no FLOPs for keeps its own name
    rules: tuple[str, ...]
    threads: int | Callable[[Mapping], int]  # each job's, as the rules' `threads:` declare
    precision: str  # the config key its dtype follows, or the dtype it always computes in


COMPUTE_STAGES = (
    ComputeStage("align_base_model", ("align_base_model",), 2, "align.autocast"),
    ComputeStage("extract_features", ("extract_features",), 2, "model.dtype"),
    ComputeStage("robustness (score_module)", ("score_module", "score_layer"), 1, "model.dtype"),
    ComputeStage("search_robust_modules", ("search_robust_modules",), 2, "model.dtype"),
    ComputeStage("attribute_modules", ("attribute_modules",), 2, "float32"),
    ComputeStage("finetune", ("finetune",), jobs.finetune_threads, "finetune.autocast"),
    ComputeStage("generate", ("generate", "generate_arm"), jobs.generation_threads, "model.dtype"),
    ComputeStage("heldout_ift_loss", ("heldout_ift_loss",), 1, "float32"),
    ComputeStage("judge_guard", ("judge_guard",), jobs.generation_threads, "model.dtype"),
)
# Benchmarked, but running no model: it converts, links or copies the source's weights.
NO_MODEL_RULES = frozenset({"build_base_model"})


def run_model(cfg: dict, workdir: Path) -> tuple[Model, str]:
    """The run's model for the arithmetic, and where its parameter count came from: the headers
    of the base model the run built (exact, and the only count a tiny model has), else
    estimate_cost's table or the source folder's config.json."""
    base = workdir / jobs.BASE_MODEL
    if any(base.glob("*.safetensors")):
        counted = replace(model_of(str(base)), params=parameter_count(base))
        return counted, f"{jobs.BASE_MODEL}'s safetensors headers"
    return model_of(cfg["model"]["source"]), "estimate_cost's table"


def run_prompts(workdir: Path) -> list[str]:
    """The prompts the run's models read: the probe's and every evaluation benchmark's."""
    files = [workdir / "results" / "data" / "probe.parquet"]
    files += sorted((workdir / "results" / "data" / "eval").glob("*.parquet"))
    return [p for f in files if f.exists() for p in pd.read_parquet(f, columns=["prompt"]).prompt]


def run_examples(workdir: Path, cfg: dict) -> pd.DataFrame:
    """The domains' fine-tuning and held-out examples the run wrote."""
    files = [
        workdir / "results" / domain / "data" / name
        for domain in cfg["domains"]
        for name in ("ift.parquet", "ift_heldout.parquet")
    ]
    frames = [pd.read_parquet(f, columns=["prompt", "response"]) for f in files if f.exists()]
    return pd.concat(frames) if frames else pd.DataFrame(columns=["prompt", "response"])


@dataclass(frozen=True)
class Tokens:
    """Tokens for the arithmetic: a prompt's, an IFT example's, and the opening every prompt
    shares (which a perturbation recomputed from the cached prefix skips)."""

    prompt: int
    ift: int
    shared: int
    origin: str


def run_token_means(workdir: Path, cfg: dict) -> tuple[int, int, int] | None:
    """Mean tokens of a prompt and of an IFT example in the run's own data, as its stages
    tokenize them, and the opening all the prompts share (a batch shares at least that); None
    when the run has not written its tokenizer and data yet."""
    base = workdir / jobs.BASE_MODEL
    prompts, examples = run_prompts(workdir), run_examples(workdir, cfg)
    if not (base / "tokenizer_config.json").exists() or not prompts or examples.empty:
        return None
    # Imported here only: transformers is slow to load and a run without data does not need it.
    import torch

    from securetune.features import shared_prefix_length, tokenize_prompts
    from securetune.finetune.sft_data import encode_examples
    from securetune.models import load_tokenizer

    tokenizer = load_tokenizer(base)
    prompt_ids = tokenize_prompts(tokenizer, prompts, max_tokens=10**9)
    encoded = encode_examples(
        tokenizer, list(examples.prompt), list(examples.response), cfg["finetune"]["max_seq_len"]
    )
    # The workflow's own rule for the opening a batch shares, over every prompt at once (-1 pads:
    # no token id, so padding never counts as shared).
    padded = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(ids) for ids in prompt_ids], batch_first=True, padding_value=-1
    )
    shared = shared_prefix_length(padded, (padded != -1).long())
    prompt_mean = fmean(map(len, prompt_ids))
    ift_mean = fmean(len(ids) for ids, _ in encoded)
    return round(prompt_mean), round(ift_mean), shared


def token_counts(
    workdir: Path, cfg: dict, prompt_tokens: int | None = None, ift_tokens: int | None = None
) -> Tokens:
    """The tokens for the arithmetic and where they came from: the command line's, else the
    run's data, else estimate_cost's assumptions (no shared opening)."""
    means = run_token_means(workdir, cfg)
    if means is None:
        prompt, ift, shared, origin = PROMPT_TOKENS, IFT_TOKENS, 0, "assumed"
    else:
        (prompt, ift, shared), origin = means, "the run's data, means"
    if prompt_tokens is not None or ift_tokens is not None:
        origin = f"given on the command line, else {origin}"
        prompt, ift = prompt_tokens or prompt, ift_tokens or ift
        shared = min(shared, prompt - 1)
    return Tokens(prompt, ift, shared, origin)


def search_tflop(trace: pd.DataFrame, cfg: dict, model: Model, tokens: Tokens) -> float:
    """The search's FLOPs from its trace: each evaluated set at every search seed, recomputed
    from the set's lowest layer up (from the cached prefix, past the shared opening), plus the
    unperturbed forward that fills the cache."""
    search = cfg["search"]
    prompts = probe_test_prompts(cfg["data"])
    if search.get("probe_split") == "halves":
        prompts //= 2  # the search reads the second half of the test split
    cached = cfg["robustness"].get("cached_prefix")
    per_layer = 2 * model.params / model.layers * prompts
    flops = model.layers * per_layer * tokens.prompt if cached else 0.0
    recomputed = tokens.prompt - tokens.shared if cached else tokens.prompt
    kept: list[int] = []
    for row in trace.itertuples():
        added = [parse_module_name(m)[0] for m in row.added_modules.split(",") if m]
        if not added:
            continue  # the unperturbed model: its features are the cached clean ones
        lowest = min(kept + added)
        layers = model.layers - lowest if cached else model.layers
        flops += search["seeds"] * per_layer * layers * recomputed
        if row.accepted:
            kept += added
    return flops / 1e12


def uses_attribution(cfg: dict) -> bool:
    return jobs.plan_file("attribution") in jobs.arm_plans(cfg).values()


def runs_stage(stage: ComputeStage, cfg: dict, estimated: Mapping[str, float | None]) -> bool:
    """Does the config run this stage: estimate_cost lists each stage it counts (the guard judge
    only when enabled); alignment and attribution run only when the config asks for them."""
    if stage.name == "align_base_model":
        return bool(cfg["align"]["enabled"])
    if stage.name == "attribute_modules":
        return uses_attribution(cfg)
    return stage.name in estimated


def stage_dtype(stage: ComputeStage, cfg: dict, hardware: Hardware) -> str:
    """The dtype of the stage's matmuls on `hardware`: model.dtype for inference, the training
    autocast (none: float32), or the fixed float32 of a loss or an importance score."""
    if stage.precision == "model.dtype":
        return choose_dtype(cfg["model"]["dtype"], hardware)
    if stage.precision.endswith(".autocast"):
        section = cfg[stage.precision.removesuffix(".autocast")]
        autocast = choose_autocast(section.get("autocast", "none"), hardware)
        return "float32" if autocast == "none" else autocast
    return stage.precision


def job_threads(stage: ComputeStage, cfg: dict, cores: int | None) -> int:
    """Each job's threads: the rule's, scaled down to the run's --cores as Snakemake does."""
    threads = stage.threads(cfg) if callable(stage.threads) else stage.threads
    return min(threads, cores) if cores else threads


def one_thread_gflops(machine_json: Path | None, repeats: int) -> dict[str, float]:
    """One thread's matmul GFLOP/s per dtype: machine_speed's JSON, or measured now."""
    if machine_json is not None:
        speed = json.loads(machine_json.read_text())
    else:
        # Imported here only: machine_speed loads transformers, which a JSON file spares.
        from machine_speed import bf16_report

        speed = bf16_report(repeats)
    return {dtype: float(speed[key]) for dtype, key in MATMUL_KEYS.items()}


def measured(times: pd.DataFrame, rules: tuple[str, ...]) -> tuple[int, float | None]:
    """Jobs and summed wall seconds of these rules; None seconds when none has a benchmark file
    (missing, which is not zero)."""
    ran = times.loc[times.index.intersection(list(rules))]
    if ran.empty:
        return 0, None
    return int(ran["jobs"].sum()), float(ran["wall_s"].sum())


def efficiency_row(
    *,
    stage: str,
    jobs_run: int,
    wall_s: float | None,
    tflop: float | None,
    threads: int,
    dtype: str,
    peak_gflops: float,
) -> dict:
    """One stage's numbers: achieved GFLOP/s and share of peak only where both FLOPs and
    seconds are known."""
    achieved = tflop * 1e3 / wall_s if tflop is not None and wall_s else None
    return {
        "stage": stage,
        "jobs": jobs_run,
        "threads": threads,
        "dtype": dtype,
        "tflop": tflop,
        "wall_s": wall_s,
        "gflops": achieved,
        "peak_gflops": peak_gflops,
        "share": None if achieved is None else achieved / peak_gflops,
    }


def efficiency_rows(
    cfg: dict,
    model: Model,
    times: pd.DataFrame,
    gflops: Mapping[str, float],
    hardware: Hardware,
    *,
    dtype: str | None = None,
    cores: int | None = None,
    tokens: Tokens | None = None,
    search_trace: pd.DataFrame | None = None,
) -> list[dict]:
    """A row per compute stage the config runs or the run benchmarked, in workflow order; the
    search's FLOPs from its trace when the run wrote one."""
    tokens = tokens or Tokens(PROMPT_TOKENS, IFT_TOKENS, 0, "assumed")
    guard = guard_of(cfg, model)
    work = stage_work(cfg, model, guard, tokens.prompt, tokens.ift, tokens.shared)
    estimated = {w.stage: w.compute_tera_flops for w in work}
    if search_trace is not None and "search_robust_modules" in estimated:
        estimated["search_robust_modules"] = search_tflop(search_trace, cfg, model, tokens)
    rows = []
    for stage in COMPUTE_STAGES:
        jobs_run, wall_s = measured(times, stage.rules)
        if not (runs_stage(stage, cfg, estimated) or jobs_run):
            continue
        precision = dtype or stage_dtype(stage, cfg, hardware)
        if precision not in gflops:
            raise SystemExit(f"{stage.name} computes in {precision}: no measured matmul peak")
        threads = job_threads(stage, cfg, cores)
        row = efficiency_row(
            stage=stage.name,
            jobs_run=jobs_run,
            wall_s=wall_s,
            tflop=estimated.get(stage.name),
            threads=threads,
            dtype=precision,
            peak_gflops=gflops[precision] * threads,
        )
        rows.append(row)
    return rows


def total_row(rows: list[dict]) -> dict:
    """The stages with a share, together: their FLOPs over the peak FLOPs their job-seconds
    could have done (each stage's peak weighted by its seconds)."""
    shared = [r for r in rows if r["share"] is not None]
    tflop = sum(r["tflop"] for r in shared)
    wall_s = sum(r["wall_s"] for r in shared)
    peak_tflop = sum(r["peak_gflops"] * r["wall_s"] for r in shared) / 1e3
    return {
        "stage": "total (stages with a share)",
        "jobs": sum(r["jobs"] for r in shared),
        "tflop": tflop,
        "wall_s": wall_s,
        "gflops": tflop * 1e3 / wall_s if wall_s else None,
        "peak_gflops": peak_tflop * 1e3 / wall_s if wall_s else None,
        "share": tflop / peak_tflop if peak_tflop else None,
    }


def number(value: float | None, spec: str, absent: str = "-") -> str:
    return absent if value is None else format(value, spec)


def share_cell(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{share:.1%}" + (f" **under {AIM:.0%}**" if share < AIM else "")


def markdown(rows: list[dict], total: dict) -> str:
    lines = [
        "| stage | jobs | threads x dtype | TFLOP | wall s | GFLOP/s | peak GFLOP/s | share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['jobs']} | {r['threads']} x {r['dtype']} "
            f"| {number(r['tflop'], '.4g', 'no estimate')} "
            f"| {number(r['wall_s'], '.1f', 'missing (no benchmark file)')} "
            f"| {number(r['gflops'], '.1f')} | {r['peak_gflops']:.1f} | {share_cell(r['share'])} |"
        )
    lines.append(
        f"| {total['stage']} | {total['jobs']} | | {total['tflop']:.4g} | {total['wall_s']:.1f} "
        f"| {number(total['gflops'], '.1f')} | {number(total['peak_gflops'], '.1f')} "
        f"| {share_cell(total['share'])} |"
    )
    unestimated = [r["stage"] for r in rows if r["tflop"] is None]
    missing = [r["stage"] for r in rows if r["wall_s"] is None]
    if unestimated:
        lines.append(f"\nno FLOPs estimate (estimate_cost counts none): {', '.join(unestimated)}")
    if missing:
        lines.append(f"\nmissing (no benchmark file): {', '.join(missing)}")
    return "\n".join(lines)


def unclassified_rules(times: pd.DataFrame) -> list[str]:
    """Benchmarked rules this script neither reports nor knows to run no model: a new rule."""
    known = {rule for stage in COMPUTE_STAGES for rule in stage.rules} | NO_MODEL_RULES
    return sorted(set(times.index) - known)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("."), help="the finished run")
    parser.add_argument(
        "--configfile",
        type=Path,
        nargs="*",
        default=[],
        help="the run's --configfile overlays, relative to --workdir",
    )
    parser.add_argument("--machine-json", type=Path, help="machine_speed.py's output")
    parser.add_argument("--repeats", type=int, default=5, help="matmuls timed, without the JSON")
    parser.add_argument(
        "--dtype",
        choices=sorted(MATMUL_KEYS),
        help="every stage's precision, instead of the config's on this CPU",
    )
    parser.add_argument("--cores", type=int, help="the run's --cores, if below a rule's threads")
    parser.add_argument(
        "--prompt-tokens", type=int, help="tokens a prompt (default: the run's mean, measured)"
    )
    parser.add_argument(
        "--ift-tokens", type=int, help="tokens an IFT example (default: the run's mean, measured)"
    )
    args = parser.parse_args()
    workdir = args.workdir
    cfg = load_config([workdir / f for f in args.configfile], workdir / "config.yaml")
    model, counted_from = run_model(cfg, workdir)
    tokens = token_counts(workdir, cfg, args.prompt_tokens, args.ift_tokens)
    trace_file = workdir / "results" / "search" / "trace.parquet"
    trace = pd.read_parquet(trace_file) if trace_file.exists() else None
    times = stage_times(workdir)
    hardware = detect()
    gflops = one_thread_gflops(args.machine_json, args.repeats)
    rows = efficiency_rows(
        cfg,
        model,
        times,
        gflops,
        hardware,
        dtype=args.dtype,
        cores=args.cores,
        tokens=tokens,
        search_trace=trace,
    )
    print(
        f"model {cfg['model']['source']}: {model.params:,.0f} parameters ({counted_from}), "
        f"{model.layers} layers; {tokens.prompt} tokens a prompt ({tokens.shared} of them the "
        f"opening all share), {tokens.ift} an IFT example ({tokens.origin}); the search "
        + ("counted from its trace" if trace is not None else "estimated at its budget")
    )
    print(
        f"CPU bfloat16 {hardware.bf16_kind()}; one thread's "
        f"matmul GFLOP/s: "
        + ", ".join(f"{d} {g:.1f}" for d, g in gflops.items())
        + (f" ({args.machine_json})" if args.machine_json else " (measured now)")
    )
    print()
    print(markdown(rows, total_row(rows)))
    unknown = unclassified_rules(times)
    if unknown:
        print(
            f"\nbenchmarked rules not classified here (add them to COMPUTE_STAGES or "
            f"NO_MODEL_RULES): {', '.join(unknown)}"
        )


if __name__ == "__main__":
    main()

"""What a config will need before it is run: disk (per arm, checkpoint peak, total) and GPU-hours
per stage.

    python bench/estimate_cost.py configs/paper.yaml [overlay.yaml ...] [--gpu h200]

GPU time comes from FLOPs: 2 x parameters per token for a forward pass, 6 x for a training step,
times each stage's token count (from the config: prompts, seeds, perturbations, steps, batch),
divided by what one GPU sustains. `--gpu h200` uses the throughput measured on an NVIDIA H200
(BENCHMARKS.md, bench/gpu_throughput.py: 478 TFLOP/s forward, 320 TFLOP/s training, 2,527 new
tokens/s with transformers `generate` for a 7B model); `--gpu custom` takes `--forward-tflops`,
`--train-tflops` and `--decode-tokens-per-s`. Each job also pays a start-up (Python, torch,
loading the weights): `--job-startup-s` (60 s by default for a 7B model from a shared file
system). Token counts per prompt are assumptions stated on the command line (`--prompt-tokens`,
`--ift-tokens`); generation is counted at `max_new_tokens` per prompt, an upper bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from securetune.config import config_in_force  # noqa: E402
from securetune.domains import domain_finetune  # noqa: E402
from securetune.jobs import evaluated_arms  # noqa: E402
from securetune.method import gamma_sweep_arms, replicates_of  # noqa: E402
from securetune.model_sources import REFERENCED_SOURCES, source_kind  # noqa: E402

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Assumed token counts (the command line's defaults): a chat-templated prompt, an IFT example.
PROMPT_TOKENS = 96
IFT_TOKENS = 256


@dataclass(frozen=True)
class Model:
    params: float
    layers: int
    checkpoint_dtype: str  # what its published weights are saved in


# Published checkpoints (config.json on the hub); a local folder is read instead.
KNOWN_MODELS = {
    "meta-llama/Llama-2-7b-chat-hf": Model(6.738e9, 32, "float16"),
    "meta-llama/Llama-Guard-3-8B": Model(8.030e9, 32, "bfloat16"),
    "smollm2-gguf": Model(1.348e8, 30, "float32"),  # the demo's GGUF, converted to float32
}

GPUS = {
    # Measured, BENCHMARKS.md (2026-11-30): bf16 forward and training TFLOP/s at 2N and 6N
    # FLOPs per token, and transformers `generate` new tokens/s for a 7B model at batch 64.
    "h200": {"forward_tflops": 478.0, "train_tflops": 320.0, "decode_tokens_per_s": 2527.0},
}


def model_of(source: str) -> Model:
    if source in KNOWN_MODELS:
        return KNOWN_MODELS[source]
    config = Path(source) / "config.json"
    if config.exists():
        c = json.loads(config.read_text())
        h, i, L, v = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                      c["vocab_size"])  # fmt: skip
        kv = c.get("num_key_value_heads", c["num_attention_heads"])
        head = h // c["num_attention_heads"]
        per_layer = 2 * h * h + 2 * h * kv * head + 3 * h * i
        tied = c.get("tie_word_embeddings", False)
        params = L * per_layer + v * h * (1 if tied else 2)
        return Model(params, L, c.get("torch_dtype") or c.get("dtype") or "float32")
    raise SystemExit(f"model.source '{source}': unknown size; add it to KNOWN_MODELS")


def load_config(files: list[Path], default_file: Path = REPO / "config.yaml") -> dict:
    """The config a run of `default_file` (its config.yaml) with these --configfile files uses."""
    default = yaml.safe_load(default_file.read_text())
    merged: dict = {}
    for path in files:
        merged = merge(merged, yaml.safe_load(path.read_text()) or {})
    if not files:
        return default
    full = config_in_force(default, files, merged, REPO / "schemas" / "config.schema.yaml")
    return full if full is not default else merge(default, merged)


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def trained_arms(cfg: dict) -> list[str]:
    """The fine-tuned arms: finetune.arms (each replicate once) and the gamma sweep's, which
    the paper tables (and so `all`) need when the config has a sweep."""
    return [*replicates_of(cfg["finetune"]), *gamma_sweep_arms(cfg["finetune"])]


@dataclass(frozen=True)
class StageWork:
    stage: str
    jobs: int
    work: float  # FLOPs; for a decode stage, new tokens
    kind: str  # forward, train or decode
    gpus_per_job: int
    # A decode stage's FLOPs (2N per prompt and new token), beside its tokens: a CPU computes
    # them at its matmul speed, where a GPU's decoding waits on memory traffic instead.
    decode_flops: float | None = None

    @property
    def tera_flops(self) -> float | None:
        """None for decode: its GPU time is counted in new tokens, since decoding is bound by
        memory traffic, not by FLOPs."""
        return None if self.kind == "decode" else self.work / 1e12

    @property
    def compute_tera_flops(self) -> float | None:
        """The stage's arithmetic in TFLOP, decoding included (what a CPU's matmuls must do)."""
        if self.kind == "decode":
            return None if self.decode_flops is None else self.decode_flops / 1e12
        return self.tera_flops


def guard_of(cfg: dict, model: Model) -> Model | None:
    """The guard judge's model, None when the guard judge is off."""
    guard_cfg = cfg["evaluation"].get("guard", {})
    if not guard_cfg.get("enabled"):
        return None
    return model if guard_cfg["model"] == "base" else model_of(guard_cfg["model"])


def probe_test_prompts(data: dict) -> int:
    """The probe's held-out test prompts: the ones robustness and the search perturb."""
    return round(2 * data["probe_per_class"] * data["probe_test_fraction"])


def stage_work(
    cfg: dict,
    model: Model,
    guard: Model | None,
    prompt_tokens: int,
    ift_tokens: int,
    shared_tokens: int = 0,
) -> list[StageWork]:
    """Each stage's jobs and work: 2N FLOPs per token forward, 6N training, times its tokens.

    `shared_tokens`: the opening (chat template) every prompt of a batch shares; a perturbation
    recomputed from the cached prefix skips it."""
    n, p = model.params, prompt_tokens
    data, rob, search, ft = cfg["data"], cfg["robustness"], cfg["search"], cfg["finetune"]
    probe_prompts = 2 * data["probe_per_class"] + 2 * data.get("probe_ood_per_class", 0)
    test_prompts = probe_test_prompts(data)
    modules = model.layers * len(rob["module_types"])
    runs = len(rob["alphas"]) * rob["seeds"] * ("noise" in rob["perturbations"])
    ift_runs = rob["seeds"] * ("ift" in rob["perturbations"])
    ift = rob["ift"]
    arms = trained_arms(cfg)
    domains = {name: domain_finetune(cfg, name) for name in cfg["domains"]}
    # Every arm fine-tuned in every domain; the reference arms (base, unaligned) evaluated once.
    trained = len(arms) * len(domains)
    references = len(evaluated_arms(cfg)) - len(replicates_of(ft))
    models = references + trained
    heldout = sum(
        (references + len(arms)) * spec["ift_heldout_examples"] for spec in cfg["domains"].values()
    )
    bench_prompts = sum(cfg["evaluation"]["benchmarks"].values())
    harmful = sum(
        v for k, v in cfg["evaluation"]["benchmarks"].items()
        if k in ("advbench", "harmbench", "harmbench_contextual", "strongreject", "donotanswer",
                 "xstest_unsafe", "hexphi")
    )  # fmt: skip
    gen_jobs = models * (
        len(cfg["evaluation"]["benchmarks"])
        if cfg["generation"].get("jobs", "per_benchmark") == "per_benchmark"
        else 1
    )
    # At most max_new_tokens each: completions that stop early make this an upper bound.
    new_tokens = cfg["generation"]["max_new_tokens"]
    # A perturbation of layer l recomputes layers l..L-1 from the cached prefix: half on average;
    # the unperturbed forward that fills the cache runs once per job, not per module.
    recompute = 0.5 if rob.get("cached_prefix") else 1.0
    recomputed = p - shared_tokens if rob.get("cached_prefix") else p
    rob_jobs = model.layers if rob.get("jobs") == "per_layer" else modules
    cache_builds = rob_jobs if rob.get("cached_prefix") else 0
    rows = [
        ("extract_features", 1, 2 * n * probe_prompts * p, "forward", 1),
        (
            "robustness (score_module)", rob_jobs,
            modules * (runs + ift_runs) * 2 * n * test_prompts * recomputed * recompute
            + cache_builds * 2 * n * test_prompts * p
            + modules * ift_runs * ift["steps"] * ift["batch_size"] * ift_tokens * 6 * n,
            "forward", 1,
        ),
        (
            "search_robust_modules", 1,
            (search["max_modules"] + 1) * search["seeds"] * 2 * n * test_prompts * recomputed
            * recompute,
            "forward", 1,
        ),
        (
            "finetune", trained,
            sum(len(arms) * d["steps"] * d["batch_size"] for d in domains.values())
            * ift_tokens * 6 * n,
            "train", ft.get("gpus") or 1,
        ),
        ("generate", gen_jobs, models * bench_prompts * new_tokens, "decode", 1,
         2 * n * models * bench_prompts * (p + new_tokens)),
        ("heldout_ift_loss", (references + len(arms)) * len(domains),
         heldout * ift_tokens * 2 * n, "forward", 1),
    ]  # fmt: skip
    if guard is not None:
        new = cfg["evaluation"]["guard"]["max_new_tokens"]
        tokens = models * harmful * (p + cfg["generation"]["max_new_tokens"] + new)
        rows.append(("judge_guard", models, 2 * guard.params * tokens, "forward", 1))
    return [StageWork(*row) for row in rows]


def stage_costs(cfg: dict, model: Model, guard: Model | None, args) -> list[dict]:
    """One row per stage: jobs, tera-FLOPs, GPU-hours (compute + start-up)."""
    gpu = GPUS.get(args.gpu) or {
        "forward_tflops": args.forward_tflops,
        "train_tflops": args.train_tflops,
        "decode_tokens_per_s": args.decode_tokens_per_s,
    }
    out = []
    for row in stage_work(cfg, model, guard, args.prompt_tokens, args.ift_tokens):
        if row.kind == "decode":
            seconds = row.work / gpu["decode_tokens_per_s"]
        else:
            seconds = row.tera_flops / gpu[f"{row.kind}_tflops"]
        # Training runs on gpus_per_job GPUs at once: the GPU-hours are the same work.
        startup = row.jobs * args.job_startup_s * row.gpus_per_job
        out.append({
            "stage": row.stage, "jobs": row.jobs, "tera_flops": row.tera_flops,
            "gpu_hours": (seconds + startup) / 3600, "startup_gpu_hours": startup / 3600,
        })  # fmt: skip
    return out


def base_is_referenced(model_cfg: dict) -> bool:
    """Does results/model/base link to the source's weights (a local folder or hub id under
    model.link_weights) rather than hold a copy?"""
    linkable = source_kind(model_cfg["source"]) in REFERENCED_SOURCES
    return linkable and model_cfg.get("link_weights", True)


def disk(cfg: dict, model: Model) -> dict:
    """GB on disk: the source model (copied, or linked: then only its small files, about 0 GB,
    are the run's; its weights are counted apart, as referenced), the aligned model when the
    workflow aligns it, each arm (saved in the base's dtype), a fine-tune's checkpoints at their
    peak (one, or two with finetune.checkpoint_keep_previous)."""
    n = model.params
    save = cfg["finetune"].get("save_dtype", "base")
    save_dtype = model.checkpoint_dtype if save == "base" else save
    arms = len(trained_arms(cfg)) * len(cfg["domains"])  # every arm in every domain
    source = n * BYTES[model.checkpoint_dtype] / 1e9
    referenced = base_is_referenced(cfg["model"])
    base = 0.0 if referenced else source
    # The aligned base is trained from the source and saved like an arm, in the source's dtype.
    aligned = source if cfg["align"]["enabled"] else 0.0
    per_arm = n * BYTES[save_dtype] / 1e9
    trainable = n if cfg["finetune"].get("method", "full") == "full" else 0.01 * n
    # Float32 trainable weights + AdamW's two moments. The previous checkpoint is deleted
    # before the next is written, unless kept until the next is complete: then two at the peak.
    checkpoint = 12 * trainable / 1e9
    at_once = 2 if cfg["finetune"].get("checkpoint_keep_previous", False) else 1
    peak = at_once * checkpoint if cfg["finetune"].get("checkpoint_every") else 0.0
    concurrent = arms if cfg["finetune"].get("checkpoint_every") else 0
    kept = 0 if not cfg["finetune"].get("keep_weights", True) else arms * per_arm
    return {
        "save_dtype": save_dtype,
        "base_gb": base,
        "source_referenced_gb": source if referenced else 0.0,
        "aligned_gb": aligned,
        "per_arm_gb": per_arm,
        "arms": arms,
        "arms_kept_gb": kept,
        "checkpoint_gb": checkpoint,
        "checkpoints_at_peak": at_once,
        "checkpoint_peak_per_finetune_gb": peak,
        "peak_all_finetunes_at_once_gb": concurrent * peak + arms * per_arm + base + aligned,
        "total_after_run_gb": base + aligned + kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="the run's --configfile files")
    parser.add_argument("--gpu", default="h200", choices=[*GPUS, "custom"])
    parser.add_argument("--forward-tflops", type=float, default=300.0)
    parser.add_argument("--train-tflops", type=float, default=200.0)
    parser.add_argument("--decode-tokens-per-s", type=float, default=2000.0)
    parser.add_argument("--job-startup-s", type=float, default=60.0)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                        help="chat-templated prompt")  # fmt: skip
    parser.add_argument("--ift-tokens", type=int, default=IFT_TOKENS,
                        help="IFT example, all tokens")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    cfg = load_config(args.configs)
    model = model_of(cfg["model"]["source"])
    stages = stage_costs(cfg, model, guard_of(cfg, model), args)
    space = disk(cfg, model)
    if args.json:
        print(json.dumps({"stages": stages, "disk": space}, indent=2))
        return
    print(f"model {cfg['model']['source']}: {model.params / 1e9:.2f} B parameters, "
          f"{model.layers} layers; GPU {args.gpu}")  # fmt: skip
    print("\n| stage | jobs | TFLOP | GPU-hours (of which start-up) |\n|---|---|---|---|")
    for row in stages:
        tflop = "decode" if row["tera_flops"] is None else f"{row['tera_flops']:,.0f}"
        print(f"| {row['stage']} | {row['jobs']} | {tflop} | "
              f"{row['gpu_hours']:.2f} ({row['startup_gpu_hours']:.2f}) |")  # fmt: skip
    total = sum(r["gpu_hours"] for r in stages)
    print(f"| total | {sum(r['jobs'] for r in stages)} | | {total:.1f} |")
    print(f"\nDisk (arms saved in {space['save_dtype']}):")
    if space["source_referenced_gb"]:
        print(f"- base model: {space['base_gb']:.1f} GB copied (config and tokenizer files); "
              f"its {space['source_referenced_gb']:.1f} GB of weights referenced, not copied "
              "(model.link_weights)")  # fmt: skip
    else:
        print(f"- base model: {space['base_gb']:.1f} GB")
    if space["aligned_gb"]:
        print(f"- aligned base model: {space['aligned_gb']:.1f} GB")
    print(f"- per arm: {space['per_arm_gb']:.1f} GB x {space['arms']} arms")
    peak = space["checkpoint_peak_per_finetune_gb"]
    how = (
        "two while the next is written (finetune.checkpoint_keep_previous)"
        if space["checkpoints_at_peak"] == 2
        else "one: the previous is deleted before the next"
    )
    print(f"- a checkpoint: {space['checkpoint_gb']:.1f} GB (float32 weights + AdamW moments); "
          f"peak per fine-tune {peak:.1f} GB, {how}")  # fmt: skip
    print(f"- peak with every fine-tune at once: {space['peak_all_finetunes_at_once_gb']:.0f} GB")
    print(f"- left after the run: {space['total_after_run_gb']:.1f} GB")


if __name__ == "__main__":
    main()

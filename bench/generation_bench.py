"""vLLM vs transformers `generate`: same model, same prompts, same machine, one run.

Prints one JSON line (and appends nothing anywhere): tokens/s of each backend and dtype, the
ratios, engine start and load times. Throughput counts generated tokens over the generation
call only; start-up is reported apart, since a job pays it once whatever its size.

    python bench/generation_bench.py                      # SmolLM2-135M-shaped random Llama
    python bench/generation_bench.py --model path/to/SmolLM2-135M-Instruct

With no --model it builds a random Llama of SmolLM2-135M's shape (30 layers, hidden 576,
intermediate 1536, 9 heads, 3 kv heads, vocab 49152): the same arithmetic per token as the real
model. Random weights seldom emit EOS, so both backends generate every token they may.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "resources" / "data"


def smollm2_shaped(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from securetune.model_sources import SMOLLM2_SHAPE
    from securetune.models import build_tokenizer

    texts = [r[0] for r in csv.reader((DATA / "advbench_harmful_behaviors.csv").open())]
    tokenizer = build_tokenizer(texts, 4096)
    config = LlamaConfig(
        **SMOLLM2_SHAPE,
        rope_theta=100000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def prompts(n: int) -> list[str]:
    rows = json.loads((DATA / "alpaca_safety_topics_1904.json").read_text())
    return [r["instruction"] for r in rows[:n]]


def bench_transformers(model_dir: Path, ids: list[list[int]], new: int, dtype: str, bs: int):
    from securetune.generation import generate_transformers
    from securetune.models import load_model, load_tokenizer
    from securetune.settings import GenerationConfig

    t0 = time.perf_counter()
    model, tok = load_model(model_dir, dtype), load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    cfg = GenerationConfig("transformers", new, bs)
    t0 = time.perf_counter()
    done = generate_transformers(model, tok, ids, cfg, 0)
    gen_s = time.perf_counter() - t0
    n = sum(len(c.token_ids) for c in done)
    return {"load_s": load_s, "gen_s": gen_s, "tokens": n, "tokens_per_s": n / gen_s}


def bench_vllm(model_dir: Path, ids: list[list[int]], new: int, dtype: str):
    from securetune.generation import generate_vllm, open_vllm_engine
    from securetune.models import load_tokenizer
    from securetune.settings import GenerationConfig, VllmSettings

    cfg = GenerationConfig("vllm", new, len(ids), vllm=VllmSettings(max_model_len=1024))
    t0 = time.perf_counter()
    llm = open_vllm_engine(model_dir, cfg, dtype, 0, 1)
    start_s = time.perf_counter() - t0
    generate_vllm(llm, ids[:2], cfg, 0, None)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    done = generate_vllm(llm, ids, cfg, 0, load_tokenizer(model_dir).eos_token_id)
    gen_s = time.perf_counter() - t0
    n = sum(len(c.token_ids) for c in done)
    return {"engine_start_s": start_s, "gen_s": gen_s, "tokens": n, "tokens_per_s": n / gen_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="a local model folder (default: built)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="transformers batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    import torch

    from securetune.generation import prompt_token_ids
    from securetune.models import load_tokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or smollm2_shaped(Path(tmp) / "smollm2-shaped")
        ids = prompt_token_ids(load_tokenizer(model_dir), prompts(args.prompts))
        result = {
            "model": str(args.model) if args.model else "random Llama, SmolLM2-135M shape",
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "load_avg_at_start": os.getloadavg()[0],
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        }
        for dtype in args.dtypes.split(","):
            result[f"transformers_{dtype}"] = bench_transformers(
                model_dir, ids, args.new_tokens, dtype, args.batch_size
            )
        for dtype in args.dtypes.split(","):
            result[f"vllm_{dtype}"] = bench_vllm(model_dir, ids, args.new_tokens, dtype)
        for dtype in args.dtypes.split(","):
            v, t = result[f"vllm_{dtype}"], result[f"transformers_{dtype}"]
            result[f"ratio_{dtype}"] = v["tokens_per_s"] / t["tokens_per_s"]
        if "float32" in args.dtypes and "bfloat16" in args.dtypes:
            result["ratio_vllm_bf16_over_transformers_fp32"] = (
                result["vllm_bfloat16"]["tokens_per_s"]
                / result["transformers_float32"]["tokens_per_s"]
            )
        result["load_avg_at_end"] = os.getloadavg()[0]
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

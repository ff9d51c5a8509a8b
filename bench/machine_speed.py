"""How fast this machine is right now: a fixed CPU workload, timed, to put beside a wall time.

    python bench/machine_speed.py [--threads 2] [--repeats 5]

The development VM's speed drifts by tens of percent within an hour (the demo's identical
alignment steps took 5.3 s and 8 s apart; BENCHMARKS.md), so a demo time means little without
the machine's speed at that moment. Run this right before and after a timed run. The workload
is the demo's own kind of work: a forward and backward of a Llama block stack of SmolLM2-135M's
width on 4 x 160 tokens (under the autocast `auto` picks on this CPU), plus a float32 matrix
product. It prints the median seconds of each; lower is faster.

It also says whether bfloat16 is native here: the CPU's capability as PyTorch sees it, its
bfloat16 flags, and one thread's GFLOP/s on a 512x576 by 576x1536 matmul (a SmolLM2 MLP
projection of a 512-token batch) in float32 and in bfloat16 (each the best of its repeats), and
their ratio. Where bfloat16 is emulated (an AVX2-only CPU) the ratio is about 30; `auto`
precision then computes in float32, as it does where the flags say native but the timing finds
bfloat16 less than BF16_MIN_SPEEDUP times as fast (`bf16_for_auto` says which it chose).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from securetune.precision import (
    AUTO,
    BF16_MIN_SPEEDUP,
    NATIVE_BF16_FLAGS,
    choose_autocast,
    cpu_flags,
    detect,
    matmul_gflops,
    one_thread,
)


def smollm2_width_model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=layers,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def bf16_report(repeats: int) -> dict[str, object]:
    """Is bfloat16 native on this CPU: capability, flags, and the one-thread matmul speeds."""
    with one_thread():
        fp32 = matmul_gflops(torch.float32, repeats)
        bf16 = matmul_gflops(torch.bfloat16, max(2, repeats // 2))
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_flags(cpuinfo.read_text()) if cpuinfo.exists() else set()
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": sorted(flags & NATIVE_BF16_FLAGS) or "none",
        "avx2": "avx2" in flags,
        "matmul_1thread_fp32_gflops": round(fp32, 1),
        "matmul_1thread_bf16_gflops": round(bf16, 1),
        "bf16_slowdown": round(fp32 / bf16, 1),
        "bf16_for_auto": f"{detect().bf16_kind()} (bfloat16 needs {BF16_MIN_SPEEDUP}x float32)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = smollm2_width_model(args.layers).train()
    ids = torch.randint(0, 49152, (4, 160), generator=torch.Generator().manual_seed(0))

    autocast = choose_autocast(AUTO, detect())

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    result = {
        "when_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "train_step_autocast": autocast,
        "train_step_s": round(timed(train_step, args.repeats), 3),
        "matmul_fp32_1024_s": round(timed(lambda: torch.mm(a, b), args.repeats * 4), 4),
    }
    result.update(bf16_report(args.repeats))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

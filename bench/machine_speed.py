"""How fast this machine is right now: a fixed CPU workload, timed, to put beside a wall time.

    python bench/machine_speed.py [--threads 2] [--repeats 5]

The development VM's speed drifts by tens of percent within an hour (the demo's identical
alignment steps took 5.3 s and 8 s apart; BENCHMARKS.md), so a demo time means little without
the machine's speed at that moment. Run this right before and after a timed run. The workload
is the demo's own kind of work: bfloat16-autocast forward and backward of a Llama block stack
of SmolLM2-135M's width on 4 x 160 tokens, plus a float32 matrix product. It prints the median
seconds of each; lower is faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime

import torch
from transformers import LlamaConfig, LlamaForCausalLM


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = smollm2_width_model(args.layers).train()
    ids = torch.randint(0, 49152, (4, 160), generator=torch.Generator().manual_seed(0))

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    result = {
        "when_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "train_step_s": round(timed(train_step, args.repeats), 3),
        "matmul_fp32_1024_s": round(timed(lambda: torch.mm(a, b), args.repeats * 4), 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

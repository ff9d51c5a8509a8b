"""What one GPU sustains on the workflow's three kinds of model work, for the cost estimate.

    python bench/gpu_throughput.py [--json out.json]

On a randomly initialised Llama-2-7B-shaped model (the paper's; no weights needed, the speed does
not depend on their values), in bfloat16 as the GPU jobs run:

- forward: the feature, robustness and search jobs (prompt batches, no LM head needed, here with
  it), in tokens/s and TFLOP/s at 2 x parameters FLOPs per token;
- train: one full fine-tuning step, float32 master weights, bfloat16 autocast, AdamW (as the
  trainer runs it), on the same shape cut to `--train-layers` layers so the Adam state fits
  one card (the per-token cost per layer is the same), TFLOP/s at 6 x parameters per token;
- generate: transformers `generate`, greedy, a batch of prompts, new tokens/s.

The measured TFLOP/s divided by the card's peak is the utilisation that
`bench/estimate_cost.py` uses to turn a config's FLOPs into GPU-hours.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
    ),
    # Only to check the script on a CPU: `--shape check --device cpu`.
    "check": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=4096,
    ),
}  # fmt: skip
DEVICE = "cuda"
SHAPE = "llama2-7b"


def build(layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, **SHAPES[SHAPE])
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, memory pooled
    synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - began) / repeats


def forward(layers: int, batch: int, seq: int) -> dict:
    empty_cache()  # the previous measurement's model is gone; return its memory
    model = build(layers, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch, seq), device=DEVICE)
    with torch.no_grad():
        seconds = timed(lambda: model(input_ids=ids, use_cache=False), 5)
    tokens = batch * seq
    params = n_params(model)
    return {
        "params": params, "batch": batch, "seq": seq, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "tflops": 2 * params * tokens / seconds / 1e12,
    }  # fmt: skip


def train(layers: int, batch: int, seq: int) -> dict:
    empty_cache()  # the previous measurement's model is gone; return its memory
    model = build(layers, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 32000, (batch, seq), device=DEVICE)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, 3)
    tokens = batch * seq
    params = n_params(model)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    return {
        "params": params, "layers": layers, "batch": batch, "seq": seq, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "tflops": 6 * params * tokens / seconds / 1e12,
        "peak_memory_gib": peak_gb,
    }  # fmt: skip


def generate(layers: int, batch: int, prompt: int, new: int) -> dict:
    empty_cache()  # the previous measurement's model is gone; return its memory
    model = build(layers, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch, prompt), device=DEVICE)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        seconds = timed(lambda: model.generate(input_ids=ids, **kwargs), 1)
    return {
        "batch": batch, "prompt_tokens": prompt, "new_tokens": new, "seconds": seconds,
        "new_tokens_per_s": batch * new / seconds,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="forward/generate (7B: 32)")
    parser.add_argument("--train-layers", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    args = parser.parse_args()
    global DEVICE, SHAPE
    DEVICE, SHAPE = args.device, args.shape
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu --shape check to try the script)")
    results = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "shape": SHAPE,
        "torch": torch.__version__,
        "forward": forward(args.layers, batch=16, seq=512),
        "train": train(args.train_layers, batch=8, seq=512),
        "generate": generate(args.layers, batch=64, prompt=128, new=128),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

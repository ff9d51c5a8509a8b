"""Fine-tuning speed on this CPU: ML-LR's step time over vanilla's, and our trainer vs HF `Trainer`.

Both comparisons run in one process on the same random Llama and the same batches, interleaved
(A, B, A, B, ...), so a busy machine slows both sides alike; medians of per-step times are
reported, as wall time and as this process's CPU time (the steadier one when other jobs share
the cores). The first step of each side is a warm-up and is not counted.

    python bench/finetune_bench.py --layers 6 --steps 6 --out bench/finetune_bench.json

The model is a random Llama of SmolLM2-135M's width (hidden 576, intermediate 1536, 9 heads,
3 kv heads, vocab 49152) with fewer layers (default 6 of 30) so a run takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from securetune.finetune.distributed import Dist
from securetune.finetune.sft_data import IGNORE
from securetune.finetune.train import train_step
from securetune.io import versions
from securetune.param_groups import groups_for_arm
from securetune.settings import TrainConfig


def random_model(layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def random_examples(
    n: int, length: int, prompt: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """Equal-length examples (no padding, so HF's default collator sees the same tensors)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 49152, (length,), generator=gen).tolist()
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def config(kind: str, steps: int, batch: int) -> TrainConfig:
    return TrainConfig(
        arm=kind, kind=kind, lr=1e-4, gamma=0.1, steps=steps, batch_size=batch,
        warmup_ratio=0.0, schedule="linear", max_seq_len=4096, weight_decay=0.0,
        grad_clip=1.0, seed=0,
    )  # fmt: skip


class Ours:
    """Our step (the one `securetune.finetune.train` runs) on one arm's model and optimizer."""

    def __init__(self, kind: str, layers: int, robust: set[str], steps: int, batch: int):
        self.model = random_model(layers, seed=0).train()
        self.cfg = config(kind, steps, batch)
        groups = groups_for_arm(self.model, kind, self.cfg.lr, self.cfg.gamma, robust)
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "param_names"} for g in groups], weight_decay=0.0
        )
        self.step = 0

    def run(self, examples, indices) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        began, cpu = time.perf_counter(), time.process_time()
        train_step(
            self.step, indices, self.model, self.optimizer, self.base_lrs, examples, self.cfg,
            Dist(), 0, set(),
        )  # fmt: skip
        self.step += 1
        return time.perf_counter() - began, time.process_time() - cpu


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.began, self.cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((time.perf_counter() - self.began, time.process_time() - self.cpu))


def hf_trainer_times(
    model, examples, batch: int, steps: int, out: Path
) -> list[tuple[float, float]]:
    """Per-step times of transformers' Trainer on the same model, batches and optimizer."""
    data = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        for ids, labels in examples[: batch * steps]
    ]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", logging_steps=10**6, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    timer = StepTimes()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[timer]).train()
    return timer.times


def medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and CPU seconds per step."""
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="steps per side and round")
    parser.add_argument("--rounds", type=int, default=2, help="HF Trainer vs ours rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/finetune_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    examples = random_examples(args.batch * args.steps, args.seq, args.seq // 4, seed=0)
    batches = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.steps)]
    tokens_per_step = args.batch * args.seq

    # 1. ML-LR vs vanilla: half the modules robust (two groups of similar size), interleaved.
    robust = {f"L{layer}.{m}" for layer in range(args.layers) for m in ("q", "k", "v", "gate")}
    vanilla = Ours("vanilla", args.layers, set(), args.steps, args.batch)
    ml_lr = Ours("ml_lr", args.layers, robust, args.steps, args.batch)
    times: dict[str, list[tuple[float, float]]] = {"vanilla": [], "ml_lr": []}
    for indices in batches:
        times["vanilla"].append(vanilla.run(examples, indices))
        times["ml_lr"].append(ml_lr.run(examples, indices))
    del vanilla, ml_lr
    (wall_v, cpu_v), (wall_m, cpu_m) = (medians(times[k][1:]) for k in ("vanilla", "ml_lr"))

    # 2. Ours vs HF Trainer, rounds interleaved, each on a fresh copy of the same model.
    ours_times: list[tuple[float, float]] = []
    hf_times: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        ours = Ours("vanilla", args.layers, set(), args.steps, args.batch)
        ours_times += [ours.run(examples, i) for i in batches][1:]
        del ours
        model = random_model(args.layers, seed=0)
        hf_times += hf_trainer_times(
            model, examples, args.batch, args.steps, Path(tempfile.mkdtemp(prefix="hf_bench_"))
        )[1:]
    (wall_o, cpu_o), (wall_h, cpu_h) = medians(ours_times), medians(hf_times)

    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "model": f"random Llama, SmolLM2-135M width, {args.layers} layers, vocab 49152",
        "batch": f"{args.batch} x {args.seq} tokens (prompt quarter masked)",
        "steps_per_side": args.steps,
        "vanilla_step_s": {"wall": round(wall_v, 3), "cpu": round(cpu_v, 3)},
        "ml_lr_step_s": {"wall": round(wall_m, 3), "cpu": round(cpu_m, 3)},
        "ml_lr_overhead": {
            "wall": round(wall_m / wall_v - 1, 4),
            "cpu": round(cpu_m / cpu_v - 1, 4),
        },
        "ours_tokens_per_s": {
            "wall": round(tokens_per_step / wall_o, 1),
            "cpu": round(tokens_per_step / cpu_o, 1),
        },
        "hf_trainer_tokens_per_s": {
            "wall": round(tokens_per_step / wall_h, 1),
            "cpu": round(tokens_per_step / cpu_h, 1),
        },
        "ours_over_hf": {"wall": round(wall_h / wall_o, 3), "cpu": round(cpu_h / cpu_o, 3)},
        "step_times_s_wall_cpu": {
            "vanilla": times["vanilla"],
            "ml_lr": times["ml_lr"],
            "ours": ours_times,
            "hf_trainer": hf_times,
        },
        "versions": versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "step_times_s_wall_cpu"}, indent=2))


if __name__ == "__main__":
    main()

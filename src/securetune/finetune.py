"""Stage 6: benign instruction fine-tuning of one arm, with per-module learning rates.

Run as a module so the workflow can launch it with torchrun:
    python -m securetune.finetune --model DIR --data ift.parquet --arm-config '{...}' ...
The arms differ only in their optimizer groups (see `param_groups`): same data, order, steps,
schedule and seed, so any difference in safety comes from the learning rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from securetune.config import TrainConfig
from securetune.io import atomic_dir, setup_logging, versions, write_parquet
from securetune.models import chat_example, load_model, load_tokenizer
from securetune.param_groups import groups_for_arm

log = logging.getLogger(__name__)
IGNORE = -100


def encode_examples(
    tokenizer, prompts: list[str], responses: list[str], max_seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; the prompt part is masked so loss is on the response only.

    Prompt and response are tokenized apart and joined, so the mask boundary is exact.
    """
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        head, full = chat_example(tokenizer, prompt, response)
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        tail_ids = tokenizer(full[len(head) :], add_special_tokens=False).input_ids
        ids = (head_ids + tail_ids)[:max_seq_len]
        labels = ([IGNORE] * len(head_ids) + tail_ids)[:max_seq_len]
        out.append((ids, labels))
    return out


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch (padding rather than packing keeps examples independent)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of each step: a fresh seeded permutation per epoch, the same for all arms."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def lr_factor(step: int, steps: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of every group's base lr, so the ratio between groups holds at every step."""
    warmup = int(round(warmup_ratio * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{schedule}'; allowed: constant, linear, cosine")


def _masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE)


def train(
    model_dir: Path,
    data: pd.DataFrame,
    cfg: TrainConfig,
    robust: set[str],
    out_dir: Path,
    dtype: str = "float32",
) -> pd.DataFrame:
    """Fine-tune one arm; save the model to `out_dir`; return the per-step log."""
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype)
    model.train()
    groups = groups_for_arm(model, cfg.kind, cfg.lr, cfg.gamma, robust)
    for g in groups:
        log.info(
            "group %-7s lr=%.3g  %d tensors, %d parameters",
            g["name"],
            g["lr"],
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
        )
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups],
        weight_decay=cfg.weight_decay,
    )
    examples = encode_examples(
        tokenizer, list(data["prompt"]), list(data["response"]), cfg.max_seq_len
    )
    rows = []
    start = time.perf_counter()
    for step, idx in enumerate(batch_order(len(examples), cfg.batch_size, cfg.steps, cfg.seed)):
        factor = lr_factor(step, cfg.steps, cfg.warmup_ratio, cfg.schedule)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = _masked_loss(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        row = {
            "step": step,
            "arm": cfg.arm,
            "loss": loss.item(),
            "tokens": int((batch["labels"] != IGNORE).sum()),
            "seed": cfg.seed,
        }
        for group in optimizer.param_groups:
            norm = torch.norm(
                torch.stack([p.grad.norm() for p in group["params"] if p.grad is not None])
            )
            row[f"lr_{group['name']}"] = group["lr"]
            row[f"grad_norm_{group['name']}"] = norm.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        rows.append(row)
        if step % 10 == 0 or step == cfg.steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, cfg.steps, row["loss"])
    log.info("trained %d steps in %.1f s", cfg.steps, time.perf_counter() - start)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "securetune_arm.json").write_text(
            json.dumps(
                {"arm": asdict(cfg), "robust_modules": sorted(robust), "versions": versions()},
                indent=2,
                sort_keys=True,
            )
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--data", type=Path, required=True, help="IFT set (Parquet)")
    parser.add_argument("--plan", type=Path, help="Mods_Robust plan (JSON); ml_lr arms only")
    parser.add_argument("--arm-config", required=True, help="the arm's settings as JSON")
    parser.add_argument("--out-model", type=Path, required=True)
    parser.add_argument("--out-log", type=Path, required=True, help="per-step log (Parquet)")
    parser.add_argument("--log-file", type=Path)
    args = parser.parse_args(argv)
    setup_logging(args.log_file)
    cfg = TrainConfig(**json.loads(args.arm_config))
    log.info("arm config: %s", cfg)
    robust: set[str] = set()
    if args.plan is not None:
        robust = set(json.loads(args.plan.read_text())["modules"])
    steps = train(args.model, pd.read_parquet(args.data), cfg, robust, args.out_model)
    write_parquet(steps, args.out_log)


if __name__ == "__main__":
    main()

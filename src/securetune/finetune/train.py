"""The training loop of one arm, top to bottom: the schedule, the optimizer, one step, the loop.

See the package docstring (`securetune.finetune`) for how a step is computed and why the loss
scaling keeps the gradient independent of the process count and the micro-batch size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import pandas as pd
import torch
import torch.distributed as dist

from securetune.finetune.checkpoints import (
    checkpoint_bytes,
    checkpoint_fingerprint,
    fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from securetune.finetune.deadline import (
    Deadline,
    StoppedBeforeTimeLimit,
    TimeLimit,
    checkpoint_estimate_s,
)
from securetune.finetune.distributed import (
    Dist,
    clip_gradients,
    group_squared_norms,
    init_distributed,
    leave_process_group,
    rank0_decides,
    sync_context,
    wrap_for_processes,
)
from securetune.finetune.loss import device_batch, summed_loss
from securetune.finetune.model_setup import prepare_model, save_model
from securetune.finetune.sft_data import (
    Example,
    batch_order,
    encode_examples,
    micro_batches,
    predicted_tokens,
    rank_share,
)
from securetune.models import load_tokenizer
from securetune.param_groups import groups_for_arm, held_groups, swat_switch_step
from securetune.precision import resolve_autocast
from securetune.settings import TrainConfig

log = logging.getLogger(__name__)


# --- schedule and optimizer ----------------------------------------------------------------------


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


def _log_groups(groups: list[dict]) -> None:
    for g in groups:
        log.info(
            "group %-7s lr=%.3g  %d tensors, %d parameters",
            g["name"],
            g["lr"],
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
        )


def build_optimizer(
    model: torch.nn.Module,
    model_type: str,
    cfg: TrainConfig,
    robust: set[str],
    env: Dist,
    fsdp: bool,
) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW over the arm's groups (the per-module learning rates), and each group's base lr."""
    groups = groups_for_arm(
        model, cfg.kind, cfg.lr, cfg.gamma, robust, cfg.other_params, model_type
    )
    if env.main:
        _log_groups(groups)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups],
        weight_decay=cfg.weight_decay,
        # One fused kernel per group: on CPU a fifth of the default's step time on the demo
        # model (BENCHMARKS.md). FSDP's sharded parameters keep the default implementation.
        fused=not fsdp,
    )
    return optimizer, [g["lr"] for g in groups]


def swat_switch(cfg: TrainConfig, env: Dist) -> int | None:
    """SWAT's switch step (None for the other kinds)."""
    switch = swat_switch_step(cfg.switch_at, cfg.steps) if cfg.kind == "swat" else None
    if switch is not None and env.main:
        log.info("swat: only Mods_Robust train for steps 0..%d, then all", switch - 1)
    return switch


# --- one step ------------------------------------------------------------------------------------


def set_learning_rates(
    optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float, held: set[str]
) -> None:
    """Every group at its base lr times the schedule's factor; a held group at 0."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = 0.0 if group["name"] in held else base * factor


def autocast_context(cfg: TrainConfig, env: Dist) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the job's device when the arm asks for it, else nothing (autocast
    refuses device types it does not know even when disabled)."""
    if cfg.autocast == "bfloat16":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss(
    wrapped: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, env: Dist
) -> torch.Tensor:
    """Summed response-token loss of one micro-batch, logits only where a response token is next."""
    with autocast_context(cfg, env):
        logits = wrapped(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=batch["positions"],
        ).logits
    # Outside autocast: the loss is taken in float32 whatever the forward pass ran in.
    return summed_loss(logits, batch["targets"])


def accumulate_gradients(
    indices: list[int],
    wrapped: torch.nn.Module,
    examples: list[Example],
    cfg: TrainConfig,
    env: Dist,
    pad_id: int,
) -> tuple[torch.Tensor, int]:
    """Backward over this rank's share of the global batch, micro-batch by micro-batch; return
    the global batch's summed loss (over every rank) and its response-token count."""
    global_tokens = sum(predicted_tokens(examples[i]) for i in indices)
    # Divided by the global count (every rank knows it), times N since DDP averages gradients.
    scale = env.world / max(1, global_tokens)
    share = rank_share(indices, env.rank, env.world)
    chunks = micro_batches(share, cfg.micro_batch_size, examples)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for k, chunk in enumerate(chunks):
        batch = device_batch([examples[i] for i in chunk], pad_id, env.device)
        with sync_context(wrapped, env, sync=k == len(chunks) - 1):
            summed = forward_loss(wrapped, batch, cfg, env)
            (summed * scale).backward()
        loss_sum += summed.detach().cpu().to(torch.float64)
    if env.active:
        dist.all_reduce(loss_sum)
    return loss_sum, global_tokens


def step_row(
    step: int,
    cfg: TrainConfig,
    loss_sum: torch.Tensor,
    global_tokens: int,
    param_groups: list[dict],
    squares: torch.Tensor,
) -> dict:
    """The step's log row: the mean loss per response token, then each group's lr and norm."""
    row: dict = {
        "step": step,
        "arm": cfg.arm,
        "loss": float(loss_sum) / max(1, global_tokens),
        "tokens": global_tokens,
        "seed": cfg.seed,
    }
    for group, square in zip(param_groups, squares.tolist(), strict=True):
        row[f"lr_{group['name']}"] = group["lr"]
        row[f"grad_norm_{group['name']}"] = math.sqrt(square)
    return row


def drop_held_gradients(param_groups: list[dict], held: set[str]) -> None:
    """Remove the held groups' gradients: AdamW skips a parameter without gradient, so neither
    its moments nor weight decay move it."""
    for group in param_groups:
        if group["name"] in held:
            for p in group["params"]:
                p.grad = None


def train_step(
    step: int,
    indices: list[int],
    wrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    base_lrs: list[float],
    examples: list[Example],
    cfg: TrainConfig,
    env: Dist,
    pad_id: int,
    held: set[str],
) -> dict:
    """One optimizer step on the global batch `indices`; returns its log row."""
    factor = lr_factor(step, cfg.steps, cfg.warmup_ratio, cfg.schedule)
    set_learning_rates(optimizer, base_lrs, factor, held)
    optimizer.zero_grad(set_to_none=True)
    loss_sum, global_tokens = accumulate_gradients(indices, wrapped, examples, cfg, env, pad_id)
    squares = group_squared_norms(
        optimizer.param_groups, sharded=cfg.distributed == "fsdp" and env.active
    )
    row = step_row(step, cfg, loss_sum, global_tokens, optimizer.param_groups, squares)
    drop_held_gradients(optimizer.param_groups, held)
    if cfg.grad_clip > 0:
        clip_gradients(optimizer.param_groups, squares, cfg.grad_clip)
    optimizer.step()
    return row


# --- the loop ------------------------------------------------------------------------------------


# How to treat a checkpoint left by an earlier attempt: no (ignore it), strict (resume; one
# written for other settings is an error), matching (resume one written for these settings;
# one written for other settings can never be resumed, so it is deleted: the workflow's mode).
RESUME_MODES: tuple[str, ...] = ("no", "strict", "matching")


def resume_from(
    checkpoint_dir: Path | None,
    resume: str,
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stamp: str,
    env: Dist,
    fsdp: bool,
) -> tuple[int, list[dict]]:
    """(first step, per-step log so far): from the latest checkpoint when resuming, else (0, [])."""
    if resume not in RESUME_MODES:
        raise ValueError(f"resume '{resume}': allowed {list(RESUME_MODES)}")
    if resume == "no" or checkpoint_dir is None:
        return 0, []
    last = latest_checkpoint(checkpoint_dir)
    if last is not None and resume == "matching" and checkpoint_fingerprint(last) != stamp:
        if env.main:
            log.warning("%s was written for other settings: deleted, starting from step 0", last)
            shutil.rmtree(checkpoint_dir)
        if env.active:
            dist.barrier()
        last = None
    if last is not None:
        return load_checkpoint(last, wrapped, model, optimizer, stamp, env, fsdp)
    if env.main:
        log.info("no checkpoint in %s: starting from step 0", checkpoint_dir)
    return 0, []


def checkpoint_due(cfg: TrainConfig, done: int) -> bool:
    """A checkpoint every `checkpoint_every` steps, but not after the last (the model is saved)."""
    every = cfg.checkpoint_every
    return bool(every) and done % every == 0 and done < cfg.steps


def job_deadline(
    time_limit: TimeLimit | None,
    model: torch.nn.Module,
    cfg: TrainConfig,
    checkpoint_dir: Path | None,
    env: Dist,
) -> Deadline:
    """Rank 0's deadline, its job's time limit, when it has one and writes checkpoints (stopping
    without one would only lose the steps done); unlimited on the other ranks (rank 0 decides)."""
    if time_limit is None or not env.main or checkpoint_dir is None or not cfg.checkpoint_every:
        return Deadline.unlimited()
    deadline = time_limit.deadline(checkpoint_estimate_s(checkpoint_bytes(model)))
    if deadline.limited:
        log.info(
            "the job has %.0f s left: training stops with a checkpoint once the time left is "
            "under %.1f x (its slowest step + a checkpoint write, %.0f s until one is timed) "
            "+ %.0f s",
            deadline.time_left(), deadline.safety, deadline.checkpoint_s(), deadline.floor_s,
        )  # fmt: skip
    return deadline


def stop_before_time_limit(done: int, deadline: Deadline, env: Dist) -> NoReturn:
    """Say why (rank 0), leave the process group and raise `StoppedBeforeTimeLimit`."""
    left = deadline.time_left()
    if env.main:
        log.warning(
            "stopping before the time limit after step %d (time left %.0f s); a retry resumes "
            "from this checkpoint",
            done, left,
        )  # fmt: skip
    leave_process_group(env)
    raise StoppedBeforeTimeLimit(done, left)


def finish(checkpoint_dir: Path | None, keep_checkpoints: bool, env: Dist) -> None:
    """Delete the checkpoints (unless kept) once the model is saved, and leave the process group."""
    if checkpoint_dir is not None and not keep_checkpoints and env.main and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    leave_process_group(env)


def train(
    model_dir: Path,
    data: pd.DataFrame,
    cfg: TrainConfig,
    robust: set[str],
    out_dir: Path,
    dtype: str = "float32",
    checkpoint_dir: Path | None = None,
    resume: bool | str = False,
    keep_checkpoints: bool = False,
    save_dtype: str = "base",
    on_step: Callable[[int, dict], None] | None = None,
    keep_previous_checkpoint: bool = False,
    time_limit: TimeLimit | None = None,
) -> pd.DataFrame:
    """Fine-tune one arm; save the model to `out_dir`; return the per-step log.

    `on_step(step, row)` is called after every optimizer step (and its checkpoint), on every rank.
    `keep_previous_checkpoint`: a checkpoint replaces the previous one only once it is complete
    (twice the disk at the peak), instead of after deleting it. With `time_limit` (and
    checkpoints), training stops with a checkpoint when the job's time is about to run out and
    raises `StoppedBeforeTimeLimit` (`securetune.finetune.deadline`).
    """
    env = init_distributed()
    # `auto` becomes bfloat16 or none here, on the process's own hardware, before anything
    # (the checkpoint fingerprint, the saved arm config) records it.
    cfg = replace(cfg, autocast=resolve_autocast(cfg.autocast, key=f"autocast of arm {cfg.arm}"))
    fsdp = env.active and cfg.distributed == "fsdp"
    tokenizer = load_tokenizer(model_dir)
    model, model_type = prepare_model(model_dir, cfg, robust, dtype, env)
    wrapped = wrap_for_processes(model, cfg, env)
    optimizer, base_lrs = build_optimizer(model, model_type, cfg, robust, env, fsdp)
    examples = encode_examples(
        tokenizer, list(data["prompt"]), list(data["response"]), cfg.max_seq_len
    )
    order = batch_order(len(examples), cfg.batch_size, cfg.steps, cfg.seed)
    switch = swat_switch(cfg, env)
    stamp = fingerprint(cfg, robust)
    torch.manual_seed(cfg.seed)
    mode = ("strict" if resume else "no") if isinstance(resume, bool) else resume
    start, rows = resume_from(checkpoint_dir, mode, wrapped, model, optimizer, stamp, env, fsdp)
    deadline = job_deadline(time_limit, model, cfg, checkpoint_dir, env)
    # Known to every rank, so the per-step decision is broadcast only when there is one to make.
    watching = rank0_decides(deadline.limited, env)
    began, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        held = held_groups(cfg.kind, step, switch)
        with deadline.timing_step():
            row = train_step(
                step, order[step], wrapped, optimizer, base_lrs, examples, cfg, env,
                tokenizer.pad_token_id, held,
            )  # fmt: skip
        rows.append(row)
        tokens += row["tokens"]
        done = step + 1
        stop = watching and done < cfg.steps and rank0_decides(deadline.should_stop(), env)
        if checkpoint_dir is not None and (stop or checkpoint_due(cfg, done)):
            with deadline.timing_checkpoint():
                save_checkpoint(
                    checkpoint_dir, done, wrapped, model, optimizer, rows, stamp, env, fsdp,
                    keep_previous_checkpoint,
                )  # fmt: skip
        if env.main and (step % 10 == 0 or done == cfg.steps):
            log.info("step %d/%d loss %.4f", done, cfg.steps, row["loss"])
        if on_step is not None:
            on_step(step, row)
        if stop:
            stop_before_time_limit(done, deadline, env)
    seconds = time.perf_counter() - began
    if env.main:
        log.info(
            "trained steps %d..%d in %.1f s (%.0f response tokens/s over %d process(es))",
            start, cfg.steps, seconds, tokens / max(seconds, 1e-9), env.world,
        )  # fmt: skip
    save_model(wrapped, model, tokenizer, cfg, robust, out_dir, env, model_dir, save_dtype)
    finish(checkpoint_dir, keep_checkpoints, env)
    return pd.DataFrame(rows)

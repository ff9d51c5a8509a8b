"""Stage 6: benign instruction fine-tuning of one arm, with per-module learning rates.

Run as a module so the workflow can launch it alone or under torchrun:
    python -m securetune.finetune --model DIR --data ift.parquet --arm-config '{...}' ...
    torchrun --standalone --nproc_per_node=N -m securetune.finetune ... [--resume]
The arms differ only in their optimizer groups (see `param_groups`): same data, order, steps,
schedule and seed, so any difference in safety comes from the learning rates.

How a step is computed, and why:
- Data: chat-templated (prompt, response) pairs, loss on the response tokens only. Examples are
  right-padded to the longest one in the micro-batch, not packed: packing would let an example
  attend to its neighbours unless the attention is masked per example, and padding keeps every
  example's loss independent of what it is batched with (so 1 process and N give the same loss).
- A step is one global batch of `batch_size` examples in a seeded order shared by every arm.
  Under torchrun each rank takes a contiguous 1/N of it, optionally in micro-batches. The loss is
  the sum of token losses divided by the global batch's response-token count (known to every
  rank from the data, so no extra communication), times N because DDP averages gradients: the
  gradient is the single-process one whatever N and the micro-batch size.
- The learning rate of every group is its base rate times one schedule factor (warm-up, then
  constant, linear or cosine decay), so the ratio between groups holds at every step. SWAT's
  `rest` group is held (rate 0, gradient dropped before the update, so neither Adam's moments nor
  weight decay touch it) before its switch step, then follows the same schedule as everything else.
- Checkpoints (every `checkpoint_every` steps): the trainable parameters, the optimizer state,
  every rank's RNG state, the step and the per-step log so far, written to a temporary folder and
  renamed into place, so a kill never leaves a half checkpoint. `--resume` continues from the
  latest one; the schedule is a pure function of the step, so the step is its whole state.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from securetune.architectures import architecture
from securetune.config import LoraSettings, TrainConfig
from securetune.io import (
    atomic_dir,
    batches_by_length,
    provenance,
    setup_logging,
    versions,
    write_parquet,
)
from securetune.models import chat_example, load_model, load_tokenizer, write_derived_policy
from securetune.param_groups import (
    KINDS_WITH_PLAN,
    freeze_for_arm,
    groups_for_arm,
    held_groups,
    swat_switch_step,
)

log = logging.getLogger(__name__)
IGNORE = -100
Example = tuple[list[int], list[int]]


# --- data ----------------------------------------------------------------------------------------


def encode_examples(
    tokenizer, prompts: list[str], responses: list[str], max_seq_len: int
) -> list[Example]:
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


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
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


def predicted_tokens(example: Example) -> int:
    """Response tokens the loss is taken on (every label but the first is predicted)."""
    return sum(1 for label in example[1][1:] if label != IGNORE)


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of each step: a fresh seeded permutation per epoch, the same for all arms."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def rank_share(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous slice of the global batch (equal slices, so DDP's mean is exact)."""
    if len(indices) % world:
        raise ValueError(
            f"finetune.batch_size {len(indices)} is not divisible by the {world} processes"
        )
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]


def micro_batches(
    indices: list[int], micro_batch_size: int, examples: list[Example]
) -> list[list[int]]:
    """Split a rank's share into forward passes of at most `micro_batch_size` (0: one pass).

    Examples of similar length share a pass, so a short refusal is not padded to the length of
    a long answer; the step's loss is a sum over examples, so the grouping does not change it.
    """
    return batches_by_length(
        indices, lambda i: len(examples[i][0]), micro_batch_size or len(indices)
    )


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


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the labels shifted left, padded by one IGNORE.

    The labels are shifted, not the logits: slicing the logits would copy the largest tensor of
    the step (batch x length x vocabulary).
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, their next-token labels): the sequence positions whose next token is a
    response token in some row of the batch. Only these need logits: the vocabulary projection
    and its float32 softmax are a large share of a small model's step, and prompt and padding
    positions carry no loss."""
    shifted = next_token_labels(labels)
    positions = (shifted != IGNORE).any(dim=0).nonzero().squeeze(1)
    return positions, shifted[:, positions]


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the next-token losses on response tokens, in float32; `targets` are
    the next-token labels of the positions the logits were computed at (`response_positions`)."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


@torch.no_grad()
def example_losses(
    model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """(summed loss, predicted tokens) of each example's response, in float32 and in the given
    order: the training objective measured on examples no stage trains on (the held-out IFT
    loss). Batches group examples of similar length, which changes no example's loss."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[int, tuple[float, int]] = {}
    for indices in batches_by_length(
        range(len(examples)), lambda i: len(examples[i][0]), batch_size
    ):
        batch = [examples[i] for i in indices]
        tensors = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
        positions, targets = response_positions(tensors["labels"])
        logits = model(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            logits_to_keep=positions,
        ).logits
        per_token = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        for row, (i, example) in enumerate(zip(indices, batch, strict=True)):
            out[i] = (float(per_token[row].sum()), predicted_tokens(example))
    return [out[i] for i in range(len(examples))]


# --- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> Dist:
    """Join the torchrun process group (nccl on GPUs, gloo on CPU); a no-op when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    env = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
    return env


def add_lora(model: torch.nn.Module, model_type: str, lora: LoraSettings) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters on the chosen module types of every layer."""
    from peft import LoraConfig, get_peft_model

    _, paths = architecture(model_type)
    targets = sorted({paths[t].rsplit(".", 1)[-1] for t in lora.module_types})
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def wrap_for_processes(model: torch.nn.Module, cfg: TrainConfig, env: Dist) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder layer, then the root), under torchrun.

    Both keep the parameters' names (FSDP2 swaps each parameter for a DTensor in place), so the
    name-based groups are built from the unwrapped model after wrapping, the same as alone.
    """
    if not env.active:
        return model
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


def _sync_context(
    wrapped: torch.nn.Module, env: Dist, sync: bool
) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not env.active:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(sync)  # FSDP2
    return contextlib.nullcontext()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def group_squared_norms(param_groups: list[dict], sharded: bool) -> torch.Tensor:
    """Squared L2 norm of each group's gradient (summed over the shards under FSDP)."""
    squares = []
    for group in param_groups:
        grads = [_local(p.grad) for p in group["params"] if p.grad is not None]
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        squares.append(torch.stack(norms).square().sum() if norms else torch.zeros(()))
    total = torch.stack(squares).to(torch.float64)
    if sharded:
        dist.all_reduce(total)
    return total


def clip_gradients(param_groups: list[dict], squares: torch.Tensor, max_norm: float) -> None:
    """Scale the live gradients so their joint norm is at most `max_norm`, as torch's
    `clip_grad_norm_` does, reusing the groups' norms instead of computing them again."""
    live: list[torch.Tensor] = []
    total = 0.0
    for group, square in zip(param_groups, squares.tolist(), strict=True):
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if grads:  # a held group (SWAT before the switch) has none and does not count
            live += grads
            total += square
    coef = max_norm / (math.sqrt(total) + 1e-6)
    if live and coef < 1.0:
        torch._foreach_mul_(live, coef)


# --- checkpoints ---------------------------------------------------------------------------------


def fingerprint(cfg: TrainConfig, robust: set[str]) -> str:
    """What a checkpoint must match to be resumed (everything but how often to checkpoint)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}
    blob = json.dumps({"cfg": settings, "robust": sorted(robust)}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _full_state(
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    fsdp: bool,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Trainable parameters and optimizer state, unsharded (a collective under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(wrapped, options=options)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        params = {n: t.contiguous() for n, t in full.items() if n in trainable}
        return params, get_optimizer_state_dict(wrapped, optimizer, options=options)
    params = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    return params, optimizer.state_dict()


def save_checkpoint(
    root: Path,
    step: int,
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: list[dict],
    stamp: str,
    env: Dist,
    fsdp: bool,
) -> None:
    """Write `root/step_{step}` atomically (rank 0), then drop the older checkpoints."""
    params, optim_state = _full_state(wrapped, model, optimizer, fsdp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng]
    if env.active:
        rngs = [None] * env.world
        dist.all_gather_object(rngs, rng)
    if env.main:
        with atomic_dir(root / f"step_{step:08d}") as tmp:
            save_file(params, tmp / "trainable.safetensors")
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "state.json").write_text(
                # Keys in their order, so a resumed log has the columns of an uninterrupted one.
                json.dumps({"step": step, "fingerprint": stamp, "rows": rows})
            )
        for old in sorted(root.glob("step_*"))[:-1]:
            shutil.rmtree(old)
        log.info("checkpoint after step %d in %s", step, root)
    if env.active:
        dist.barrier()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones are hidden temporary folders)."""
    found = sorted(root.glob("step_*")) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stamp: str,
    env: Dist,
    fsdp: bool,
) -> tuple[int, list[dict]]:
    """Restore parameters, optimizer and RNG; return (steps done, per-step log so far)."""
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != stamp:
        raise ValueError(
            f"checkpoint '{path}' was written for other settings (fingerprint "
            f"{state['fingerprint']}, now {stamp}); delete it or run without --resume"
        )
    params = load_file(path / "trainable.safetensors")
    optim_state = torch.load(path / "optimizer.pt", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(wrapped, params, options=options)
        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=options)
    else:
        named = dict(model.named_parameters())
        missing = sorted(n for n, p in named.items() if p.requires_grad and n not in params)
        if missing:
            raise ValueError(f"checkpoint '{path}' lacks trainable parameter(s) {missing[:3]}")
        with torch.no_grad():
            for name, tensor in params.items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(optim_state)
    rngs = torch.load(path / "rng.pt", weights_only=True)
    rng = rngs[env.rank] if env.rank < len(rngs) else rngs[0]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return state["step"], state["rows"]


# --- training ------------------------------------------------------------------------------------


def prepare_model(
    model_dir: Path, cfg: TrainConfig, robust: set[str], dtype: str, env: Dist
) -> tuple[torch.nn.Module, str]:
    """Load the model, add LoRA adapters if asked, freeze what the arm never trains."""
    model = load_model(model_dir, dtype=dtype)
    model_type = str(model.config.model_type)
    torch.manual_seed(cfg.seed)  # LoRA's initial adapters: the same in every arm and rank
    if cfg.method == "lora":
        model = add_lora(model, model_type, cfg.lora)
    frozen = freeze_for_arm(model, model_type, cfg.kind, robust, cfg.other_params)
    if env.main:
        log.info("arm %s (%s, %s): %d tensors frozen", cfg.arm, cfg.kind, cfg.method, len(frozen))
    model.to(env.device)
    model.train()
    return model, model_type


def _log_groups(groups: list[dict]) -> None:
    for g in groups:
        log.info(
            "group %-7s lr=%.3g  %d tensors, %d parameters",
            g["name"],
            g["lr"],
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
        )


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
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = 0.0 if group["name"] in held else base * factor
    global_tokens = sum(predicted_tokens(examples[i]) for i in indices)
    scale = env.world / max(1, global_tokens)
    share = rank_share(indices, env.rank, env.world)
    chunks = micro_batches(share, cfg.micro_batch_size, examples)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for k, chunk in enumerate(chunks):
        batch = {
            key: t.to(env.device)
            for key, t in collate([examples[i] for i in chunk], pad_id).items()
        }
        positions, targets = response_positions(batch["labels"])
        with _sync_context(wrapped, env, sync=k == len(chunks) - 1):
            with torch.autocast(
                env.device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bfloat16"
            ):
                logits = wrapped(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    logits_to_keep=positions,
                ).logits
            summed = summed_loss(logits, targets)
            (summed * scale).backward()
        loss_sum += summed.detach().cpu().to(torch.float64)
    if env.active:
        dist.all_reduce(loss_sum)
    row: dict = {
        "step": step,
        "arm": cfg.arm,
        "loss": float(loss_sum) / max(1, global_tokens),
        "tokens": global_tokens,
        "seed": cfg.seed,
    }
    squares = group_squared_norms(
        optimizer.param_groups, sharded=cfg.distributed == "fsdp" and env.active
    )
    for group, square in zip(optimizer.param_groups, squares.tolist(), strict=True):
        row[f"lr_{group['name']}"] = group["lr"]
        row[f"grad_norm_{group['name']}"] = math.sqrt(square)
        if group["name"] in held:
            for p in group["params"]:
                p.grad = None  # AdamW skips a parameter without gradient: no moments, no decay
    if cfg.grad_clip > 0:
        clip_gradients(optimizer.param_groups, squares, cfg.grad_clip)
    optimizer.step()
    return row


def save_model(
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer,
    cfg: TrainConfig,
    robust: set[str],
    out_dir: Path,
    env: Dist,
    parent: Path,
) -> None:
    """Save a plain HF folder (LoRA merged into the weights) that every later stage can load,
    under the loading policy of the `parent` model it was trained from."""
    state = None
    if env.active and cfg.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(wrapped, options=options)
    if env.main:
        target = model.merge_and_unload() if cfg.method == "lora" else model
        with atomic_dir(out_dir) as tmp:
            target.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            tokenizer.save_pretrained(tmp)
            (tmp / "securetune_arm.json").write_text(
                json.dumps(
                    {"arm": asdict(cfg), "robust_modules": sorted(robust), "versions": versions()},
                    indent=2,
                    sort_keys=True,
                )
            )
            write_derived_policy(tmp, parent)
    if env.active:
        dist.barrier()


def train(
    model_dir: Path,
    data: pd.DataFrame,
    cfg: TrainConfig,
    robust: set[str],
    out_dir: Path,
    dtype: str = "float32",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> pd.DataFrame:
    """Fine-tune one arm; save the model to `out_dir`; return the per-step log.

    `on_step(step, row)` is called after every optimizer step (and its checkpoint), on every rank.
    """
    env = init_distributed()
    fsdp = env.active and cfg.distributed == "fsdp"
    tokenizer = load_tokenizer(model_dir)
    model, model_type = prepare_model(model_dir, cfg, robust, dtype, env)
    wrapped = wrap_for_processes(model, cfg, env)
    groups = groups_for_arm(
        model, cfg.kind, cfg.lr, cfg.gamma, robust, cfg.other_params, model_type
    )
    if env.main:
        _log_groups(groups)
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups],
        weight_decay=cfg.weight_decay,
        # One fused kernel per group: on CPU a fifth of the default's step time on the demo
        # model (BENCHMARKS.md). FSDP's sharded parameters keep the default implementation.
        fused=not fsdp,
    )
    examples = encode_examples(
        tokenizer, list(data["prompt"]), list(data["response"]), cfg.max_seq_len
    )
    order = batch_order(len(examples), cfg.batch_size, cfg.steps, cfg.seed)
    switch = swat_switch_step(cfg.switch_at, cfg.steps) if cfg.kind == "swat" else None
    if switch is not None and env.main:
        log.info("swat: only Mods_Robust train for steps 0..%d, then all", switch - 1)
    stamp = fingerprint(cfg, robust)
    torch.manual_seed(cfg.seed)
    start, rows = 0, []
    if resume and checkpoint_dir is not None and (last := latest_checkpoint(checkpoint_dir)):
        start, rows = load_checkpoint(last, wrapped, model, optimizer, stamp, env, fsdp)
    elif resume and env.main:
        log.info("no checkpoint in %s: starting from step 0", checkpoint_dir)
    began, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        held = held_groups(cfg.kind, step, switch)
        row = train_step(
            step, order[step], wrapped, optimizer, base_lrs, examples, cfg, env,
            tokenizer.pad_token_id, held,
        )  # fmt: skip
        rows.append(row)
        tokens += row["tokens"]
        done = step + 1
        every = cfg.checkpoint_every
        if checkpoint_dir is not None and every and done % every == 0 and done < cfg.steps:
            save_checkpoint(checkpoint_dir, done, wrapped, model, optimizer, rows, stamp, env, fsdp)
        if env.main and (step % 10 == 0 or done == cfg.steps):
            log.info("step %d/%d loss %.4f", done, cfg.steps, row["loss"])
        if on_step is not None:
            on_step(step, row)
    seconds = time.perf_counter() - began
    if env.main:
        log.info(
            "trained steps %d..%d in %.1f s (%.0f response tokens/s over %d process(es))",
            start, cfg.steps, seconds, tokens / max(seconds, 1e-9), env.world,
        )  # fmt: skip
    save_model(wrapped, model, tokenizer, cfg, robust, out_dir, env, model_dir)
    if checkpoint_dir is not None and not keep_checkpoints and env.main and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    if env.active:
        dist.barrier()
        dist.destroy_process_group()
    return pd.DataFrame(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--data", type=Path, required=True, help="IFT set (Parquet)")
    parser.add_argument("--plan", type=Path, help="Mods_Robust plan (JSON); arms but vanilla")
    parser.add_argument("--arm-config", required=True, help="the arm's settings as JSON")
    parser.add_argument("--out-model", type=Path, required=True)
    parser.add_argument("--out-log", type=Path, required=True, help="per-step log (Parquet)")
    parser.add_argument("--log-file", type=Path)
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="where checkpoints go (default: <out-model>.checkpoints); deleted after success",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint, if any"
    )
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the last checkpoint after success"
    )
    parser.add_argument(
        "--dtype", default="float32", help="weights' dtype while training (float32: exact)"
    )
    return parser


def main(argv: list[str] | None = None, on_step: Callable[[int, dict], None] | None = None) -> None:
    args = _parser().parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # Only rank 0 writes the log file; the others report warnings to stderr.
    setup_logging(
        args.log_file if main_rank else None, logging.INFO if main_rank else logging.WARNING
    )
    cfg = TrainConfig(**json.loads(args.arm_config))
    if main_rank:
        log.info("arm config: %s", cfg)
    robust: set[str] = set()
    if cfg.kind in KINDS_WITH_PLAN and args.plan is None:
        raise SystemExit(f"arm '{cfg.arm}' of kind {cfg.kind} needs --plan (Mods_Robust)")
    if args.plan is not None:
        robust = set(json.loads(args.plan.read_text())["modules"])
    checkpoint_dir = args.checkpoint_dir or args.out_model.with_name(
        args.out_model.name + ".checkpoints"
    )
    steps = train(
        args.model,
        pd.read_parquet(args.data),
        cfg,
        robust,
        args.out_model,
        dtype=args.dtype,
        checkpoint_dir=checkpoint_dir,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        on_step=on_step,
    )
    if main_rank:
        write_parquet(steps, args.out_log, provenance(cfg.seed, args.model))


if __name__ == "__main__":
    main()

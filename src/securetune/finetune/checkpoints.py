"""Resumable checkpoints: the trainable parameters, the optimizer state, every rank's RNG state,
the step and the per-step log so far, written atomically so a kill never leaves half of one.

A new checkpoint replaces the previous one. A full-state checkpoint cannot be both always
present and below twice its size on disk, so the caller chooses (`keep_previous`): delete the
previous one just before writing (the peak is one checkpoint; a kill during the write leaves
none, and the retry starts from step 0), or keep it until the new one is complete (the peak is
two; there is always one to resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from securetune.finetune.distributed import Dist
from securetune.io import atomic_dir
from securetune.settings import TrainConfig

log = logging.getLogger(__name__)


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


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """A checkpoint's size: the trainable parameters and AdamW's two moments of each (the RNG
    state and the log are small beside them)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def clear_checkpoints(root: Path, keep: Path | None = None) -> None:
    """Delete every checkpoint in `root` but `keep`, and any half-written one: the hidden
    temporary folder of a write that was killed would never be resumed, nor replaced."""
    # Only the names checkpoints are written under: the folder may be one a user named.
    found = [*root.glob("step_*"), *root.glob(".step_*.tmp")] if root.is_dir() else []
    for path in sorted(found):
        if path != keep:
            shutil.rmtree(path)


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
    keep_previous: bool = False,
) -> None:
    """Write `root/step_{step}` atomically (rank 0) in place of the previous checkpoint: deleted
    just before the write, or with `keep_previous` only once the new one is complete."""
    params, optim_state = _full_state(wrapped, model, optimizer, fsdp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng]
    if env.active:
        rngs = [None] * env.world
        dist.all_gather_object(rngs, rng)
    if env.main:
        target = root / f"step_{step:08d}"
        # Only now, with the state gathered, so an error while gathering it leaves the
        # previous checkpoint in place.
        clear_checkpoints(root, keep=latest_checkpoint(root) if keep_previous else None)
        with atomic_dir(target) as tmp:
            save_file(params, tmp / "trainable.safetensors")
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "state.json").write_text(
                # Keys in their order, so a resumed log has the columns of an uninterrupted one.
                json.dumps({"step": step, "fingerprint": stamp, "rows": rows})
            )
        clear_checkpoints(root, keep=target)
        log.info("checkpoint after step %d in %s", step, root)
    if env.active:
        dist.barrier()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones are hidden temporary folders)."""
    found = sorted(root.glob("step_*")) if root.is_dir() else []
    return found[-1] if found else None


def checkpoint_fingerprint(path: Path) -> str:
    """The settings' fingerprint a checkpoint was written under."""
    return json.loads((path / "state.json").read_text())["fingerprint"]


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

"""The arm's model in and out: load it, add LoRA adapters, freeze what the arm never trains; save
a plain model folder (adapters merged) that every later stage can load."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from securetune.architectures import architecture
from securetune.finetune.distributed import Dist
from securetune.io import atomic_dir, versions
from securetune.models import load_model, write_derived_policy
from securetune.param_groups import freeze_for_arm
from securetune.precision import detect
from securetune.settings import LoraSettings, TrainConfig

log = logging.getLogger(__name__)


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


def prepare_model(
    model_dir: Path, cfg: TrainConfig, robust: set[str], dtype: str, env: Dist
) -> tuple[torch.nn.Module, str]:
    """Load the model, add LoRA adapters if asked, freeze what the arm never trains."""
    model = load_model(model_dir, dtype=dtype, device=env.device)
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


# What an arm's weights can be saved in (finetune.save_dtype): base is the source's own.
SAVED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
SAVE_DTYPES: tuple[str, ...] = ("base", *SAVED_DTYPES)


def checkpoint_dtype(folder: Path) -> str:
    """The dtype a model folder's weights are published in (config.json), float32 if unsaid."""
    config = json.loads((Path(folder) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in SAVED_DTYPES:
        raise ValueError(f"{folder}/config.json: dtype '{dtype}' is not one to save arms in")
    return dtype


def save_model(
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer,
    cfg: TrainConfig,
    robust: set[str],
    out_dir: Path,
    env: Dist,
    parent: Path,
    save_dtype: str = "base",
) -> None:
    """Save a plain HF folder (LoRA merged into the weights) that every later stage can load,
    under the loading policy of the `parent` model it was trained from, in `save_dtype` (base:
    the parent's checkpoint dtype). The end of training: the model is cast in place."""
    dtype = getattr(torch, checkpoint_dtype(parent) if save_dtype == "base" else save_dtype)
    state = None
    if env.active and cfg.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(wrapped, options=options)
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    if env.main:
        target = model.merge_and_unload() if cfg.method == "lora" else model
        target.to(dtype)
        with atomic_dir(out_dir) as tmp:
            target.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            tokenizer.save_pretrained(tmp)
            (tmp / "securetune_arm.json").write_text(
                json.dumps(
                    {
                        "arm": asdict(cfg),
                        "robust_modules": sorted(robust),
                        "versions": versions(),
                        "precision": detect().record(),
                    },
                    indent=2,
                    sort_keys=True,
                )
            )
            write_derived_policy(tmp, parent)
    if env.active:
        dist.barrier()

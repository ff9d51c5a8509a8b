"""The command line of one arm's fine-tuning, alone or under torchrun (see the package docstring):

python -m securetune.finetune --model DIR --data ift.parquet --arm-config '{...}' ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

import securetune.finetune
from securetune.finetune.deadline import (
    STOPPED_BEFORE_TIME_LIMIT,
    StoppedBeforeTimeLimit,
    TimeLimit,
)
from securetune.finetune.model_setup import SAVE_DTYPES
from securetune.finetune.train import RESUME_MODES, train
from securetune.io import provenance, setup_logging, write_parquet
from securetune.method import needs_plan
from securetune.settings import TrainConfig

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=securetune.finetune.__doc__.splitlines()[0])
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
        "--resume",
        nargs="?",
        const="strict",
        default="no",
        choices=RESUME_MODES,
        help="continue from the latest checkpoint, if any (--resume: strict, one written for "
        "other settings is an error; --resume matching: such a one is deleted, as the workflow "
        "runs it, so a retry after a time limit continues and a changed arm starts over)",
    )
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the last checkpoint after success"
    )
    parser.add_argument(
        "--keep-previous-checkpoint",
        action="store_true",
        help="delete the previous checkpoint only once the next is complete (twice the disk at "
        "the peak, never a moment without one); by default it is deleted just before the next is "
        "written, so a kill during that write leaves none",
    )
    parser.add_argument(
        "--stop-before-time-limit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="in a SLURM job with a time limit, and with checkpoints, stop with a checkpoint "
        f"before the limit and exit with code {STOPPED_BEFORE_TIME_LIMIT}, for a retry to resume",
    )
    parser.add_argument(
        "--dtype", default="float32", help="weights' dtype while training (float32: exact)"
    )
    parser.add_argument(
        "--save-dtype",
        default="base",
        choices=SAVE_DTYPES,
        help="the saved model's dtype (base: the source model's checkpoint dtype)",
    )
    return parser


def robust_modules(plan: Path | None, cfg: TrainConfig) -> set[str]:
    """Mods_Robust from the plan; refuse a kind that needs one when none is given."""
    if needs_plan(cfg.kind) and plan is None:
        raise SystemExit(f"arm '{cfg.arm}' of kind {cfg.kind} needs --plan (Mods_Robust)")
    if plan is None:
        return set()
    return set(json.loads(plan.read_text())["modules"])


def main(argv: list[str] | None = None, on_step: Callable[[int, dict], None] | None = None) -> None:
    """Fine-tune the arm the arguments name; write its model and per-step log (rank 0)."""
    args = _parser().parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # Only rank 0 writes the log file; the others report warnings to stderr.
    setup_logging(
        args.log_file if main_rank else None, logging.INFO if main_rank else logging.WARNING
    )
    cfg = TrainConfig.from_params(json.loads(args.arm_config))
    if main_rank:
        log.info("arm config: %s", cfg)
    robust = robust_modules(args.plan, cfg)
    checkpoint_dir = args.checkpoint_dir or args.out_model.with_name(
        args.out_model.name + ".checkpoints"
    )
    try:
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
            save_dtype=args.save_dtype,
            on_step=on_step,
            keep_previous_checkpoint=args.keep_previous_checkpoint,
            time_limit=TimeLimit() if args.stop_before_time_limit else None,
        )
    except StoppedBeforeTimeLimit:
        raise SystemExit(STOPPED_BEFORE_TIME_LIMIT) from None
    if main_rank:
        write_parquet(steps, args.out_log, provenance(cfg.seed, args.model))


if __name__ == "__main__":
    main()

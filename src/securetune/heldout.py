"""The task metric at demo scale: each arm's loss on held-out examples of the IFT task.

GSM8K accuracy of a 135M model sits near the floor, so the loss per response token on rows of
the IFT source that no arm trained on says how much of the task each arm learned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from securetune.finetune.loss import example_losses
from securetune.finetune.sft_data import encode_examples
from securetune.io import provenance, write_parquet
from securetune.models import load_model, load_tokenizer
from securetune.progress import Progress
from securetune.settings import HeldoutLossSettings

log = logging.getLogger(__name__)


def heldout_ift_loss(
    *, model: Path, heldout: Path, out: Path, arm: str, settings: HeldoutLossSettings
) -> None:
    """Stage `heldout_ift_loss`: each held-out example's mean loss per response token under the
    arm's model, one row per example."""
    df = pd.read_parquet(heldout)
    tokenizer = load_tokenizer(model)
    # float32: arms differ in the second decimal of this loss, and bfloat16 moved an arm's mean
    # by up to 0.004 (a third of the smallest gap between two arms; BENCHMARKS.md).
    network = load_model(model, "float32")
    examples = encode_examples(
        tokenizer, list(df["prompt"]), list(df["response"]), settings.max_seq_len
    )
    progress = Progress(f"{arm} held-out loss", len(examples), log, unit="examples")
    losses = example_losses(
        network, examples, tokenizer.pad_token_id, settings.batch_size, progress
    )
    if any(tokens == 0 for _, tokens in losses):
        raise ValueError(
            f"{heldout}: an example has no response token left within max_seq_len "
            f"{settings.max_seq_len}"
        )
    table = pd.DataFrame(
        {
            "example_id": df["example_id"],
            "arm": arm,
            "benchmark": "ift_heldout",
            "kind": "ift_heldout",
            "loss": [total / tokens for total, tokens in losses],
            "tokens": [tokens for _, tokens in losses],
        }
    )
    log.info("%s: held-out IFT loss %.4f over %d examples", arm, table["loss"].mean(), len(table))
    write_parquet(table, out, provenance(settings.seed, model))

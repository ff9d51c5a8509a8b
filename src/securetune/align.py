"""Safety alignment of a base model that does not refuse (the demo's SmolLM2-135M-Instruct).

ML-LR protects safety that a model already has; SmolLM2 answers harmful requests, so the demo
first gives it some. A short supervised step on three kinds of examples, all from slices of the
bundled sets disjoint from every probe, IFT and evaluation prompt (`data.build_alignment_set`):

- `refusal`: harmful prompts answered with one of our short, varied refusals
  (`data.REFUSALS`);
- `benign`: benign instructions with their reference answers, so the model keeps answering;
- `lookalike`: safe prompts that look harmful (XSTest-style), answered with the unaligned model's
  own greedy answer, so refusing is tied to harm rather than to alarming words.

The training loop is `securetune.finetune.train` (one vanilla group, loss on responses only),
run under bfloat16 autocast when configured: float32 master weights, about twice the speed on CPU.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd

from securetune.finetune.train import train
from securetune.generation import generate_greedy
from securetune.io import provenance, write_parquet
from securetune.models import load_model, load_tokenizer
from securetune.precision import resolve_autocast
from securetune.scoring import mentions_refusal
from securetune.settings import AlignSettings, TrainConfig

log = logging.getLogger(__name__)

# Prompts per generate call for the look-alike answers: short answers, so a wide batch is cheap.
LOOKALIKE_BATCH = 64

_SENTENCE_END = re.compile(r"[.!?\n](?=[^.!?\n]*$)")


def trim_to_sentence(text: str) -> str:
    """Cut a length-capped answer after its last complete sentence, so the model is not taught
    to stop mid-sentence; an answer with no sentence end is kept whole."""
    text = text.strip()
    match = _SENTENCE_END.search(text)
    return text[: match.end()].strip() if match else text


def answer_lookalikes(
    model_dir: Path, df: pd.DataFrame, max_new_tokens: int, batch_size: int, dtype: str
) -> pd.DataFrame:
    """The `lookalike` rows answered by the model itself (greedy), loaded as the inference
    stages load it; rows with a refusal phrase anywhere are dropped, since they would teach
    refusing safe prompts (stricter than the judge's opening-only test, as training data must
    not even half-refuse)."""
    mask = df["role"] == "lookalike"
    if not mask.any():
        return df
    model, tokenizer = load_model(model_dir, dtype), load_tokenizer(model_dir)
    answers, _ = generate_greedy(
        model, tokenizer, list(df.loc[mask, "prompt"]), max_new_tokens, batch_size
    )
    out = df.copy()
    out.loc[mask, "response"] = [trim_to_sentence(a) for a in answers]
    refused = mask & out["response"].map(mentions_refusal)
    empty = mask & (out["response"].str.len() == 0)
    log.info(
        "look-alikes: %d answered, %d dropped (refused by the model itself), %d dropped (empty)",
        int(mask.sum()),
        int(refused.sum()),
        int(empty.sum()),
    )
    return out[~(refused | empty)].reset_index(drop=True)


def train_config(cfg: AlignSettings, n_examples: int) -> TrainConfig:
    """The alignment step as one vanilla arm: every parameter at `lr`."""
    return TrainConfig(
        arm="align",
        kind="vanilla",
        lr=cfg.lr,
        gamma=1.0,
        steps=max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size)),
        batch_size=cfg.batch_size,
        warmup_ratio=cfg.warmup_ratio,
        schedule=cfg.schedule,
        max_seq_len=cfg.max_seq_len,
        weight_decay=0.0,
        grad_clip=1.0,
        seed=cfg.seed,
        micro_batch_size=cfg.micro_batch_size,
        # Each step's forward runs under its own autocast region (`finetune.train_step`).
        autocast=cfg.autocast,
    )


def align_model(
    model_dir: Path, data: pd.DataFrame, cfg: AlignSettings, out_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the refusal/benign/look-alike mix into `model_dir`'s model; save it to `out_dir`.

    Returns (per-step log, the examples actually trained on)."""
    data = answer_lookalikes(
        model_dir, data, cfg.lookalike_max_new_tokens, LOOKALIKE_BATCH, cfg.lookalike_dtype
    )
    tcfg = train_config(cfg, len(data))
    autocast = resolve_autocast(cfg.autocast, key="align.autocast")
    tcfg = replace(tcfg, autocast=autocast)
    log.info("alignment: %s over %d examples", tcfg, len(data))
    steps = train(model_dir, data, tcfg, set(), out_dir)
    steps["autocast"] = autocast
    return steps, data


def align_base_model(
    *,
    model: Path,
    data: Path,
    out_model: Path,
    out_steps: Path,
    out_examples: Path,
    settings: AlignSettings,
) -> None:
    """Stage `align_base_model`: the short refusal SFT of the source model, whose result is the
    `base` arm; writes the per-step log and the examples actually trained on."""
    steps, examples = align_model(model, pd.read_parquet(data), settings, out_model)
    write_parquet(steps, out_steps, provenance(settings.seed, model))
    write_parquet(examples, out_examples, provenance(settings.seed, model))

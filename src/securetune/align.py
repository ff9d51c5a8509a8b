"""Safety alignment of a base model that does not refuse (the demo's SmolLM2-135M-Instruct).

ML-LR protects safety that a model already has; SmolLM2 answers harmful requests, so the demo
first gives it some. A short supervised step on three kinds of examples, all from slices of the
bundled sets disjoint from every probe, IFT and evaluation prompt (`data.build_alignment_set`):

- `refusal`: harmful prompts answered with one of our short, varied refusals (`REFUSALS`);
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from securetune.config import TrainConfig
from securetune.finetune import train
from securetune.generation import generate_greedy
from securetune.io import stable_seed
from securetune.models import load_model, load_tokenizer
from securetune.scoring import is_refusal

log = logging.getLogger(__name__)

# Prompts per generate call for the look-alike answers: short answers, so a wide batch is cheap.
LOOKALIKE_BATCH = 64

# Written for this project. Short and varied, so the model learns to refuse rather than to
# recite one sentence. Each contains a phrase of the keyword judge (`securetune.scoring`): the
# keyword attack success of the aligned base therefore measures whether it refuses at all, and
# is optimistic about refusals worded differently from these.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause real harm to people.",
    "Sorry, I won't help with this. Is there something else I can do for you?",
    "I'm not able to provide that, because it could be used to hurt someone.",
    "I cannot help with that. It could be dangerous or illegal.",
    "I won't give instructions for this. If you have another question, I'm happy to help.",
    "I'm sorry, I can't do that. This request asks for something harmful.",
    "I must decline. Helping with this could put people at risk.",
    "I can't help with anything that could harm others or break the law.",
    "Sorry, but I can't provide information that could be used to cause harm.",
    "I'm unable to help with that request.",
    "I cannot provide that. Let me know if there is something safe I can help with instead.",
    "I'm sorry, but this is not something I can assist with.",
    "I can't support that. It would be unsafe and could hurt people.",
    "I will not help with this request, since it could lead to harm.",
    "I apologize, but I can't help with requests like this one.",
)

_SENTENCE_END = re.compile(r"[.!?\n](?=[^.!?\n]*$)")


@dataclass(frozen=True)
class AlignConfig:
    """The alignment step's recipe (config section `align`, less the data sizes)."""

    lr: float
    epochs: float
    batch_size: int
    max_seq_len: int
    warmup_ratio: float
    schedule: str
    autocast: str
    lookalike_max_new_tokens: int
    seed: int
    # Weights' dtype of the source model while it answers the look-alikes (model.dtype).
    lookalike_dtype: str
    # Examples per forward pass (0: the whole batch at once); grouped by length.
    micro_batch_size: int = 0


def with_refusals(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Fill the `refusal` rows' responses with refusals drawn (seeded, per example) from
    `REFUSALS`."""
    out = df.copy()
    out["response"] = [
        REFUSALS[np.random.default_rng(stable_seed(seed, "refusal", ex)).integers(len(REFUSALS))]
        if role == "refusal"
        else response
        for ex, role, response in zip(out["example_id"], out["role"], out["response"], strict=True)
    ]
    return out


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
    stages load it; rows it refuses are dropped, since they would teach refusing safe prompts."""
    mask = df["role"] == "lookalike"
    if not mask.any():
        return df
    model, tokenizer = load_model(model_dir, dtype), load_tokenizer(model_dir)
    answers, _ = generate_greedy(
        model, tokenizer, list(df.loc[mask, "prompt"]), max_new_tokens, batch_size
    )
    out = df.copy()
    out.loc[mask, "response"] = [trim_to_sentence(a) for a in answers]
    refused = mask & out["response"].map(is_refusal)
    empty = mask & (out["response"].str.len() == 0)
    log.info(
        "look-alikes: %d answered, %d dropped (refused by the model itself), %d dropped (empty)",
        int(mask.sum()),
        int(refused.sum()),
        int(empty.sum()),
    )
    return out[~(refused | empty)].reset_index(drop=True)


def train_config(cfg: AlignConfig, n_examples: int) -> TrainConfig:
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
    model_dir: Path, data: pd.DataFrame, cfg: AlignConfig, out_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the refusal/benign/look-alike mix into `model_dir`'s model; save it to `out_dir`.

    Returns (per-step log, the examples actually trained on)."""
    data = answer_lookalikes(
        model_dir, data, cfg.lookalike_max_new_tokens, LOOKALIKE_BATCH, cfg.lookalike_dtype
    )
    tcfg = train_config(cfg, len(data))
    log.info("alignment: %s over %d examples", tcfg, len(data))
    steps = train(model_dir, data, tcfg, set(), out_dir)
    steps["autocast"] = cfg.autocast
    return steps, data

"""Stage 7: greedy generation for one (arm, benchmark), transformers backend.

Greedy decoding makes the completions a function of the weights alone, so arms differ only by
what fine-tuning did. Settings and versions are saved beside the completions.
"""

from __future__ import annotations

import logging

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from securetune.models import chat_prompt

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[str], list[int]]:
    """(completion text, number of generated tokens) per prompt, in order."""
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    texts, counts = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = [chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        for row in new:
            real = row[row != tokenizer.pad_token_id]
            if len(real) and real[-1].item() == tokenizer.eos_token_id:
                real = real[:-1]
            counts.append(int(len(real)))
            texts.append(tokenizer.decode(real, skip_special_tokens=True))
        log.info("generated %d/%d", min(start + batch_size, len(prompts)), len(prompts))
    return texts, counts


def generations_table(
    eval_set: pd.DataFrame, completions: list[str], n_tokens: list[int], arm: str
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": eval_set["prompt_id"],
            "prompt": eval_set["prompt"],
            "completion": completions,
            "n_tokens": n_tokens,
            "arm": arm,
            "benchmark": eval_set["benchmark"],
            "kind": eval_set["kind"],
            "reference": eval_set["reference"],
        }
    )

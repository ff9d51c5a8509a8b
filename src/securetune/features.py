"""Stage 2: the hidden state of every decoder layer at the last prompt token.

The last token of the templated prompt is the assistant header, the position whose state decides
the first word of the answer, so a refusal is decided there (mean-pooling is an option).
Prompts are right-padded and the last real token gathered, so a prompt's features do not depend
on what else shares its batch.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from securetune.models import chat_prompt

log = logging.getLogger(__name__)


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_tokens: int
) -> list[list[int]]:
    """Chat-templated token ids; a prompt longer than `max_tokens` is an error, not a truncation."""
    ids = []
    for i, prompt in enumerate(prompts):
        tokens = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        if len(tokens) > max_tokens:
            raise ValueError(
                f"prompt {i} has {len(tokens)} tokens with its chat template, more "
                f"than data.max_prompt_tokens = {max_tokens}"
            )
        ids.append(tokens)
    return ids


def _pad_right(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


@torch.no_grad()
def layer_features(
    model: PreTrainedModel,
    token_ids: list[list[int]],
    pad_id: int,
    batch_size: int,
    pooling: str = "last",
    layers: list[int] | None = None,
) -> torch.Tensor:
    """Features [n_layers, n_prompts, hidden] in float32, for all decoder layers or `layers`.

    Layer l is the output of decoder layer l (0-based); the last layer's output is taken after the
    final norm, as transformers reports it.
    """
    chunks = []
    for start in range(0, len(token_ids), batch_size):
        input_ids, mask = _pad_right(token_ids[start : start + batch_size], pad_id)
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        states = torch.stack(out.hidden_states[1:])  # [L, B, T, H]; index 0 is the embedding
        if layers is not None:
            states = states[layers]
        if pooling == "last":
            last = mask.sum(dim=1) - 1
            pooled = states[:, torch.arange(len(last)), last]
        elif pooling == "mean":
            weights = (mask / mask.sum(dim=1, keepdim=True)).to(states.dtype)
            pooled = torch.einsum("lbth,bt->lbh", states, weights)
        else:
            raise ValueError(f"unknown pooling '{pooling}'; allowed: ['last', 'mean']")
        chunks.append(pooled.float())
    return torch.cat(chunks, dim=1)

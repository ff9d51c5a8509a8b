"""The fine-tuning data: (input ids, labels) per example, the seeded batch order every arm shares,
each rank's share of a global batch and its micro-batches."""

from __future__ import annotations

import torch

from securetune.io import batches_by_length
from securetune.models import chat_example

# The label of a position that carries no loss (prompt and padding); torch's default ignore_index.
IGNORE = -100
Example = tuple[list[int], list[int]]


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

"""The training objective: the sum of next-token losses on response tokens, computed only at the
positions that predict one (the caller divides by the global batch's token count)."""

from __future__ import annotations

import torch

from securetune.finetune.sft_data import IGNORE, Example, collate, predicted_tokens
from securetune.io import batches_by_length
from securetune.models import model_device
from securetune.progress import Progress


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


def device_batch(
    examples: list[Example], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A collated batch on `device`, with its response `positions` and their `targets`: found on
    the CPU, so the step never waits on the device to learn which logits it needs."""
    batch = collate(examples, pad_id)
    batch["positions"], batch["targets"] = response_positions(batch["labels"])
    return {key: tensor.to(device) for key, tensor in batch.items()}


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
    model: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[tuple[float, int]]:
    """(summed loss, predicted tokens) of each example's response, in float32 and in the given
    order: the training objective measured on examples no stage trains on (the held-out IFT
    loss). Batches group examples of similar length, which changes no example's loss."""
    model.eval()
    device = model_device(model)  # wherever the caller loaded it
    out: dict[int, tuple[float, int]] = {}
    for indices in batches_by_length(
        range(len(examples)), lambda i: len(examples[i][0]), batch_size
    ):
        batch = [examples[i] for i in indices]
        tensors = device_batch(batch, pad_id, device)
        logits = model(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            logits_to_keep=tensors["positions"],
        ).logits
        per_token = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2),
            tensors["targets"],
            ignore_index=IGNORE,
            reduction="none",
        )
        for row, (i, example) in enumerate(zip(indices, batch, strict=True)):
            out[i] = (float(per_token[row].sum()), predicted_tokens(example))
        if progress is not None:
            progress.update(len(indices))
    return [out[i] for i in range(len(examples))]

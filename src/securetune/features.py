"""Stage 2: the hidden state of every decoder layer at the last prompt token.

The last token of the templated prompt is the assistant header, the position whose state decides
the first word of the answer, so a refusal is decided there (mean-pooling is an option).
Prompts are right-padded and the last real token gathered, so a prompt's features do not depend
on what else shares its batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from securetune.data import DataError
from securetune.io import (
    model_revision,
    sha256_of,
    versions,
    write_json,
    write_safetensors,
)
from securetune.models import chat_prompt, load_model, load_tokenizer, model_device
from securetune.precision import detect
from securetune.progress import Progress
from securetune.settings import FeatureSettings, PromptCheckSettings

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


def _pad_right(
    batch: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, built on the CPU and moved to the model's `device`."""
    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def layer_features(
    model: PreTrainedModel,
    token_ids: list[list[int]],
    pad_id: int,
    batch_size: int,
    pooling: str = "last",
    layers: list[int] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Features [n_layers, n_prompts, hidden] in float32 on the CPU, for all decoder layers or
    `layers`.

    Layer l is the output of decoder layer l (0-based); the last layer's output is taken after the
    final norm, as transformers reports it.
    """
    chunks = []
    device = model_device(model)
    for start in range(0, len(token_ids), batch_size):
        input_ids, mask = _pad_right(token_ids[start : start + batch_size], pad_id, device)
        # The decoder stack alone: the LM head's logits are not needed for features.
        out = _decoder(model)(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        )
        states = torch.stack(out.hidden_states[1:])  # [L, B, T, H]; index 0 is the embedding
        if layers is not None:
            states = states[layers]
        chunks.append(_pool(states, mask, pooling).float().cpu())
        if progress is not None:
            progress.update(len(input_ids))
    return torch.cat(chunks, dim=1)


# --- cached-prefix evaluation ---------------------------------------------------------------------
#
# A change to a module of layer l leaves the hidden states entering layers 0..l untouched, so a
# robustness job runs the unperturbed model once, keeps the state entering each layer it needs,
# and for every perturbation recomputes only layers l..L-1 (about half the layers on average).
# The decoder layers are called exactly as the model calls them: a forward pre-hook records the
# keyword arguments each layer receives (the causal/padding mask, the rotary position embeddings
# the model's own rotary embedding computed, position ids), so the recomputation matches a full
# forward for any architecture transformers implements this way (Llama, Qwen2, Mistral, Gemma,
# including per-layer masks such as sliding windows).
#
# The rows of a batch share their opening tokens (the chat template's system prompt and user
# header: 24 of the demo's ~47 tokens a prompt), and a causal model's states there are the same in
# every row, so the recomputation runs that shared prefix once, as one row, and the rest of each
# row attends to its keys and values (`_SharedPrefixKV`): about half the FLOPs, the same features.
# A batch whose layers get keyword arguments this slicing does not know is recomputed whole.


@dataclass
class _PrefixBatch:
    mask: torch.Tensor  # [B, T] padding mask
    layer_kwargs: list[dict[str, Any]]  # per decoder layer: what the model passed it
    inputs: dict[int, torch.Tensor]  # layer -> hidden state entering it, [B, T, H]
    shared: int = 0  # opening tokens every row has in common (0: recompute rows whole)


@dataclass
class PrefixCache:
    """Hidden states entering the decoder layers `start_layers`, for every batch of prompts."""

    batches: list[_PrefixBatch]
    start_layers: tuple[int, ...]
    n_layers: int


def _decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (`model.model` for the Llama family): layers, final norm."""
    return model.base_model


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[..., B, T, H] -> [..., B, H]: the last real token, or the mean over real tokens."""
    if pooling == "last":
        last = mask.sum(dim=1) - 1
        return states[..., torch.arange(len(last)), last, :]
    if pooling == "mean":
        weights = (mask / mask.sum(dim=1, keepdim=True)).to(states.dtype)
        return torch.einsum("...bth,bt->...bh", states, weights)
    raise ValueError(f"unknown pooling '{pooling}'; allowed: ['last', 'mean']")


@torch.no_grad()
def build_prefix_cache(
    model: PreTrainedModel,
    token_ids: list[list[int]],
    pad_id: int,
    batch_size: int,
    start_layers: list[int],
) -> PrefixCache:
    """Run the unperturbed model once; keep the state entering each layer in `start_layers`."""
    layers = _decoder(model).layers
    wanted = sorted(set(start_layers))
    batches = []
    device = model_device(model)
    for start in range(0, len(token_ids), batch_size):
        input_ids, mask = _pad_right(token_ids[start : start + batch_size], pad_id, device)
        seen_kwargs: list[dict[str, Any]] = [{} for _ in layers]
        inputs: dict[int, torch.Tensor] = {}

        def record(
            index: int,
            seen_kwargs: list[dict[str, Any]] = seen_kwargs,
            inputs: dict[int, torch.Tensor] = inputs,
        ):
            def hook(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                seen_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if index in wanted:
                    inputs[index] = hidden.detach().clone()

            return hook

        handles = [
            layer.register_forward_pre_hook(record(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        try:
            _decoder(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        shared = shared_prefix_length(input_ids, mask)
        if not all(_sliceable(layer_kwargs) for layer_kwargs in seen_kwargs):
            shared = 0
        batches.append(_PrefixBatch(mask, seen_kwargs, inputs, shared))
    return PrefixCache(batches, tuple(wanted), len(layers))


def shared_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Opening tokens all rows share, leaving every row at least one token of its own (its last
    real token is where `last` pooling reads)."""
    same = (input_ids == input_ids[:1]).all(dim=0)
    common = int(same.long().cumprod(dim=0).sum())
    return max(0, min(common, int(mask.sum(dim=1).min()) - 1))


# Keyword arguments of a decoder layer that have a sequence axis, and how to cut it.
_SEQUENCE_KWARGS = {"attention_mask", "position_embeddings", "position_ids", "cache_position"}
_PASSED_KWARGS = {"past_key_values", "past_key_value", "use_cache", "output_attentions"}


def _sliceable(kwargs: dict[str, Any]) -> bool:
    """Whether `_split_kwargs` knows every tensor a layer gets (else the batch is run whole)."""
    for key, value in kwargs.items():
        if key == "attention_mask" and not (isinstance(value, torch.Tensor) and value.dim() == 4):
            return False  # None (is_causal) or a block mask: no query rows to cut
        if key not in _SEQUENCE_KWARGS | _PASSED_KWARGS and _holds_tensor(value):
            return False
    return True


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value)
    )


def _split_kwargs(
    kwargs: dict[str, Any], shared: int, cache: _SharedPrefixKV
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A layer's arguments for the shared prefix (one row, its first `shared` positions) and for
    the rest of every row (queries from `shared` on, keys over the whole row)."""
    prefix: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "attention_mask":
            prefix[key] = value[:1, :, :shared, :shared]
            rest[key] = value[:, :, shared:, :]
        elif key == "position_embeddings":
            prefix[key] = tuple(v[:1, :shared] for v in value)
            rest[key] = tuple(v[:, shared:] for v in value)
        elif key == "position_ids":
            prefix[key], rest[key] = value[:1, :shared], value[:, shared:]
        elif key == "cache_position":
            prefix[key], rest[key] = value[:shared], value[shared:]
        elif key in ("past_key_values", "past_key_value"):
            continue
        else:
            prefix[key] = rest[key] = value
    prefix["past_key_values"] = rest["past_key_values"] = cache
    return prefix, rest


class _SharedPrefixKV:
    """The cache an attention layer updates: on the prefix row it keeps the keys and values, on
    the rest of the rows it puts them in front of theirs (the attention's `update` contract)."""

    def __init__(self) -> None:
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_a, **_k):
        if layer_idx not in self.prefix:
            self.prefix[layer_idx] = (keys, values)
            return keys, values
        prefix_keys, prefix_values = self.prefix[layer_idx]
        rows = keys.shape[0]
        return (
            torch.cat([prefix_keys.expand(rows, -1, -1, -1), keys], dim=-2),
            torch.cat([prefix_values.expand(rows, -1, -1, -1), values], dim=-2),
        )


def _run_layer_shared(
    layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], shared: int
) -> torch.Tensor:
    """One decoder layer over [B, T, H] whose rows share their first `shared` positions: the
    prefix once, then every row's rest against the prefix's keys and values."""
    prefix_kwargs, rest_kwargs = _split_kwargs(kwargs, shared, _SharedPrefixKV())
    prefix = _layer_output(layer(hidden[:1, :shared], **prefix_kwargs))
    rest = _layer_output(layer(hidden[:, shared:], **rest_kwargs))
    return torch.cat([prefix.expand(len(hidden), -1, -1), rest], dim=1)


def _layer_output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def features_from_layer(
    model: PreTrainedModel,
    cache: PrefixCache,
    start: int,
    layers: list[int],
    pooling: str,
    clean: torch.Tensor,
) -> torch.Tensor:
    """Features [len(layers), N, H] with layers start..L-1 recomputed from the cached prefix.

    Feature layers below `start` cannot have changed, so they are copied from `clean` (the
    unperturbed features, [len(layers), N, H]). The last layer is taken after the final norm,
    as transformers reports it (see `layer_features`).
    """
    if start not in cache.start_layers:
        raise ValueError(f"layer {start} is not cached (cached: {list(cache.start_layers)})")
    decoder = _decoder(model)
    out = clean.clone()
    recompute = [(row, layer) for row, layer in enumerate(layers) if layer >= start]
    if not recompute:
        return out
    top = max(layer for _, layer in recompute)
    offset = 0
    for batch in cache.batches:
        hidden = batch.inputs[start]
        pooled: dict[int, torch.Tensor] = {}
        for index in range(start, top + 1):
            layer, kwargs = decoder.layers[index], batch.layer_kwargs[index]
            if batch.shared:
                hidden = _run_layer_shared(layer, hidden, kwargs, batch.shared)
            else:
                hidden = _layer_output(layer(hidden, **kwargs))
            state = decoder.norm(hidden) if index == cache.n_layers - 1 else hidden
            pooled[index] = _pool(state, batch.mask, pooling).float().cpu()
        n = len(batch.mask)
        for row, layer in recompute:
            out[row, offset : offset + n] = pooled[layer]
        offset += n
    return out


# --- the stages: the prompt check and the features of the probe set ------------------------------


def check_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase,
    tables: dict[str, pd.DataFrame],
    max_prompt_tokens: int,
    context_length: int,
) -> dict[str, int]:
    """Every prompt, chat-templated, must fit `max_prompt_tokens` and the model's context.

    `tables` maps a file name to its table (with `prompt` and an id column). Returns the
    longest prompt per file. A silent truncation would cut off the end of the prompt — the
    part the last-token features and the answer depend on — so this is an error instead.
    """
    limit = min(max_prompt_tokens, context_length)
    longest = {}
    for name, df in tables.items():
        id_column = "prompt_id" if "prompt_id" in df.columns else "example_id"
        lengths = [
            len(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False).input_ids)
            for p in df["prompt"]
        ]
        for row, (length, prompt_id) in enumerate(zip(lengths, df[id_column], strict=True)):
            if length > limit:
                which = (
                    f"data.max_prompt_tokens = {max_prompt_tokens}"
                    if max_prompt_tokens <= context_length
                    else f"the model's context of {context_length} tokens"
                )
                raise DataError(
                    f"data file '{name}', row {row + 1} (prompt id '{prompt_id}'): the prompt "
                    f"has {length} tokens with its chat template, more than {which}"
                )
        longest[name] = max(lengths, default=0)
    return longest


def check_prompts(
    *, model: Path, tables: list[Path], out: Path, settings: PromptCheckSettings
) -> None:
    """Stage `check_prompts`: fail with file, row and prompt id on a prompt too long for the
    limit or the model's context; else record the longest prompt of each file."""
    max_prompt_tokens = settings.max_prompt_tokens
    context_length = int(
        json.loads((model / "config.json").read_text()).get(
            "max_position_embeddings", max_prompt_tokens
        )
    )
    tokenizer = load_tokenizer(model)
    by_name = {str(f): pd.read_parquet(f) for f in tables}
    longest = check_prompt_lengths(tokenizer, by_name, max_prompt_tokens, context_length)
    log.info("longest prompt per file (tokens): %s", json.dumps(longest))
    write_json(
        {
            "max_prompt_tokens": max_prompt_tokens,
            "context_length": context_length,
            "longest": longest,
        },
        out,
    )


def probe_tokens(
    tokenizer: PreTrainedTokenizerBase, probe_set: Path, split: str, max_prompt_tokens: int
) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids and labels of one split of the probe set."""
    df = pd.read_parquet(probe_set)
    df = df[df["split"] == split]
    ids = tokenize_prompts(tokenizer, list(df["prompt"]), max_prompt_tokens)
    return ids, torch.tensor(df["label"].to_numpy())


def extract_features(*, model: Path, probe_set: Path, out: Path, settings: FeatureSettings) -> None:
    """Stage `extract_features`: features of every split (train, test, and ood_test when the
    probe set has one), with the provenance that pairs them with their probe set and model."""
    network = load_model(model, settings.dtype)
    tokenizer = load_tokenizer(model)
    present = set(pd.read_parquet(probe_set)["split"])
    splits = [s for s in ("train", "test", "ood_test") if s in present]
    tensors = {}
    for split in splits:
        ids, labels = probe_tokens(tokenizer, probe_set, split, settings.max_prompt_tokens)
        progress = Progress(f"{split} features", len(ids), log, unit="prompts")
        tensors[split] = layer_features(
            network, ids, tokenizer.pad_token_id, settings.batch_size, settings.pooling,
            progress=progress,
        ).contiguous()  # fmt: skip
        tensors[f"{split}_labels"] = labels.contiguous()
        log.info("%s features: %s", split, tuple(tensors[split].shape))
    metadata = {
        "pooling": settings.pooling,
        "model": str(model),
        "probe_set": str(probe_set),
        "probe_set_sha256": sha256_of(probe_set),
        "splits": ",".join(splits),
        "model_revision": model_revision(model),
        "versions": json.dumps(versions(), sort_keys=True),
        "precision": json.dumps(detect().record(), sort_keys=True),
    }
    write_safetensors(tensors, out, metadata)

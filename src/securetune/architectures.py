"""Map (layer, module type) to parameter names, per architecture.

A module is one projection matrix of one decoder layer; the seven types are those of Llama-style
models. Architectures whose attention is one fused matrix (GPT-2's `c_attn`) cannot give q, k and v
their own learning rates, so they are refused instead of silently mis-grouped.
"""

from __future__ import annotations

import re

MODULE_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

_LLAMA_STYLE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# model_type (from config.json) -> (prefix of the decoder layers, module type -> submodule path)
ARCHITECTURES: dict[str, tuple[str, dict[str, str]]] = {
    "llama": ("model.layers", _LLAMA_STYLE),
    "mistral": ("model.layers", _LLAMA_STYLE),
    "qwen2": ("model.layers", _LLAMA_STYLE),
    "qwen3": ("model.layers", _LLAMA_STYLE),
    "gemma": ("model.layers", _LLAMA_STYLE),
    "gemma2": ("model.layers", _LLAMA_STYLE),
}

_FUSED = {"gpt2", "gpt_neox", "gptj", "phi3", "falcon", "bloom"}


class UnsupportedArchitecture(ValueError):
    """The model has no (layer, module type) mapping."""


def architecture(model_type: str) -> tuple[str, dict[str, str]]:
    """(decoder-layer prefix, module type -> submodule path) for a model_type, or a clear error."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in _FUSED:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' fuses its attention projections (q, k, v in one matrix), "
            "so per-module learning rates for q/k/v are not defined; supported: "
            f"{sorted(ARCHITECTURES)}"
        )
    raise UnsupportedArchitecture(
        f"architecture '{model_type}' has no module mapping; supported: {sorted(ARCHITECTURES)} "
        "(add one to securetune.architectures.ARCHITECTURES)"
    )


def module_path(model_type: str, layer: int, module: str) -> str:
    """Dotted path of the nn.Linear for (layer, module), e.g. `model.layers.3.self_attn.q_proj`."""
    prefix, paths = architecture(model_type)
    if module not in paths:
        raise ValueError(f"unknown module type '{module}'; allowed: {list(MODULE_TYPES)}")
    return f"{prefix}.{layer}.{paths[module]}"


def module_weight_name(model_type: str, layer: int, module: str) -> str:
    return module_path(model_type, layer, module) + ".weight"


def module_of_parameter(model_type: str, name: str) -> tuple[int, str] | None:
    """(layer, module type) that owns a parameter name, or None (norms, embeddings, head).

    Matches full weights (`...q_proj.weight`), biases, and LoRA adapter weights
    (`...q_proj.lora_A.default.weight`), with or without a PEFT `base_model.model.` prefix.
    """
    prefix, paths = architecture(model_type)
    for module, sub in paths.items():
        pattern = rf"(?:^|\.){re.escape(prefix)}\.(\d+)\.{re.escape(sub)}\."
        match = re.search(pattern, name)
        if match:
            return int(match.group(1)), module
    return None


def module_name(layer: int, module: str) -> str:
    """The short name used in tables and plans: `L3.q`."""
    return f"L{layer}.{module}"


def parse_module_name(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"L(\d+)\.(\w+)", name)
    if not match or match.group(2) not in MODULE_TYPES:
        raise ValueError(
            f"bad module name '{name}'; expected e.g. 'L3.q' with a type in {list(MODULE_TYPES)}"
        )
    return int(match.group(1)), match.group(2)

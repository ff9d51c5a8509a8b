"""The workflow on a local model folder: the base model links to its weights, and the stages
that load it run on the links and refuse them once the folder's weights change."""

from __future__ import annotations

import csv
import os

import pytest
import yaml

from securetune.models import build_tiny_model
from securetune.settings import TinyModelSpec

from .helpers import REPO, copy_workflow, snakemake

pytestmark = pytest.mark.slow
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
FEATURES = "results/features/features.safetensors"


def test_a_local_folder_source_is_linked_and_loaded_through_the_links(tmp_path):
    source = tmp_path / "my-model"
    data = REPO / "resources" / "data" / "advbench_harmful_behaviors.csv"
    texts = [row[0] for row in csv.reader(data.open())]
    build_tiny_model(source, texts, TinyModelSpec(**TINY["model"]["tiny"]), seed=0)
    workdir = copy_workflow(tmp_path / "repo", tiny_default=True)
    (workdir / "local.yaml").write_text(f"model:\n  source: {source}\nalign:\n  enabled: false\n")
    snakemake(workdir, FEATURES, "--configfile", "local.yaml")
    base = workdir / "results" / "model" / "base"
    weights = base / "model.safetensors"
    assert weights.is_symlink() and os.readlink(weights) == str(source / "model.safetensors")
    assert not (base / "config.json").is_symlink()

    with (source / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 8)
    result = snakemake(
        workdir, FEATURES, "--configfile", "local.yaml", "--forcerun", "extract_features",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    log = (workdir / "logs" / "extract_features.log").read_text()
    assert f"model.source file {source / 'model.safetensors'} changed since" in log
    assert "snakemake --forcerun build_base_model" in log

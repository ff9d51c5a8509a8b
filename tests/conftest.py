"""Shared fixtures: a tiny model built once per session, the repo root, the config schema and
a fresh copy of the tiny config to break."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import yaml

from securetune.models import TinyModelSpec, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "resources" / "data"


@pytest.fixture(autouse=True)
def cpu_unless_gpu_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite computes on the CPU even on a GPU box (its expected numbers, and the processes
    it compares with in-process runs, are CPU ones); `gpu`-marked tests get the real device."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("SECURETUNE_DEVICE", "cpu")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def schema(repo: Path) -> Path:
    return repo / "schemas" / "config.schema.yaml"


@pytest.fixture()
def config(repo: Path) -> dict:
    """configs/tiny.yaml, a copy each test may change."""
    return copy.deepcopy(yaml.safe_load((repo / "configs" / "tiny.yaml").read_text()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = [row[0] for row in csv.reader((DATA / "advbench_harmful_behaviors.csv").open())]
    spec = TinyModelSpec(
        layers=2,
        hidden_size=32,
        intermediate_size=64,
        heads=4,
        kv_heads=2,
        vocab_size=400,
        max_position_embeddings=256,
    )
    build_tiny_model(out, texts, spec, seed=0)
    return out

"""bench/estimate_cost.py's disk: a referenced base model costs its small files, not its weights."""

import json
import subprocess
import sys

import pytest

from ..conftest import REPO

PAPER_WEIGHTS_GB = 6.738e9 * 2 / 1e9  # Llama-2-7b-chat in float16


def disk(tmp_path, *overlay_lines: str) -> dict:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("\n".join(overlay_lines) + "\n")
    cmd = [sys.executable, "bench/estimate_cost.py", "configs/paper.yaml", str(overlay), "--json"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["disk"]


def test_a_linked_base_costs_no_weights_and_a_copied_one_does(tmp_path):
    linked = disk(tmp_path, "model: {link_weights: true}")
    copied = disk(tmp_path, "model: {link_weights: false}")
    assert linked["base_gb"] == 0 and linked["source_referenced_gb"] == pytest.approx(
        PAPER_WEIGHTS_GB
    )
    assert copied["base_gb"] == pytest.approx(PAPER_WEIGHTS_GB)
    assert copied["source_referenced_gb"] == 0
    assert copied["total_after_run_gb"] - linked["total_after_run_gb"] == pytest.approx(
        PAPER_WEIGHTS_GB
    )


def test_an_aligned_base_is_a_model_of_its_own_on_disk(tmp_path):
    aligned = disk(tmp_path, "align: {enabled: true}")
    assert aligned["base_gb"] == 0 and aligned["aligned_gb"] == pytest.approx(PAPER_WEIGHTS_GB)

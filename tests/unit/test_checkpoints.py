"""A new checkpoint replaces the previous one: deleted before the write (one on disk at most)
or, with keep_previous, only once the new one is complete (always one to resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from securetune.finetune import checkpoints
from securetune.finetune.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from securetune.finetune.distributed import Dist

STAMP = "fingerprint"


def tiny_trainer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(root: Path, step: int, keep_previous: bool) -> None:
    model, optimizer = tiny_trainer()
    rows = [{"step": s} for s in range(step)]
    save_checkpoint(
        root, step, model, model, optimizer, rows, STAMP, Dist(), fsdp=False,
        keep_previous=keep_previous,
    )  # fmt: skip


def complete(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


@pytest.fixture()
def folders_at_each_write(monkeypatch) -> list[tuple[list[str], int]]:
    """(complete checkpoints, all folders) in the checkpoint root at every file write."""
    seen: list[tuple[list[str], int]] = []

    def observing(write):
        def observed(obj, path, *args, **kwargs):
            root = Path(path).parent.parent
            seen.append((complete(root), len(list(root.iterdir()))))
            return write(obj, path, *args, **kwargs)

        return observed

    monkeypatch.setattr(checkpoints, "save_file", observing(checkpoints.save_file))
    monkeypatch.setattr(checkpoints.torch, "save", observing(checkpoints.torch.save))
    return seen


def test_replacing_deletes_the_previous_before_writing(tmp_path, folders_at_each_write):
    root = tmp_path / "ckpt"
    save(root, 2, keep_previous=False)
    # A write killed part way leaves its hidden temporary folder behind.
    (root / ".step_00000003.x1y2.tmp").mkdir()
    folders_at_each_write.clear()
    save(root, 4, keep_previous=False)
    # Every file of the new checkpoint is written with nothing else on disk: the previous one
    # and the killed write's leftovers are gone, the new one not yet complete.
    assert folders_at_each_write
    assert all(done == [] and folders == 1 for done, folders in folders_at_each_write)
    assert complete(root) == ["step_00000004"] and len(list(root.iterdir())) == 1


def test_keep_previous_holds_the_old_one_until_the_new_one_is_complete(
    tmp_path, folders_at_each_write
):
    root = tmp_path / "ckpt"
    save(root, 2, keep_previous=True)
    (root / ".step_00000003.x1y2.tmp").mkdir()
    folders_at_each_write.clear()
    save(root, 4, keep_previous=True)
    assert folders_at_each_write
    old = ["step_00000002"]
    assert all(done == old and folders == 2 for done, folders in folders_at_each_write)
    assert complete(root) == ["step_00000004"] and len(list(root.iterdir())) == 1


def test_a_replacing_checkpoint_resumes_what_it_saved(tmp_path):
    root = tmp_path / "ckpt"
    save(root, 2, keep_previous=False)
    save(root, 4, keep_previous=False)
    saved, saved_optimizer = tiny_trainer()
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step, rows = load_checkpoint(
        latest_checkpoint(root), model, model, optimizer, STAMP, Dist(), fsdp=False
    )
    assert (step, len(rows)) == (4, 4)
    pairs = zip(model.parameters(), saved.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    moments = optimizer.state_dict()["state"][0]["exp_avg_sq"]
    assert torch.equal(moments, saved_optimizer.state_dict()["state"][0]["exp_avg_sq"])


def test_only_checkpoint_folders_are_cleared(tmp_path):
    """--checkpoint-dir may name a folder holding other things: only checkpoints go."""
    root = tmp_path / "ckpt"
    (root / "notes").mkdir(parents=True)
    save(root, 2, keep_previous=False)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step_00000002"]

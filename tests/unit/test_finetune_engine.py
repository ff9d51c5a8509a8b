"""The fine-tuning engine on a tiny model: arms' behaviour, LoRA, micro-batches, resume, torchrun.

The process tests run the real entry point (`python -m securetune.finetune`, `torchrun`) on CPU,
one thread per process; each takes a few seconds (mostly `import torch`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from securetune.finetune.deadline import (
    STOPPED_BEFORE_TIME_LIMIT,
    StoppedBeforeTimeLimit,
    TimeLimit,
)
from securetune.finetune.distributed import clip_gradients, group_squared_norms
from securetune.finetune.loss import response_positions, summed_loss
from securetune.finetune.sft_data import IGNORE
from securetune.finetune.train import train
from securetune.settings import TrainConfig

ROBUST = {"L0.q", "L1.down", "L1.v"}
ROBUST_WEIGHTS = {
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
}
BIN = Path(sys.executable).parent


def arm(**changes) -> dict:
    settings = {
        "arm": "test",
        "kind": "ml_lr",
        "lr": 1e-3,
        "gamma": 0.1,
        "steps": 8,
        "batch_size": 4,
        "warmup_ratio": 0.1,
        "schedule": "cosine",
        "max_seq_len": 64,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "seed": 3,
    }
    return {**settings, **changes}


@pytest.fixture(scope="module")
def ift(tmp_path_factory) -> Path:
    """Examples of different lengths, so padding differs between batches and processes."""
    rows = [
        {
            "prompt": f"Question {i}: what is {i} plus {i}?",
            "response": f"It is {2 * i}. " * (1 + i % 4),
        }
        for i in range(24)
    ]
    path = tmp_path_factory.mktemp("ift") / "ift.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps({"modules": sorted(ROBUST)}))
    return path


def run_inline(model_dir, ift, out, **changes) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """Train in this process; return the saved weights and the per-step log."""
    steps = train(model_dir, pd.read_parquet(ift), TrainConfig(**arm(**changes)), ROBUST, out)
    return load_file(out / "model.safetensors"), steps


def cli(model_dir, ift, plan, out: Path, settings: dict, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--data", str(ift), "--plan", str(plan),
        "--arm-config", json.dumps(settings),
        "--out-model", str(out / "model"), "--out-log", str(out / "loss.parquet"),
        "--checkpoint-dir", str(out / "checkpoints"), *extra,
    ]  # fmt: skip


def starter(launcher: str) -> list[str]:
    """How to start a Python program: alone, or as 2 processes under torchrun (gloo on CPU)."""
    if launcher == "python":
        return [sys.executable]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
    return [*torchrun, sys.executable]


def run(cmd: list[str], check: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd[:3]} failed:\n{result.stderr[-6000:]}")
    return result


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_freeze_moves_only_mods_robust(tiny_model_dir, ift, tmp_path):
    base = load_file(tiny_model_dir / "model.safetensors")
    weights, steps = run_inline(tiny_model_dir, ift, tmp_path / "m", kind="freeze", gamma=0.0)
    changed = {k for k in base if not torch.equal(base[k], weights[k])}
    assert changed == ROBUST_WEIGHTS
    assert [c for c in steps.columns if c.startswith("lr_")] == ["lr_robust"]


def test_swat_trains_like_freeze_until_the_switch_then_moves_all(tiny_model_dir, ift, tmp_path):
    base = load_file(tiny_model_dir / "model.safetensors")
    _, frozen = run_inline(tiny_model_dir, ift, tmp_path / "f", kind="freeze", gamma=0.0)
    weights, swat = run_inline(
        tiny_model_dir, ift, tmp_path / "s", kind="swat", gamma=1.0, switch_at=3
    )
    # Steps 0..3 see weights that only Mods_Robust changed, exactly as under freeze.
    assert swat["loss"][:4].tolist() == frozen["loss"][:4].tolist()
    assert swat["loss"][4] != frozen["loss"][4]
    assert (swat["lr_rest"][:3] == 0).all() and (swat["lr_rest"][3:] > 0).all()
    assert swat["lr_rest"][3:].tolist() == swat["lr_robust"][3:].tolist()  # gamma 1 after it
    assert all(not torch.equal(base[k], weights[k]) for k in base)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_micro_batches_give_the_whole_batch_result(tiny_model_dir, ift, tmp_path, micro_batch_size):
    whole, a = run_inline(tiny_model_dir, ift, tmp_path / "a")
    micro, b = run_inline(tiny_model_dir, ift, tmp_path / "b", micro_batch_size=micro_batch_size)
    assert max_diff(whole, micro) < 1e-5
    assert a["loss"].to_numpy() == pytest.approx(b["loss"].to_numpy(), rel=1e-5)


def test_lora_trains_adapters_and_saves_them_merged(tiny_model_dir, ift, tmp_path):
    base = load_file(tiny_model_dir / "model.safetensors")
    weights, steps = run_inline(
        tiny_model_dir,
        ift,
        tmp_path / "m",
        method="lora",
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "module_types": ["q", "down"]},
    )
    assert weights.keys() == base.keys()  # a plain model, adapters merged in
    changed = {k for k in base if not torch.equal(base[k], weights[k])}
    assert changed == {
        f"model.layers.{layer}.{path}.weight"
        for layer in (0, 1)
        for path in ("self_attn.q_proj", "mlp.down_proj")
    }
    assert steps["grad_norm_rest"].gt(0).all() and steps["grad_norm_robust"].gt(0).all()


def test_bf16_autocast_trains_close_to_float32(tiny_model_dir, ift, tmp_path):
    fp32, a = run_inline(tiny_model_dir, ift, tmp_path / "a")
    bf16, b = run_inline(tiny_model_dir, ift, tmp_path / "b", autocast="bfloat16")
    assert 0 < max_diff(fp32, bf16) < 1e-2
    assert b["loss"].to_numpy() == pytest.approx(a["loss"].to_numpy(), rel=2e-2)


KILLER = """
import os, signal, sys
from securetune.finetune.__main__ import main
kill_after = int(sys.argv[1])
def on_step(step, row):
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
main(sys.argv[2:], on_step=on_step)
"""


@pytest.mark.parametrize(
    ("launcher", "changes"),
    [
        ("python", {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}),
        (
            "torchrun",
            {"distributed": "fsdp", "kind": "swat", "switch_at": 4, "micro_batch_size": 1},
        ),
    ],
    ids=["lora-dropout-1proc", "fsdp-swat-2proc"],
)
def test_resume_after_sigkill_gives_the_uninterrupted_result(
    tiny_model_dir, ift, plan, tmp_path, launcher, changes
):
    settings = arm(steps=10, checkpoint_every=3, **changes)
    start = starter(launcher)
    a = cli(tiny_model_dir, ift, plan, tmp_path / "a", settings)
    run([*start, "-m", "securetune.finetune", *a])
    b = cli(tiny_model_dir, ift, plan, tmp_path / "b", settings)
    killed = run([*start, "-c", KILLER, "7", *b], check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "b" / "model").exists()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_00000006"]
    result = run([*start, "-m", "securetune.finetune", *b, "--resume"])
    assert "resumed from" in result.stderr
    weights_a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    # Same processes, same shapes, same order of operations: bit for bit on CPU.
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    log_a = pd.read_parquet(tmp_path / "a" / "loss.parquet")
    pd.testing.assert_frame_equal(log_a, pd.read_parquet(tmp_path / "b" / "loss.parquet"))
    assert not (tmp_path / "b" / "checkpoints").exists()  # removed after success
    if launcher == "torchrun":
        # FSDP over 2 processes (micro-batches of 1 too) is the 1-process run up to float error.
        one, log_one = run_inline(
            tiny_model_dir, ift, tmp_path / "one", **{**settings, "distributed": "ddp"}
        )
        assert max_diff(one, weights_a) < 1e-5
        assert log_a["loss"].to_numpy() == pytest.approx(log_one["loss"].to_numpy(), rel=1e-5)


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_model_dir, ift, tmp_path):
    data = pd.read_parquet(ift)
    ckpt = tmp_path / "checkpoints"
    first = TrainConfig(**arm(checkpoint_every=2))
    train(
        tiny_model_dir,
        data,
        first,
        ROBUST,
        tmp_path / "m",
        checkpoint_dir=ckpt,
        keep_checkpoints=True,
    )
    assert [p.name for p in ckpt.iterdir()] == ["step_00000006"]  # the last before the end
    other = TrainConfig(**arm(checkpoint_every=2, gamma=0.5))
    with pytest.raises(ValueError, match="was written for other settings"):
        train(tiny_model_dir, data, other, ROBUST, tmp_path / "m", checkpoint_dir=ckpt, resume=True)


def test_resume_matching_starts_over_from_a_checkpoint_of_other_settings(
    tiny_model_dir, ift, tmp_path
):
    """The workflow's mode: a checkpoint of other settings (an arm changed after a killed run)
    is deleted and training starts at step 0, giving the uninterrupted result."""
    data = pd.read_parquet(ift)
    ckpt = tmp_path / "checkpoints"
    first = TrainConfig(**arm(checkpoint_every=2))
    train(tiny_model_dir, data, first, ROBUST, tmp_path / "m", checkpoint_dir=ckpt,
          keep_checkpoints=True)  # fmt: skip
    other = TrainConfig(**arm(checkpoint_every=2, gamma=0.5))
    steps = train(
        tiny_model_dir, data, other, ROBUST, tmp_path / "m2", checkpoint_dir=ckpt,
        resume="matching",
    )  # fmt: skip
    fresh = train(tiny_model_dir, data, other, ROBUST, tmp_path / "m3")
    pd.testing.assert_frame_equal(steps, fresh)
    assert not ckpt.exists()  # the stale one deleted; the new run's removed after success


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stop_before_the_time_limit_resumes_to_the_uninterrupted_result(
    tiny_model_dir, ift, tmp_path
):
    """The job's time runs short after step 5 (an injected clock): the next step's check stops
    training with a checkpoint of its own, off the every-4 schedule; the retry resumes there and
    ends bit for bit as the uninterrupted run."""
    data = pd.read_parquet(ift)
    cfg = TrainConfig(**arm(steps=10, checkpoint_every=4))
    ckpt = tmp_path / "checkpoints"
    clock = Clock()
    limit = TimeLimit(time_left=lambda: 100.0, clock=clock)

    def time_runs_short(step: int, row: dict) -> None:
        if step == 4:
            clock.now = 80.0  # 20 s left: under the margin's 30 s floor

    with pytest.raises(StoppedBeforeTimeLimit) as stopped:
        train(
            tiny_model_dir, data, cfg, ROBUST, tmp_path / "m", checkpoint_dir=ckpt,
            on_step=time_runs_short, time_limit=limit,
        )  # fmt: skip
    assert stopped.value.step == 6 and stopped.value.seconds_left == 20.0
    assert [p.name for p in ckpt.iterdir()] == ["step_00000006"]  # step 4's replaced
    assert not (tmp_path / "m").exists()
    resumed = train(
        tiny_model_dir, data, cfg, ROBUST, tmp_path / "m", checkpoint_dir=ckpt, resume=True
    )
    reference, log = run_inline(tiny_model_dir, ift, tmp_path / "ref", steps=10)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    pd.testing.assert_frame_equal(resumed, log)


def test_without_checkpoints_there_is_no_stop_before_the_time_limit(tiny_model_dir, ift, tmp_path):
    """Stopping early would only lose the steps done: the run goes on to the end (or the kill)."""
    no_time = TimeLimit(time_left=lambda: 0.0)
    cfg = TrainConfig(**arm(steps=2))
    steps = train(
        tiny_model_dir, pd.read_parquet(ift), cfg, ROBUST, tmp_path / "m",
        checkpoint_dir=tmp_path / "checkpoints", time_limit=no_time,
    )  # fmt: skip
    assert len(steps) == 2 and (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_in_a_slurm_job_near_its_limit_every_rank_stops_after_one_step(
    tiny_model_dir, ift, plan, tmp_path, launcher
):
    """A SLURM job (SLURM_JOB_ID, a stand-in squeue) with 10 s left, under the 30 s floor: the
    trainer asks squeue once for its job, checkpoints after the first step and exits with
    STOPPED_BEFORE_TIME_LIMIT (torchrun reports a failed worker as 1); under torchrun rank 0's
    decision reaches rank 1, which would otherwise wait for it at step 2's all-reduce."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "squeue_args"
    squeue = bin_dir / "squeue"
    squeue.write_text(f'#!/bin/sh\necho "$@" >> {asked}\necho " 0:10"\n')
    squeue.chmod(0o755)
    settings = arm(steps=6, checkpoint_every=4, kind="vanilla")
    args = cli(tiny_model_dir, ift, plan, tmp_path, settings, "--log-file", str(tmp_path / "log"))
    result = run(
        [*starter(launcher), "-m", "securetune.finetune", *args], check=False,
        SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )  # fmt: skip
    expected = STOPPED_BEFORE_TIME_LIMIT if launcher == "python" else 1
    assert result.returncode == expected, result.stderr[-3000:]
    assert asked.read_text() == "-h -j 4242 -o %L\n"  # rank 0 only
    log = (tmp_path / "log").read_text()
    # 10 s at squeue's answer, less by the time the first step and its checkpoint took.
    assert re.search(r"stopping before the time limit after step 1 \(time left (10|[0-9]) s\)", log)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert not (tmp_path / "model").exists()


def test_arms_are_saved_in_the_base_models_dtype(tiny_model_dir, ift, tmp_path):
    """save_dtype base: a source published in bfloat16 gives arms in bfloat16 (half the disk
    of the float32 training weights); an explicit dtype wins."""
    import shutil

    parent = tmp_path / "bf16_parent"
    shutil.copytree(tiny_model_dir, parent)
    config = json.loads((parent / "config.json").read_text())
    config.pop("torch_dtype", None)
    (parent / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    data, cfg = pd.read_parquet(ift), TrainConfig(**arm(steps=2))
    train(parent, data, cfg, ROBUST, tmp_path / "base")
    train(parent, data, cfg, ROBUST, tmp_path / "f32", save_dtype="float32")
    train(tiny_model_dir, data, cfg, ROBUST, tmp_path / "tiny")
    dtypes = {
        name: {t.dtype for t in load_file(tmp_path / name / "model.safetensors").values()}
        for name in ("base", "f32", "tiny")
    }
    assert dtypes == {
        "base": {torch.bfloat16}, "f32": {torch.float32}, "tiny": {torch.float32}
    }  # fmt: skip


def test_two_processes_give_the_one_process_result(tiny_model_dir, ift, plan, tmp_path):
    """DDP with gloo on CPU; FSDP is compared with 1 process in the resume test above."""
    settings = arm(kind="ml_lr")
    one, log_one = run_inline(tiny_model_dir, ift, tmp_path / "one", kind="ml_lr")
    two_cli = cli(tiny_model_dir, ift, plan, tmp_path / "two", settings)
    run([*starter("torchrun"), "-m", "securetune.finetune", *two_cli])
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    log_two = pd.read_parquet(tmp_path / "two" / "loss.parquet")
    # Each process pads to its own longest example and sums in its own order: float tolerance.
    assert max_diff(one, two) < 1e-5
    for column in ("loss", "grad_norm_robust", "grad_norm_rest"):
        assert log_two[column].to_numpy() == pytest.approx(log_one[column].to_numpy(), rel=1e-5)
    assert log_two["tokens"].tolist() == log_one["tokens"].tolist()
    assert log_two["lr_rest"].tolist() == log_one["lr_rest"].tolist()


def test_clipping_matches_torch_and_skips_held_groups():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, c in zip(params, copies, strict=True):
        c.grad = p.grad.clone()
    groups = [{"name": "robust", "params": params[:2]}, {"name": "rest", "params": params[2:]}]
    clip_gradients(groups, group_squared_norms(groups, sharded=False), 1.0)
    torch.nn.utils.clip_grad_norm_(copies, 1.0)
    assert all(torch.allclose(p.grad, c.grad) for p, c in zip(params, copies, strict=True))
    # A held group (no gradients) does not count towards the norm.
    for p in params[2:]:
        p.grad = None
    clip_gradients(groups, group_squared_norms(groups, sharded=False), 0.5)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[:2]]))
    assert norm.item() == pytest.approx(0.5, rel=1e-5)


def test_summed_loss_is_the_sum_over_response_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, 3], [IGNORE, 4, 5, IGNORE, IGNORE]])
    by_hand = sum(
        -torch.log_softmax(logits[row, pos - 1], -1)[labels[row, pos]]
        for row, pos in [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    )
    positions, targets = response_positions(labels)
    # Position p predicts token p + 1: only positions 0-3 predict a response token in some row.
    assert positions.tolist() == [0, 1, 2, 3]
    kept = summed_loss(logits[:, positions], targets)
    assert kept.item() == pytest.approx(by_hand.item(), rel=1e-6)

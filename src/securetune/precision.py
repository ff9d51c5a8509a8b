"""Where a job computes and in which floating-point precision: `auto` follows the hardware.

`job_device` is the one place that decides the device: every stage that loads a model loads it
there (`models.load_model`) and moves its batches to the model's device. A job that SLURM gave a
GPU computes on it; elsewhere on the CPU. `SECURETUNE_DEVICE` (cpu, cuda, cuda:1, ...) overrides
the choice, e.g. to keep a job on the CPU of a GPU node.

bfloat16 halves the memory traffic and, where the hardware computes it natively (a CUDA GPU with
bf16, an x86 CPU with AVX512-BF16 or AMX, an Arm CPU with the BF16 extension), about doubles the
speed. Elsewhere PyTorch emulates it: on an AVX2-only CPU a 512x576 by 576x1536 matmul took
26.6 ms in float32 and 815.7 ms in bfloat16 (30x slower, BENCHMARKS.md). So `auto` is bfloat16
where it is native and float32 elsewhere; an explicit value always wins, with a warning when it
asks for emulated bfloat16.

Detected once per process from /proc/cpuinfo and, in a process that has imported torch, CUDA;
the record goes into the provenance of every table (`io.provenance`), so two runs that differ in
precision never look alike.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
DEVICE_ENV = "SECURETUNE_DEVICE"
# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later) compute
# bfloat16 dot products; Arm: the BF16 extension (Neoverse V1/N2, Graviton 3 and later).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
EMULATED_BF16_COST = (
    "PyTorch emulates bfloat16 on this CPU (no AVX512-BF16, AMX or Arm BF16): its matmuls run "
    "about 30x slower than float32 (BENCHMARKS.md, machine_speed)"
)


@dataclass(frozen=True)
class Hardware:
    """Where a job computes, and whether bfloat16 is native there."""

    device: str  # cuda or cpu
    native_bf16: bool

    def record(self) -> dict[str, object]:
        return asdict(self)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo (`flags` on x86, `Features` on Arm)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def _read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU computes bfloat16 in hardware (macOS on Apple silicon counts as Arm
    with BF16 only from M2 on, which /proc/cpuinfo cannot tell: treated as emulated)."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    return bool(cpu_flags(text) & NATIVE_BF16_FLAGS)


def job_device(local_rank: int | None = None):
    """The torch device this job computes on: `SECURETUNE_DEVICE` if set, else this process's GPU
    (`local_rank`, or LOCAL_RANK under torchrun; SLURM's CUDA_VISIBLE_DEVICES has already narrowed
    the GPUs to the job's own), else the CPU."""
    import torch

    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _forced_device_type() -> str | None:
    forced = os.environ.get(DEVICE_ENV)
    return forced.split(":")[0] if forced else None


def _cuda_bf16() -> bool | None:
    """CUDA's bf16 support when this process has torch and computes on a GPU; None otherwise."""
    torch = sys.modules.get("torch")
    if (
        torch is None
        or not torch.cuda.is_available()
        or _forced_device_type() not in (None, "cuda")
    ):
        return None
    return bool(torch.cuda.is_bf16_supported())


@functools.cache
def detect() -> Hardware:
    """The hardware of this process, detected once and logged."""
    cuda = _cuda_bf16()
    if cuda is not None:
        hardware = Hardware("cuda", cuda)
    else:
        hardware = Hardware("cpu", cpu_has_native_bf16())
    log.info(
        "hardware: %s (%s), native bfloat16: %s",
        hardware.device,
        platform.machine(),
        "yes" if hardware.native_bf16 else "no",
    )
    return hardware


def choose_dtype(requested: str, hardware: Hardware) -> str:
    """The weights' dtype for inference: `auto` is bfloat16 where native, else float32."""
    if requested != AUTO:
        return requested
    return "bfloat16" if hardware.native_bf16 else "float32"


def choose_autocast(requested: str, hardware: Hardware) -> str:
    """Training's autocast: `auto` is bfloat16 where native, else none (plain float32)."""
    if requested != AUTO:
        return requested
    return "bfloat16" if hardware.native_bf16 else "none"


def _warn_if_emulated(choice: str, hardware: Hardware, key: str) -> None:
    if choice == "bfloat16" and hardware.device == "cpu" and not hardware.native_bf16:
        log.warning("%s is bfloat16, but %s; use auto or float32", key, EMULATED_BF16_COST)


def _resolve(requested: str, hardware: Hardware | None, key: str, choose) -> str:
    hardware = hardware or detect()
    choice = choose(requested, hardware)
    _warn_if_emulated(choice, hardware, key)
    if requested == AUTO:
        log.info("%s auto -> %s on %s", key, choice, hardware.device)
    return choice


def resolve_dtype(requested: str, hardware: Hardware | None = None, key: str = "dtype") -> str:
    """`requested` (a dtype or auto) for this process's hardware, the choice logged."""
    return _resolve(requested, hardware, key, choose_dtype)


def resolve_autocast(
    requested: str, hardware: Hardware | None = None, key: str = "autocast"
) -> str:
    """`requested` (none, bfloat16 or auto) for this process's hardware, the choice logged."""
    return _resolve(requested, hardware, key, choose_autocast)

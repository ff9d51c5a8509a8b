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

The flags alone do not make bfloat16 fast: on a 2-core Xeon VM that reports avx512_bf16 but no
AMX, one thread's bfloat16 matmul ran at 0.58x float32's speed and a SmolLM2 forward took 1.7x
as long (BENCHMARKS.md). So on a CPU whose flags say native, `auto` also times one thread's
matmul in both dtypes and takes bfloat16 only where it is at least BF16_MIN_SPEEDUP times as
fast: the elementwise ops, which bfloat16 does not speed up, eat part of the gain (on a Zen 4 a
4.2x faster matmul made the demo 1.5x faster).

Detected once per process from /proc/cpuinfo, that timing and, in a process that has imported
torch, CUDA; the record goes into the provenance of every table (`io.provenance`), so two runs
that differ in precision never look alike.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


# One SmolLM2 MLP projection on a 512-token batch (2 * 512 * 576 * 1536 FLOPs): the demo's kind
# of matmul, small enough to time in well under a second.
MATMUL_SHAPE = (512, 576, 1536)
BF16_MIN_SPEEDUP = 1.5
SLOW_BF16_COST = (
    "this CPU's bfloat16 instructions are slower than its float32 ones (one thread's matmul "
    "timed at start): bfloat16 runs slower than float32 here"
)


@dataclass(frozen=True)
class Hardware:
    """Where a job computes, whether bfloat16 is native there, and whether it pays: `auto` takes
    bfloat16 only where both hold. `bf16_pays` is None where it was not timed: a job that loads
    no model (it never imports torch, and never resolves `auto`), or a record written before
    the timing existed, when the flags alone decided."""

    device: str  # cuda or cpu
    native_bf16: bool
    bf16_pays: bool | None = None

    @property
    def auto_bf16(self) -> bool:
        return self.native_bf16 and self.bf16_pays is not False

    def bf16_kind(self) -> str:
        """bfloat16 here in words: native, native but slower than float32, or emulated."""
        if not self.native_bf16:
            return "emulated"
        if self.bf16_pays is None:
            return "native (speed not timed)"
        return "native" if self.bf16_pays else "native but slower than float32 here"

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


def matmul_gflops(dtype, repeats: int = 5, shape: tuple[int, int, int] = MATMUL_SHAPE) -> float:
    """This thread's best GFLOP/s over `repeats` products of `shape` in `dtype` (a torch dtype),
    after one warm-up; the best, since another job may share the core for part of the time."""
    import torch

    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2 * m * k * n / best / 1e9


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside, its thread count restored after: a matmul's speed per thread
    does not depend on how many threads the job was given."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_bf16_speedup(repeats: int = 5) -> float:
    """One thread's bfloat16 matmul GFLOP/s over its float32 GFLOP/s (>1: bfloat16 faster)."""
    import torch

    with one_thread():
        return matmul_gflops(torch.bfloat16, repeats) / matmul_gflops(torch.float32, repeats)


def _loads_models() -> bool:
    return "torch" in sys.modules


def cpu_hardware(
    cpuinfo: str | None = None, speedup=cpu_bf16_speedup, timed: bool | None = None
) -> Hardware:
    """The CPU as `auto` sees it. `speedup` is timed only where the flags say bfloat16 is native
    (elsewhere it is emulated, about 30x slower, and timing it would take seconds) and in a
    process that has torch (`timed`; a data or scoring job would import it for nothing)."""
    if not cpu_has_native_bf16(cpuinfo):
        return Hardware("cpu", native_bf16=False, bf16_pays=False)
    if not (_loads_models() if timed is None else timed):
        return Hardware("cpu", native_bf16=True, bf16_pays=None)
    ratio = speedup()
    log.info("bfloat16 matmul %.2fx float32's speed on one thread of this CPU", ratio)
    return Hardware("cpu", native_bf16=True, bf16_pays=ratio >= BF16_MIN_SPEEDUP)


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
    hardware = Hardware("cuda", cuda, cuda) if cuda is not None else cpu_hardware()
    log.info(
        "hardware: %s (%s), native bfloat16: %s, faster than float32: %s",
        hardware.device,
        platform.machine(),
        "yes" if hardware.native_bf16 else "no",
        {True: "yes", False: "no", None: "not timed"}[hardware.bf16_pays],
    )
    return hardware


def choose_dtype(requested: str, hardware: Hardware) -> str:
    """The weights' dtype for inference: `auto` is bfloat16 where native and faster, else
    float32."""
    if requested != AUTO:
        return requested
    return "bfloat16" if hardware.auto_bf16 else "float32"


def choose_autocast(requested: str, hardware: Hardware) -> str:
    """Training's autocast: `auto` is bfloat16 where native and faster, else none (plain
    float32)."""
    if requested != AUTO:
        return requested
    return "bfloat16" if hardware.auto_bf16 else "none"


def _warn_if_emulated(choice: str, hardware: Hardware, key: str) -> None:
    if choice != "bfloat16" or hardware.device != "cpu" or hardware.auto_bf16:
        return
    cost = SLOW_BF16_COST if hardware.native_bf16 else EMULATED_BF16_COST
    log.warning("%s is bfloat16, but %s; use auto or float32", key, cost)


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

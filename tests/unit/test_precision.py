"""`auto` precision: bfloat16 only where the hardware computes it natively (detection injected)."""

from __future__ import annotations

import logging

import pytest
import torch

from securetune.io import provenance
from securetune.precision import (
    Hardware,
    choose_autocast,
    choose_dtype,
    cpu_bf16_speedup,
    cpu_flags,
    cpu_hardware,
    cpu_has_native_bf16,
    detect,
    matmul_gflops,
    resolve_autocast,
    resolve_dtype,
)
from securetune.report.tables import precision_section

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "Features\t: fp asimd atomics\n"


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        (AVX2_ONLY, False),
        (SAPPHIRE_RAPIDS, True),
        (GRAVITON3, True),
        (GRAVITON2, False),
        ("", False),
    ],
)
def test_native_bf16_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native


def test_native_flags_with_a_slower_bfloat16_matmul_compute_in_float32():
    # A Xeon VM with avx512_bf16 but no AMX timed bfloat16 at 0.58x float32's speed.
    slow = cpu_hardware(SAPPHIRE_RAPIDS, speedup=lambda: 0.58, timed=True)
    assert slow.native_bf16 and not slow.bf16_pays
    assert (choose_dtype("auto", slow), choose_autocast("auto", slow)) == ("float32", "none")
    fast = cpu_hardware(SAPPHIRE_RAPIDS, speedup=lambda: 4.2, timed=True)
    assert (choose_dtype("auto", fast), choose_autocast("auto", fast)) == ("bfloat16", "bfloat16")


def test_no_timing_where_the_flags_say_emulated():
    def untimed() -> float:
        raise AssertionError("an emulated bfloat16 matmul was timed")

    hardware = cpu_hardware(AVX2_ONLY, speedup=untimed, timed=True)
    assert hardware == Hardware("cpu", native_bf16=False, bf16_pays=False)


def test_a_job_without_torch_leaves_the_speed_untimed():
    def untimed() -> float:
        raise AssertionError("a job that loads no model timed a matmul")

    hardware = cpu_hardware(SAPPHIRE_RAPIDS, speedup=untimed, timed=False)
    assert hardware.bf16_pays is None and hardware.bf16_kind() == "native (speed not timed)"
    # A record written before the timing existed: the flags decided, as they still do here.
    assert Hardware(**{"device": "cpu", "native_bf16": True}).auto_bf16


def test_the_timing_is_a_ratio_of_real_matmuls():
    assert matmul_gflops(torch.float32, repeats=2, shape=(64, 64, 64)) > 0
    assert cpu_bf16_speedup(repeats=1) > 0


def test_flags_of_x86_and_arm():
    assert {"avx2", "fma"} <= cpu_flags(AVX2_ONLY)
    assert "bf16" in cpu_flags(GRAVITON3)


@pytest.mark.parametrize(
    ("hardware", "dtype", "autocast"),
    [
        (Hardware("cpu", False), "float32", "none"),
        (Hardware("cpu", True, bf16_pays=True), "bfloat16", "bfloat16"),
        (Hardware("cpu", True, bf16_pays=False), "float32", "none"),  # native but slower
        (Hardware("cuda", True), "bfloat16", "bfloat16"),
        (Hardware("cuda", False), "float32", "none"),  # e.g. a V100: no bf16
    ],
)
def test_auto_follows_the_hardware(hardware, dtype, autocast):
    assert choose_dtype("auto", hardware) == dtype
    assert choose_autocast("auto", hardware) == autocast


def test_an_explicit_value_wins():
    assert choose_dtype("float32", Hardware("cuda", True)) == "float32"
    assert choose_dtype("bfloat16", Hardware("cpu", False)) == "bfloat16"
    assert choose_autocast("none", Hardware("cpu", True)) == "none"


def test_forced_bfloat16_on_a_cpu_without_it_warns_with_the_cost(caplog):
    with caplog.at_level(logging.WARNING, logger="securetune.precision"):
        assert resolve_dtype("bfloat16", Hardware("cpu", False), key="model.dtype") == "bfloat16"
        assert resolve_autocast("bfloat16", Hardware("cpu", False)) == "bfloat16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "model.dtype is bfloat16" in warnings[0] and "30x slower" in warnings[0]


def test_forced_bfloat16_where_it_is_native_but_slower_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="securetune.precision"):
        resolve_autocast("bfloat16", Hardware("cpu", True, bf16_pays=False), key="align.autocast")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "align.autocast is bfloat16" in warning and "slower than float32" in warning


def test_no_warning_where_bfloat16_is_native_or_auto_avoids_it(caplog):
    with caplog.at_level(logging.WARNING, logger="securetune.precision"):
        resolve_dtype("bfloat16", Hardware("cpu", True))
        resolve_dtype("bfloat16", Hardware("cuda", True))
        assert resolve_dtype("auto", Hardware("cpu", False)) == "float32"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_every_table_records_the_precision_it_was_computed_under():
    record = provenance(0)["precision"]
    assert record == detect().record() and set(record) == {"device", "native_bf16", "bf16_pays"}


def test_the_report_says_what_auto_became():
    requested = {"model.dtype": "auto", "finetune.autocast": "auto", "align.autocast": "none"}
    line = precision_section({"device": "cpu", "native_bf16": False}, requested)
    assert "bfloat16 emulated" in line
    assert "`model.dtype` auto -> float32" in line and "`finetune.autocast` auto -> none" in line
    assert "`align.autocast` none" in line
    native = precision_section({"device": "cuda", "native_bf16": True}, requested)
    assert "`model.dtype` auto -> bfloat16" in native and native != line
    slow = precision_section({"device": "cpu", "native_bf16": True, "bf16_pays": False}, requested)
    assert "native but slower than float32" in slow and "auto -> float32" in slow

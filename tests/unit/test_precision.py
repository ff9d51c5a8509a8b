"""`auto` precision: bfloat16 only where the hardware computes it natively (detection injected)."""

from __future__ import annotations

import logging

import pytest

from securetune.io import provenance
from securetune.precision import (
    Hardware,
    choose_autocast,
    choose_dtype,
    cpu_flags,
    cpu_has_native_bf16,
    detect,
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


def test_flags_of_x86_and_arm():
    assert {"avx2", "fma"} <= cpu_flags(AVX2_ONLY)
    assert "bf16" in cpu_flags(GRAVITON3)


@pytest.mark.parametrize(
    ("hardware", "dtype", "autocast"),
    [
        (Hardware("cpu", False), "float32", "none"),
        (Hardware("cpu", True), "bfloat16", "bfloat16"),
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


def test_no_warning_where_bfloat16_is_native_or_auto_avoids_it(caplog):
    with caplog.at_level(logging.WARNING, logger="securetune.precision"):
        resolve_dtype("bfloat16", Hardware("cpu", True))
        resolve_dtype("bfloat16", Hardware("cuda", True))
        assert resolve_dtype("auto", Hardware("cpu", False)) == "float32"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_every_table_records_the_precision_it_was_computed_under():
    record = provenance(0)["precision"]
    assert record == detect().record() and set(record) == {"device", "native_bf16"}


def test_the_report_says_what_auto_became():
    requested = {"model.dtype": "auto", "finetune.autocast": "auto", "align.autocast": "none"}
    line = precision_section({"device": "cpu", "native_bf16": False}, requested)
    assert "bfloat16 emulated" in line
    assert "`model.dtype` auto -> float32" in line and "`finetune.autocast` auto -> none" in line
    assert "`align.autocast` none" in line
    native = precision_section({"device": "cuda", "native_bf16": True}, requested)
    assert "`model.dtype` auto -> bfloat16" in native and native != line

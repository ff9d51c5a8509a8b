"""The held-out IFT loss in bfloat16 against the float32 one the workflow writes, per arm.

Decides whether `heldout_ift_loss` may follow `model.dtype: auto` (bfloat16 where native, about
a fifth of the float32 time there): it may not if bfloat16 moves an arm's mean loss by a
sizeable share of the gaps between arms.

    python bench/heldout_precision.py --workdir DEMO_RUN [--domain math] ARM ...
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from securetune.finetune.loss import example_losses
from securetune.finetune.sft_data import encode_examples
from securetune.models import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a finished run's folder")
    parser.add_argument("--domain", default="math")
    parser.add_argument("--threads", type=int, default=1)
    # The demo's finetune.max_seq_len and batch size, which the held-out loss job reads.
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("arms", nargs="+", help="base or a fine-tuned arm of the domain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = args.workdir / "results"
    heldout = pd.read_parquet(results / args.domain / "data" / "ift_heldout.parquet")
    print("| arm | float32 mean | bfloat16 mean | difference | largest per example | bf16 s |")
    print("|---|---|---|---|---|---|")
    for arm in args.arms:
        model = results / args.domain / "finetune" / arm / "model"
        if arm == "base":
            model = results / "model" / "base"
        tokenizer = load_tokenizer(model)
        examples = encode_examples(
            tokenizer, list(heldout["prompt"]), list(heldout["response"]), args.max_seq_len
        )
        network = load_model(model, "bfloat16")
        start = time.perf_counter()
        losses = example_losses(network, examples, tokenizer.pad_token_id, args.batch_size)
        seconds = time.perf_counter() - start
        bf16 = np.array([total / tokens for total, tokens in losses])
        fp32 = pd.read_parquet(results / args.domain / "ift_loss" / f"{arm}.parquet")["loss"]
        fp32 = fp32.to_numpy()
        print(
            f"| {arm} | {fp32.mean():.4f} | {bf16.mean():.4f} | {bf16.mean() - fp32.mean():+.4f} "
            f"| {np.abs(bf16 - fp32).max():.4f} | {seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Stage 6: benign instruction fine-tuning of one arm, with per-module learning rates.

Run as a module so the workflow can launch it alone or under torchrun:
    python -m securetune.finetune --model DIR --data ift.parquet --arm-config '{...}' ...
    torchrun --standalone --nproc_per_node=N -m securetune.finetune ... [--resume]
The arms differ only in their optimizer groups (see `param_groups`): same data, order, steps,
schedule and seed, so any difference in safety comes from the learning rates.

How a step is computed, and why:
- Data: chat-templated (prompt, response) pairs, loss on the response tokens only. Examples are
  right-padded to the longest one in the micro-batch, not packed: packing would let an example
  attend to its neighbours unless the attention is masked per example, and padding keeps every
  example's loss independent of what it is batched with (so 1 process and N give the same loss).
- A step is one global batch of `batch_size` examples in a seeded order shared by every arm.
  Under torchrun each rank takes a contiguous 1/N of it, optionally in micro-batches. The loss is
  the sum of token losses divided by the global batch's response-token count (known to every
  rank from the data, so no extra communication), times N because DDP averages gradients: the
  gradient is the single-process one whatever N and the micro-batch size.
- The learning rate of every group is its base rate times one schedule factor (warm-up, then
  constant, linear or cosine decay), so the ratio between groups holds at every step. SWAT's
  `rest` group is held (rate 0, gradient dropped before the update, so neither Adam's moments nor
  weight decay touch it) before its switch step, then follows the same schedule as everything else.
- Checkpoints (every `checkpoint_every` steps): the trainable parameters, the optimizer state,
  every rank's RNG state, the step and the per-step log so far, written to a temporary folder and
  renamed into place, so a kill never leaves a half checkpoint. `--resume` continues from the
  latest one; the schedule is a pure function of the step, so the step is its whole state.
  A new checkpoint replaces the previous one, deleted just before the write (one on disk; a kill
  during the write leaves none, and the retry starts from step 0) or, with
  `--keep-previous-checkpoint`, once the new one is complete (two on disk at the peak).
- Time limits: in a SLURM job, training stops with a checkpoint when the job's time left falls
  under a margin (the slowest step and a checkpoint write, with room to spare) and exits with
  code 75, so the retry resumes from it instead of a kill catching a write (`deadline`).

The package, in the order a step needs it: `sft_data` (examples, batch order, micro-batches),
`loss` (the summed response-token loss), `distributed` (processes, gradient norms, clipping),
`model_setup` (loading, LoRA, freezing), `checkpoints`, `deadline` (the stop before a time
limit), `train` (the loop, top to bottom) and `__main__` (the command line).
"""

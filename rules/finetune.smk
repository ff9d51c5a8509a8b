rule finetune:
    """Benign IFT of one arm on one domain's data: python -m securetune.finetune, under torchrun when
    finetune.processes > 1 (one process per GPU on a cluster)."""
    input:
        unpack(finetune_inputs),
    output:
        # finetune.keep_weights: false deletes an arm's weights once its scores are written.
        model=arm_weights_output("results/{domain}/finetune/{arm}/model"),
        steps="results/{domain}/finetune/{arm}/loss.parquet",
    log:
        "logs/{domain}/finetune/{arm}.log",
    benchmark:
        "benchmarks/{domain}/finetune/{arm}.tsv"
    priority: finetune_priority
    conda:
        "../envs/torch.yaml"
    threads: jobs.finetune_threads(config)
    resources:
        # 0 trains on CPU (gloo under torchrun); otherwise one per process (checked at start).
        gpu=config["finetune"].get("gpus", 0),
    params:
        settings=arm_settings,
        plan=plan_flag,
        launcher=training_launcher,
        omp_threads=threads_per_process,
        save_dtype=config["finetune"].get("save_dtype", "base"),
        checkpoints=checkpoint_options,
    # --resume matching: a retry (after SLURM's time limit, say) continues from the checkpoint
    # its killed attempt left in <model>.checkpoints; one left by other settings is deleted.
    # --keep-checkpoints: the last one stays until the run ends (Snakefile, onsuccess/onerror).
    # params.checkpoints: whether a checkpoint is deleted before or after its successor is
    # written, and whether the job stops with a checkpoint before its time limit.
    shell:
        "OMP_NUM_THREADS={params.omp_threads} {params.launcher} -m securetune.finetune"
        " --model {input.model:q} --data {input.data:q} {params.plan}"
        " --arm-config {params.settings:q} --resume matching --keep-checkpoints"
        " {params.checkpoints} --save-dtype {params.save_dtype}"
        " --out-model {output.model:q} --out-log {output.steps:q} --log-file {log:q}"

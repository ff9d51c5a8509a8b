rule finetune:
    """Benign IFT of one arm; launched as a module so the cluster can run it under torchrun."""
    input:
        unpack(finetune_inputs),
    output:
        model=directory("results/finetune/{arm}/model"),
        steps="results/finetune/{arm}/loss.parquet",
    log:
        "logs/finetune/{arm}.log",
    benchmark:
        "benchmarks/finetune/{arm}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        settings=arm_settings,
        plan=plan_flag,
    shell:
        "OMP_NUM_THREADS={threads} python -m securetune.finetune"
        " --model {input.model:q} --data {input.data:q} {params.plan}"
        " --arm-config {params.settings:q}"
        " --out-model {output.model:q} --out-log {output.steps:q} --log-file {log:q}"

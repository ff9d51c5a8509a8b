# One job per (layer, module type): the cluster fan-out (robustness.jobs: per_module). On one
# machine one job per layer (per_layer) scores its module types in one process, saving a torch
# import and a model load per module; both write the same per-module tables, so switching
# between them reruns nothing.


rule score_module:
    """Perturb each module of the job alone and re-score the frozen probe."""
    input:
        **ift_set_if(jobs.robustness_reads_ift_set(config)),
        model=BASE_MODEL,
        probe_set=PROBE_SET,
        features="results/features/features.safetensors",
        probes="results/probe/probes.safetensors",
        proxy="results/probe/proxy.json",
    output:
        jobs.ROBUSTNESS_TABLE,
    log:
        "logs/score_module/layer{layer}/{module_type}.log",
    benchmark:
        "benchmarks/score_module/layer{layer}/{module_type}.tsv"
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        settings=settings_of(RobustnessSettings),
    script:
        "../workflow_scripts/score_module.py"


use rule score_module as score_layer with:
    output:
        jobs.layer_tables(config),
    log:
        "logs/score_layer/layer{layer}.log",
    benchmark:
        "benchmarks/score_layer/layer{layer}.tsv"


if config["robustness"]["jobs"] == "per_layer":

    ruleorder: score_layer > score_module

else:

    ruleorder: score_module > score_layer


rule aggregate_robustness:
    """All per-module tables in one tidy Parquet, schema-checked."""
    input:
        jobs.robustness_tables(config),
    output:
        "results/robustness.parquet",
    log:
        "logs/aggregate_robustness.log",
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/aggregate_robustness.py"

rule score_module:
    """Perturb one module alone and re-score the frozen probe: one job per (layer, module)."""
    input:
        model="results/model/base",
        probe_set="results/data/probe.parquet",
        features="results/features/features.safetensors",
        probes="results/probe/probes.safetensors",
        proxy="results/probe/proxy.json",
    output:
        "results/robustness/layer{layer}/{module_type}.parquet",
    log:
        "logs/score_module/layer{layer}/{module_type}.log",
    benchmark:
        "benchmarks/score_module/layer{layer}/{module_type}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        robustness=robustness_settings(),
        features=settings("features"),
        max_prompt_tokens=config["data"]["max_prompt_tokens"],
        dtype=config["model"]["dtype"],
        source=config["model"]["source"],
        seed=config["seed"],
        inject_failure=injected_failure,
    script:
        "../workflow_scripts/score_module.py"


rule aggregate_robustness:
    """All per-module tables in one tidy Parquet, schema-checked."""
    input:
        robustness_jobs(),
    output:
        "results/robustness.parquet",
    log:
        "logs/aggregate_robustness.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/aggregate_robustness.py"

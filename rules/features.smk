rule extract_features:
    """Last-token hidden states of every layer for the probe set's prompts."""
    input:
        model="results/model/base",
        probe_set="results/data/probe.parquet",
        checked="results/data/prompt_check.json",
    output:
        "results/features/features.safetensors",
    log:
        "logs/extract_features.log",
    benchmark:
        "benchmarks/extract_features.tsv"
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        pooling=config["features"]["pooling"],
        batch_size=config["features"]["batch_size"],
        max_prompt_tokens=config["data"]["max_prompt_tokens"],
        dtype=config["model"]["dtype"],
    script:
        "../workflow_scripts/extract_features.py"

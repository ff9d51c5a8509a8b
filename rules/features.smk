rule extract_features:
    """Last-token hidden states of every layer for the probe set's prompts."""
    input:
        model=BASE_MODEL,
        probe_set=PROBE_SET,
        checked=PROMPTS_CHECKED,
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
        settings=settings_of(FeatureSettings),
    script:
        "../workflow_scripts/extract_features.py"

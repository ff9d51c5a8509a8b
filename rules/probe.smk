rule train_probe:
    """Logistic-regression probe per layer; held-out accuracy; the proxy layers."""
    input:
        "results/features/features.safetensors",
    output:
        probes="results/probe/probes.safetensors",
        accuracy="results/probe/accuracy.parquet",
        proxy="results/probe/proxy.json",
    log:
        "logs/train_probe.log",
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    params:
        settings=settings_of(ProbeSettings),
    script:
        "../workflow_scripts/train_probe.py"

rule search_robust_modules:
    """Greedy proxy-guided search for Mods_Robust; a JSON plan and a Parquet trace."""
    input:
        model="results/model/base",
        probe_set="results/data/probe.parquet",
        features="results/features/features.safetensors",
        probes="results/probe/probes.safetensors",
        proxy="results/probe/proxy.json",
        robustness="results/robustness.parquet",
        ift_set="results/data/ift.parquet",
    output:
        plan="results/search/plan.json",
        trace="results/search/trace.parquet",
    log:
        "logs/search_robust_modules.log",
    benchmark:
        "benchmarks/search_robust_modules.tsv"
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        search=settings("search"),
        robustness=settings("robustness"),
        features=settings("features"),
        max_prompt_tokens=config["data"]["max_prompt_tokens"],
        dtype=config["model"]["dtype"],
        seed=config["seed"],
    script:
        "../workflow_scripts/search_robust_modules.py"

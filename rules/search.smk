rule search_robust_modules:
    """Greedy proxy-guided search for Mods_Robust; a JSON plan and a Parquet trace."""
    input:
        **ift_set_if(jobs.search_reads_ift_set(config)),
        model=BASE_MODEL,
        probe_set=PROBE_SET,
        features="results/features/features.safetensors",
        probes="results/probe/probes.safetensors",
        proxy="results/probe/proxy.json",
        robustness="results/robustness.parquet",
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
        settings=settings_of(SearchSettings),
    script:
        "../workflow_scripts/search_robust_modules.py"

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


rule attribute_modules:
    """Wei et al.'s SNIP set difference per module (safety vs utility importance): the
    attribution selector's ranking."""
    input:
        model=BASE_MODEL,
        probe_set=PROBE_SET,
        utility_set=jobs.ROBUSTNESS_IFT_SET,
    output:
        table="results/selectors/attribution.parquet",
    log:
        "logs/attribute_modules.log",
    benchmark:
        "benchmarks/attribute_modules.tsv"
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        settings=settings_of(AttributionSettings),
    script:
        "../workflow_scripts/attribute_modules.py"


rule select_modules:
    """A control module set of Mods_Robust's size (random draw, inverse, attribution), written
    as a plan the fine-tune reads like the search's."""
    input:
        unpack(selector_inputs),
        model=BASE_MODEL,
        plan=jobs.SEARCH_PLAN,
        robustness="results/robustness.parquet",
    output:
        plan="results/selectors/{selection}.json",
    log:
        "logs/select_modules/{selection}.log",
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    params:
        settings=lambda wc: settings_of(SelectorSettings, wc.selection),
    script:
        "../workflow_scripts/select_modules.py"

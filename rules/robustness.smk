# One job per (layer, module type) with robustness.modules_per_job = 1 (the cluster fan-out);
# with more, one job per chunk of modules, writing the same per-module files from one process
# (a Snakemake `group:` would not save the start-up: locally each job still runs its own script).


if config["robustness"]["modules_per_job"] == 1:

    rule score_module:
        """Perturb one module alone and re-score the frozen probe: one job per (layer, module)."""
        input:
            model="results/model/base",
            probe_set="results/data/probe.parquet",
            features="results/features/features.safetensors",
            probes="results/probe/probes.safetensors",
            proxy="results/probe/proxy.json",
            ift_set="results/data/ift.parquet",
        output:
            "results/robustness/layer{layer}/{module_type}.parquet",
        log:
            "logs/score_module/layer{layer}/{module_type}.log",
        benchmark:
            "benchmarks/score_module/layer{layer}/{module_type}.tsv"
        priority: PLAN_PRIORITY
        conda:
            "../envs/torch.yaml"
        threads: 1
        params:
            modules=lambda wc: [f"L{wc.layer}.{wc.module_type}"],
            robustness=robustness_settings(),
            features=settings("features"),
            max_prompt_tokens=config["data"]["max_prompt_tokens"],
            dtype=config["model"]["dtype"],
            source=config["model"]["source"],
            seed=config["seed"],
            inject_failure=lambda wc: injected_failures(
                [f"L{wc.layer}.{wc.module_type}"]
            ),
        script:
            "../workflow_scripts/score_module.py"

else:
    for chunk_index, chunk in enumerate(module_chunks()):

        rule:
            """Perturb each module of a chunk alone, in one process (model loaded once)."""
            name:
                f"score_modules_{chunk_index}"
            input:
                model="results/model/base",
                probe_set="results/data/probe.parquet",
                features="results/features/features.safetensors",
                probes="results/probe/probes.safetensors",
                proxy="results/probe/proxy.json",
                ift_set="results/data/ift.parquet",
            output:
                [robustness_file(layer, module_type) for layer, module_type in chunk],
            log:
                f"logs/score_modules/chunk{chunk_index}.log",
            benchmark:
                f"benchmarks/score_modules/chunk{chunk_index}.tsv"
            priority: PLAN_PRIORITY
            conda:
                "../envs/torch.yaml"
            threads: 1
            params:
                modules=module_names(chunk),
                robustness=robustness_settings(),
                features=settings("features"),
                max_prompt_tokens=config["data"]["max_prompt_tokens"],
                dtype=config["model"]["dtype"],
                source=config["model"]["source"],
                seed=config["seed"],
                inject_failure=injected_failures(module_names(chunk)),
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
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/aggregate_robustness.py"

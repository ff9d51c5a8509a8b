rule prepare_probe_set:
    """Harmful vs benign look-alike prompts, balanced, train/test + out-of-domain test split."""
    output:
        "results/data/probe.parquet",
    log:
        "logs/prepare_probe_set.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        settings=settings_of(ProbeSetSettings),
    script:
        "../workflow_scripts/prepare_probe_set.py"


rule prepare_ift_set:
    """A domain's benign instruction-tuning examples, disjoint from the probe set."""
    input:
        probe=PROBE_SET,
    output:
        "results/{domain}/data/ift.parquet",
    log:
        "logs/{domain}/prepare_ift_set.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        settings=lambda wc: settings_of(IftSetSettings, wc.domain),
    script:
        "../workflow_scripts/prepare_ift_set.py"


rule prepare_ift_heldout:
    """A domain's held-out examples of its IFT source (the rows after the training set's): the
    task metric."""
    input:
        probe=PROBE_SET,
    output:
        "results/{domain}/data/ift_heldout.parquet",
    log:
        "logs/{domain}/prepare_ift_heldout.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        settings=lambda wc: IftSetSettings.heldout_from_config(
            config, wc.domain
        ).to_params(),
    script:
        "../workflow_scripts/prepare_ift_set.py"


rule prepare_robustness_ift_set:
    """The `ift` perturbation's examples (robustness.ift), shared by every domain."""
    input:
        probe=PROBE_SET,
    output:
        jobs.ROBUSTNESS_IFT_SET,
    log:
        "logs/prepare_robustness_ift_set.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        settings=IftSetSettings.robustness_from_config(config).to_params(),
    script:
        "../workflow_scripts/prepare_ift_set.py"


rule fetch_benchmark:
    """A benchmark's full set from the Hugging Face hub (evaluation.sources.<name>: hf:<id>),
    written in the bundled file's format; local: it needs the network a login node has.
    """
    output:
        directory("results/data/full/{benchmark}"),
    log:
        "logs/fetch_benchmark/{benchmark}.log",
    localrule: True
    conda:
        "../envs/torch.yaml"
    params:
        source=lambda wc: configured_source(wc.benchmark),
    script:
        "../workflow_scripts/fetch_benchmark.py"


rule prepare_eval_set:
    """Held-out prompts of one benchmark, none of them in the probe set."""
    input:
        unpack(eval_set_inputs),
    output:
        "results/data/eval/{benchmark}.parquet",
    log:
        "logs/prepare_eval_set/{benchmark}.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        source=benchmark_source,
        settings=lambda wc: settings_of(EvalSetSettings, wc.benchmark),
    script:
        "../workflow_scripts/prepare_eval_set.py"


rule check_prompts:
    """Probe and eval prompts fit data.max_prompt_tokens and the context (else: file, row, id)."""
    input:
        model=BASE_MODEL,
        tables=[
            PROBE_SET,
            *expand("results/data/eval/{benchmark}.parquet", benchmark=benchmarks()),
        ],
    output:
        "results/data/prompt_check.json",
    log:
        "logs/check_prompts.log",
    priority: PLAN_PRIORITY
    conda:
        "../envs/torch.yaml"
    params:
        settings=settings_of(PromptCheckSettings),
    script:
        "../workflow_scripts/check_prompts.py"

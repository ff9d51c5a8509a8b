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
        probe=probe_spec(),
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_probe_set.py"


rule prepare_ift_set:
    """Benign instruction-tuning examples, disjoint from the probe set."""
    output:
        "results/data/ift.parquet",
    log:
        "logs/prepare_ift_set.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        source=config["data"]["ift_source"],
        n=config["data"]["ift_examples"],
        skip=0,
        probe=probe_spec(),
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_ift_set.py"


rule prepare_ift_heldout:
    """Held-out examples of the IFT source (the rows after the training set's): the task metric."""
    output:
        "results/data/ift_heldout.parquet",
    log:
        "logs/prepare_ift_heldout.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        source=config["data"]["ift_source"],
        n=config["data"]["ift_heldout_examples"],
        skip=config["data"]["ift_examples"],
        probe=probe_spec(),
        seed=config["seed"],
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
        n=lambda wc: config["evaluation"]["benchmarks"][wc.benchmark],
        probe=probe_spec(),
        source=benchmark_source,
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_eval_set.py"


rule check_prompts:
    """Probe and eval prompts fit data.max_prompt_tokens and the context (else: file, row, id)."""
    input:
        model="results/model/base",
        tables=[
            "results/data/probe.parquet",
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
        max_prompt_tokens=config["data"]["max_prompt_tokens"],
    script:
        "../workflow_scripts/check_prompts.py"

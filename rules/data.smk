rule prepare_probe_set:
    """Harmful vs benign look-alike prompts, balanced, split train/test with the seed."""
    output:
        "results/data/probe.parquet",
    log:
        "logs/prepare_probe_set.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        per_class=config["data"]["probe_per_class"],
        test_fraction=config["data"]["probe_test_fraction"],
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
        probe_per_class=config["data"]["probe_per_class"],
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_ift_set.py"


rule prepare_eval_set:
    """Held-out prompts of one benchmark, none of them in the probe set."""
    input:
        probe="results/data/probe.parquet",
    output:
        "results/data/eval/{benchmark}.parquet",
    log:
        "logs/prepare_eval_set/{benchmark}.log",
    conda:
        "../envs/torch.yaml"
    params:
        data_dir=DATA_DIR,
        n=lambda wc: config["evaluation"]["benchmarks"][wc.benchmark],
        source=benchmark_source,
        probe_per_class=config["data"]["probe_per_class"],
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_eval_set.py"

rule generate:
    """Greedy completions of one model on one benchmark."""
    input:
        model=model_of_arm,
        prompts="results/data/eval/{benchmark}.parquet",
    output:
        "results/generations/{arm}/{benchmark}.parquet",
    params:
        generation=config["generation"],
        dtype=config["model"]["dtype"],
        seed=config["seed"],
    threads: 1
    log:
        "logs/generate/{arm}/{benchmark}.log",
    benchmark:
        "benchmarks/generate/{arm}/{benchmark}.tsv"
    script:
        "../workflow_scripts/generate.py"


rule score_generations:
    """Keyword refusal scoring; separate from generation, so a new scorer never regenerates."""
    input:
        "results/generations/{arm}/{benchmark}.parquet",
    output:
        "results/scores/{arm}/{benchmark}.parquet",
    log:
        "logs/score_generations/{arm}/{benchmark}.log",
    script:
        "../workflow_scripts/score_generations.py"

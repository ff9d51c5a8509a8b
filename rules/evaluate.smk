rule generate:
    """Greedy completions of one model on one benchmark."""
    input:
        model=model_of_arm,
        prompts="results/data/eval/{benchmark}.parquet",
        checked="results/data/prompt_check.json",
    output:
        "results/generations/{arm}/{benchmark}.parquet",
    log:
        "logs/generate/{arm}/{benchmark}.log",
    benchmark:
        "benchmarks/generate/{arm}/{benchmark}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        generation=settings("generation"),
        dtype=config["model"]["dtype"],
        seed=config["seed"],
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
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/score_generations.py"

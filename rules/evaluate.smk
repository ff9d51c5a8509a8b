# Evaluation files of a fine-tuned arm are under results/<domain>/, those of the reference arms
# (base, unaligned: no domain's data touched them) once under results/: {domain_dir} is
# "<domain>/" or "".
# Completions: one job per (arm, benchmark), the cluster fan-out (generation.jobs:
# per_benchmark), or one job per arm that loads the model once and writes the same
# per-benchmark files (per_arm: on one machine a job's start-up - torch import, model load -
# costs as much as its decoding). The key is no param; switching regenerates all the same, since
# the two read different sets of prompt files (Snakemake's input-set trigger).


rule generate:
    """Completions of one model on its benchmarks (vLLM or transformers, from config).

    A shell rule running the module: vLLM spawns workers, which needs a __main__ guard.
    """
    input:
        model=model_of_arm,
        prompts="results/data/eval/{benchmark}.parquet",
        checked=PROMPTS_CHECKED,
    output:
        generations="results/{domain_dir}generations/{arm}/{benchmark}.parquet",
        settings="results/{domain_dir}generations/{arm}/{benchmark}.json",
    log:
        "logs/{domain_dir}generate/{arm}/{benchmark}.log",
    benchmark:
        "benchmarks/{domain_dir}generate/{arm}/{benchmark}.tsv"
    conda:
        generation_env()
    threads: jobs.generation_threads(config)
    resources:
        gpu=config["generation"]["gpus"],
    params:
        generation=generation_settings(),
        dtype=config["model"]["dtype"],
        seed=config["seed"],
    shell:
        'OMP_NUM_THREADS={threads} "$SECURETUNE_PYTHON" -m securetune.generation'
        " --model {input.model:q} --prompts {input.prompts:q} --arm {wildcards.arm}"
        " --out {output.generations:q} --out-meta {output.settings:q}"
        " --settings {params.generation:q} --dtype {params.dtype} --seed {params.seed}"
        " --gpus {resources.gpu} --log-file {log:q}"


# Every input list and output list in the same benchmark order.
use rule generate as generate_arm with:
    input:
        model=model_of_arm,
        prompts=expand("results/data/eval/{benchmark}.parquet", benchmark=benchmarks()),
        checked=PROMPTS_CHECKED,
    output:
        generations=expand(
            "results/{{domain_dir}}generations/{{arm}}/{benchmark}.parquet",
            benchmark=benchmarks(),
        ),
        settings=expand(
            "results/{{domain_dir}}generations/{{arm}}/{benchmark}.json",
            benchmark=benchmarks(),
        ),
    log:
        "logs/{domain_dir}generate/{arm}.log",
    benchmark:
        "benchmarks/{domain_dir}generate/{arm}.tsv"


if config["generation"].get("jobs", "per_benchmark") == "per_arm":

    ruleorder: generate_arm > generate

else:

    ruleorder: generate > generate_arm


rule score_generations:
    """Keyword refusal, exact match and ROUGE-L; separate from generation, so a new scorer
    never regenerates."""
    input:
        "results/{domain_dir}generations/{arm}/{benchmark}.parquet",
    output:
        "results/{domain_dir}scores/{arm}/{benchmark}.parquet",
    log:
        "logs/{domain_dir}score_generations/{arm}/{benchmark}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/score_generations.py"


rule heldout_ift_loss:
    """The arm's loss on held-out examples of the domain's IFT task (response tokens, float32);
    base's too, once per domain."""
    input:
        model=model_of_arm_in_domain,
        heldout="results/{domain}/data/ift_heldout.parquet",
    output:
        "results/{domain}/ift_loss/{arm}.parquet",
    log:
        "logs/{domain}/heldout_ift_loss/{arm}.log",
    benchmark:
        "benchmarks/{domain}/heldout_ift_loss/{arm}.tsv"
    conda:
        "../envs/torch.yaml"
    # One thread: it runs beside the arm's one-thread generation job instead of leaving that
    # job alone on a two-core machine (on CPU two one-thread jobs do the work of one two-thread).
    threads: 1
    resources:
        gpu=min(1, config["generation"]["gpus"]),
    params:
        settings=lambda wc: settings_of(HeldoutLossSettings, wc.domain),
    script:
        "../workflow_scripts/heldout_ift_loss.py"


rule judge_guard:
    """Guard-model verdicts on every harmful completion of one arm: one engine per arm."""
    input:
        generations=harmful_generations,
        model=jobs.guard_model_input(config),
    output:
        "results/{domain_dir}judge/guard/{arm}.parquet",
    log:
        "logs/{domain_dir}judge_guard/{arm}.log",
    benchmark:
        "benchmarks/{domain_dir}judge_guard/{arm}.tsv"
    conda:
        generation_env()
    threads: jobs.generation_threads(config)
    resources:
        gpu=config["generation"]["gpus"],
    params:
        judge_model=guard_model,
        settings=lambda wc: judge_settings(),
        dtype=config["model"]["dtype"],
        seed=config["seed"],
    shell:
        'OMP_NUM_THREADS={threads} "$SECURETUNE_PYTHON" -m securetune.judges guard'
        " --generations {input.generations:q} --judge-model {params.judge_model:q}"
        " --out {output:q} --settings {params.settings:q} --dtype {params.dtype}"
        " --seed {params.seed} --gpus {resources.gpu} --log-file {log:q}"


rule judge_llm:
    """LLM-as-judge harmfulness (1-5) of every harmful completion of one arm, over HTTP."""
    input:
        generations=harmful_generations,
    output:
        "results/{domain_dir}judge/llm/{arm}.parquet",
    log:
        "logs/{domain_dir}judge_llm/{arm}.log",
    conda:
        "../envs/torch.yaml"
    params:
        settings=lambda wc: judge_settings(),
    shell:
        '"$SECURETUNE_PYTHON" -m securetune.judges llm --generations {input.generations:q}'
        " --out {output:q} --settings {params.settings:q} --log-file {log:q}"

rule build_base_model:
    """The base (aligned) model as a safetensors folder: built tiny, or checked and copied."""
    input:
        texts=[
            DATA_DIR / "advbench_harmful_behaviors.csv",
            DATA_DIR / "xstest_prompts.csv",
        ],
    output:
        model=directory("results/model/base"),
    log:
        "logs/build_base_model.log",
    benchmark:
        "benchmarks/build_base_model.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        model=settings("model"),
        seed=config["seed"],
    script:
        "../workflow_scripts/build_base_model.py"

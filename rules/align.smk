# Safety alignment of a base model that does not refuse (the demo's SmolLM2); see align.enabled.
if ALIGN_ENABLED:

    localrules:
        prepare_alignment_set,

    rule prepare_alignment_set:
        """Harmful prompts (to refuse), benign and look-alike prompts (to answer): tail slices of
        the bundled sets, disjoint from every probe, IFT and evaluation prompt."""
        input:
            probe=PROBE_SET,
        output:
            "results/data/align.parquet",
        log:
            "logs/prepare_alignment_set.log",
        conda:
            "../envs/torch.yaml"
        params:
            data_dir=DATA_DIR,
            settings=settings_of(AlignmentSetSettings),
        script:
            "../workflow_scripts/prepare_alignment_set.py"

    rule align_base_model:
        """Short refusal SFT of the source model; the result is the `base` arm."""
        input:
            model=jobs.UNALIGNED_MODEL,
            data="results/data/align.parquet",
        output:
            model=directory(BASE_MODEL),
            steps="results/align/loss.parquet",
            examples="results/align/examples.parquet",
        log:
            "logs/align_base_model.log",
        benchmark:
            "benchmarks/align_base_model.tsv"
        conda:
            "../envs/torch.yaml"
        threads: 2
        params:
            settings=settings_of(AlignSettings),
        script:
            "../workflow_scripts/align_base_model.py"

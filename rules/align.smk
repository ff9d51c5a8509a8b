# Safety alignment of a base model that does not refuse (the demo's SmolLM2); see align.enabled.
if ALIGN_ENABLED:

    rule prepare_alignment_set:
        """Harmful prompts (to refuse), benign and look-alike prompts (to answer): tail slices of
        the bundled sets, disjoint from every probe, IFT and evaluation prompt."""
        output:
            "results/data/align.parquet",
        log:
            "logs/prepare_alignment_set.log",
        conda:
            "../envs/torch.yaml"
        params:
            data_dir=DATA_DIR,
            align=settings("align"),
            probe=probe_spec(),
            eval_sizes=settings("evaluation")["benchmarks"],
            ift_source=config["data"]["ift_source"],
            # the IFT set and its held-out rows: the alignment slice must miss both
            ift_n=config["data"]["ift_examples"]
            + config["data"]["ift_heldout_examples"],
            seed=config["seed"],
        script:
            "../workflow_scripts/prepare_alignment_set.py"

    rule align_base_model:
        """Short refusal SFT of the source model; the result is the `base` arm."""
        input:
            model="results/model/unaligned",
            data="results/data/align.parquet",
        output:
            model=directory("results/model/base"),
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
            align=settings("align"),
            seed=config["seed"],
            dtype=config["model"]["dtype"],
        script:
            "../workflow_scripts/align_base_model.py"

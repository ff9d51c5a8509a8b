# securetune: ML-LR secure fine-tuning (Du et al. 2024) as a workflow.
# Stages, in order: model, align (the demo's base model is safety-aligned first), data, features,
# probe, robustness, search, finetune, evaluate, report. Each rule calls one entry function of
# the package (src/securetune), through a short adapter in workflow_scripts/ or `python -m`.


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/align.smk"
include: "rules/data.smk"
include: "rules/features.smk"
include: "rules/probe.smk"
include: "rules/robustness.smk"
include: "rules/search.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


# Table jobs (seconds of pandas, no model) run on the submit node under `--profile slurm`
# instead of waiting in the queue for an sbatch slot; only model work is submitted.
localrules:
    all,
    paper_tables,
    ablation_gamma,
    ablation_gamma_table,
    fetch_smollm2,
    prepare_probe_set,
    prepare_ift_set,
    prepare_ift_heldout,
    prepare_robustness_ift_set,
    fetch_benchmark,
    prepare_eval_set,
    check_prompts,
    train_probe,
    aggregate_robustness,
    select_modules,
    score_generations,
    report,


# A fine-tune's last checkpoint outlives its job, so a job counted failed after saving its model
# resumes instead of starting over; once the run ends, finished arms' checkpoints are deleted.
onsuccess:
    jobs.remove_finished_checkpoints()


onerror:
    jobs.remove_finished_checkpoints()


rule all:
    default_target: True
    input:
        jobs.domain_reports(config),
        "results/report/paper_tables.md",


rule ablation_gamma:
    """The gamma ablation: one ml_lr arm per finetune.gamma_sweep value and domain, scored, in
    results/<domain>/report/ablation_gamma.csv (and in the paper tables, which need it when the
    config has a sweep)."""
    input:
        expand(
            "results/{domain}/report/ablation_gamma.csv",
            domain=domains() if sweep_arms() else [],
        ),

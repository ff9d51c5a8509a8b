rule report:
    """A domain's report: the main table (arm x metric, with CIs), the probe table, the figures,
    and the domain's rows of the paper tables."""
    input:
        scores=lambda wc: jobs.score_files(config, wc.domain),
        judged=lambda wc: jobs.judge_files(config, wc.domain),
        losses=expand("results/{{domain}}/finetune/{arm}/loss.parquet", arm=arms()),
        ift_losses=expand(
            "results/{{domain}}/ift_loss/{arm}.parquet", arm=evaluated_arms()
        ),
        probe="results/probe/accuracy.parquet",
        robustness="results/robustness.parquet",
        plan="results/search/plan.json",
        trace="results/search/trace.parquet",
        selection_plans=sorted(set(jobs.arm_plans(config).values())),
    output:
        report=report(
            "results/{domain}/report/report.md",
            subcategory="{domain}",
            category="Report",
            caption="../report/report_md.rst",
        ),
        main_table=report(
            "results/{domain}/report/main_table.csv",
            subcategory="{domain}",
            category="Main table",
            caption="../report/main_table.rst",
        ),
        rates=report(
            "results/{domain}/report/rates.csv",
            subcategory="{domain}",
            category="Main table",
            caption="../report/rates.rst",
        ),
        per_benchmark=report(
            "results/{domain}/report/per_benchmark.csv",
            subcategory="{domain}",
            category="Main table",
            caption="../report/per_benchmark.rst",
        ),
        guard_categories=report(
            "results/{domain}/report/guard_categories.csv",
            subcategory="{domain}",
            category="Judges",
            caption="../report/guard_categories.rst",
        ),
        paper_tables_csv="results/{domain}/report/paper_tables.csv",
        frontier_verdicts=report(
            "results/{domain}/report/frontier_verdicts.csv",
            subcategory="{domain}",
            category="Fine-tuning",
            caption="../report/frontier_verdicts.rst",
        ),
        selector_comparison=report(
            "results/{domain}/report/selector_comparison.csv",
            subcategory="{domain}",
            category="Fine-tuning",
            caption="../report/selector_comparison.rst",
        ),
        probe_table=report(
            "results/{domain}/report/probe_accuracy.csv",
            subcategory="{domain}",
            category="Safety features",
            caption="../report/probe_accuracy.rst",
        ),
        heatmap=report(
            "results/{domain}/report/robustness_heatmap.png",
            subcategory="{domain}",
            category="Safety features",
            caption="../report/robustness_heatmap.rst",
        ),
        heatmap_acc_drop=report(
            "results/{domain}/report/robustness_heatmap_acc_drop.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        heatmap_cosine_drift=report(
            "results/{domain}/report/robustness_heatmap_cosine_drift.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        heatmap_direction_shift=report(
            "results/{domain}/report/robustness_heatmap_direction_shift.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        heatmap_margin_drop=report(
            "results/{domain}/report/robustness_heatmap_margin_drop.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        by_depth=report(
            "results/{domain}/report/robustness_by_depth.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        search_trace=report(
            "results/{domain}/report/search_trace.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        probe_plot=report(
            "results/{domain}/report/probe_accuracy.png",
            subcategory="{domain}",
            category="Safety features",
        ),
        frontier=report(
            "results/{domain}/report/safety_frontier.png",
            subcategory="{domain}",
            category="Fine-tuning",
            caption="../report/safety_frontier.rst",
        ),
        loss_curves=report(
            "results/{domain}/report/loss_curves.png",
            subcategory="{domain}",
            category="Fine-tuning",
            caption="../report/loss_curves.rst",
        ),
    log:
        "logs/{domain}/report.log",
    conda:
        "../envs/torch.yaml"
    params:
        settings=lambda wc: settings_of(ReportSettings, wc.domain),
    script:
        "../workflow_scripts/report.py"


rule ablation_gamma_table:
    """A domain's gamma ablation: the finetune.gamma_sweep arms on the headline metrics."""
    input:
        scores=lambda wc: jobs.score_files(config, wc.domain, sweep_arms()),
        judged=lambda wc: jobs.judge_files(config, wc.domain, sweep_arms()),
        ift_losses=expand("results/{{domain}}/ift_loss/{arm}.parquet", arm=sweep_arms()),
    output:
        "results/{domain}/report/ablation_gamma.csv",
    log:
        "logs/{domain}/ablation_gamma_table.log",
    conda:
        "../envs/torch.yaml"
    params:
        settings=lambda wc: settings_of(GammaAblationSettings, wc.domain),
    script:
        "../workflow_scripts/ablation_gamma.py"


rule paper_tables:
    """The paper's tables (results/report/paper_tables.md and .csv): every domain's section, in
    config order, with its gamma ablation when finetune.gamma_sweep is set, and the probe table
    they share; `all` builds them too."""
    input:
        domains=expand("results/{domain}/report/paper_tables.csv", domain=domains()),
        gamma=expand(
            "results/{domain}/report/ablation_gamma.csv",
            domain=domains() if sweep_arms() else [],
        ),
        probe="results/probe/accuracy.parquet",
    output:
        md=report(
            "results/report/paper_tables.md",
            category="Main table",
            caption="../report/paper_tables.rst",
        ),
        csv="results/report/paper_tables.csv",
    log:
        "logs/paper_tables.log",
    conda:
        "../envs/torch.yaml"
    params:
        source_model=config["model"]["source"],
        confidence=config["report"]["confidence"],
    script:
        "../workflow_scripts/paper_tables.py"

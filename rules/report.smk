rule report:
    """The paper's main table (arm x metric, with CIs), the probe table and the figures."""
    input:
        scores=expand(
            "results/scores/{arm}/{benchmark}.parquet",
            arm=evaluated_arms(),
            benchmark=benchmarks(),
        ),
        judged=jobs.judge_files(config),
        losses=expand("results/finetune/{arm}/loss.parquet", arm=arms()),
        ift_losses=expand("results/ift_loss/{arm}.parquet", arm=evaluated_arms()),
        probe="results/probe/accuracy.parquet",
        robustness="results/robustness.parquet",
        plan="results/search/plan.json",
        trace="results/search/trace.parquet",
    output:
        report=report(
            "results/report/report.md",
            category="Report",
            caption="../report/report_md.rst",
        ),
        main_table=report(
            "results/report/main_table.csv",
            category="Main table",
            caption="../report/main_table.rst",
        ),
        rates=report(
            "results/report/rates.csv",
            category="Main table",
            caption="../report/rates.rst",
        ),
        per_benchmark=report(
            "results/report/per_benchmark.csv",
            category="Main table",
            caption="../report/per_benchmark.rst",
        ),
        guard_categories=report(
            "results/report/guard_categories.csv",
            category="Judges",
            caption="../report/guard_categories.rst",
        ),
        paper_tables=report(
            "results/report/paper_tables.md",
            category="Main table",
            caption="../report/paper_tables.rst",
        ),
        paper_tables_csv="results/report/paper_tables.csv",
        probe_table=report(
            "results/report/probe_accuracy.csv",
            category="Safety features",
            caption="../report/probe_accuracy.rst",
        ),
        heatmap=report(
            "results/report/robustness_heatmap.png",
            category="Safety features",
            caption="../report/robustness_heatmap.rst",
        ),
        heatmap_acc_drop=report(
            "results/report/robustness_heatmap_acc_drop.png",
            category="Safety features",
        ),
        heatmap_cosine_drift=report(
            "results/report/robustness_heatmap_cosine_drift.png",
            category="Safety features",
        ),
        heatmap_direction_shift=report(
            "results/report/robustness_heatmap_direction_shift.png",
            category="Safety features",
        ),
        by_depth=report(
            "results/report/robustness_by_depth.png",
            category="Safety features",
        ),
        search_trace=report(
            "results/report/search_trace.png",
            category="Safety features",
        ),
        probe_plot=report(
            "results/report/probe_accuracy.png",
            category="Safety features",
        ),
        frontier=report(
            "results/report/safety_frontier.png",
            category="Fine-tuning",
            caption="../report/safety_frontier.rst",
        ),
        loss_curves=report(
            "results/report/loss_curves.png",
            category="Fine-tuning",
            caption="../report/loss_curves.rst",
        ),
    log:
        "logs/report.log",
    conda:
        "../envs/torch.yaml"
    params:
        settings=settings_of(ReportSettings),
    script:
        "../workflow_scripts/report.py"

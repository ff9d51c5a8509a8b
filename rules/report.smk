rule report:
    """The paper's main table (arm x metric, with CIs), the probe table and the figures."""
    input:
        scores=expand(
            "results/scores/{arm}/{benchmark}.parquet",
            arm=evaluated_arms(),
            benchmark=benchmarks(),
        ),
        losses=expand("results/finetune/{arm}/loss.parquet", arm=arms()),
        probe="results/probe/accuracy.parquet",
        robustness="results/robustness.parquet",
        plan="results/search/plan.json",
        trace="results/search/trace.parquet",
    output:
        report="results/report/report.md",
        main_table="results/report/main_table.csv",
        rates="results/report/rates.csv",
        probe_table="results/report/probe_accuracy.csv",
        heatmap="results/report/robustness_heatmap.png",
        heatmap_acc_drop="results/report/robustness_heatmap_acc_drop.png",
        heatmap_cosine_drift="results/report/robustness_heatmap_cosine_drift.png",
        heatmap_direction_shift="results/report/robustness_heatmap_direction_shift.png",
        by_depth="results/report/robustness_by_depth.png",
        search_trace="results/report/search_trace.png",
        probe_plot="results/report/probe_accuracy.png",
        loss_curves="results/report/loss_curves.png",
    log:
        "logs/report.log",
    conda:
        "../envs/torch.yaml"
    params:
        arm_order=evaluated_arms(),
        report=settings("report"),
        score=config["robustness"]["score"],
        seed=config["seed"],
    script:
        "../workflow_scripts/report.py"

# Stage: the run's report (results/report.md, its figures, the findings). See src/moelang/report.py.
# The figures and summary.html are also the items of Snakemake's HTML report
# (`snakemake --report results/report.html`), with their captions in workflow/report/.


rule report:
    input:
        corpus_summary="results/corpus/summary.parquet",
        tokens=kept_tokens,
        overlap="results/overlap/overlap.parquet",
        similarity=f"results/similarity/{SIMILARITY_MODEL}.{SIMILARITY_METHOD}.parquet",
        plan="results/allocation/plan.parquet",
        plan_json="results/allocation/plan.json",
        results="results/eval/results.parquet",
        tasks="results/eval/tasks",
        # the stages a config may turn off: routing (a dense base), adaptation, expansion
        routing_metrics=(
            expand(
                "results/routing/metrics/{name}.parquet",
                name=["entropy", "jsd", "jsd_mean", "specialization", "jsd_overlap", "experts"],
            )
            if config["routing"]["enabled"]
            else []
        ),
        selected_experts=["results/routing/selected_experts.json"] if config["routing"]["enabled"] else [],
        adaptation=["results/eval/adaptation.parquet"] if ADAPT_TARGETS else [],
        adapt_runs=["results/adapt/runs.parquet"] if ADAPT_TARGETS else [],
        expansion=["results/eval/expansion.parquet"] if EXPAND_VARIANTS else [],
        expand_runs=["results/expand/runs.parquet"] if EXPAND_VARIANTS else [],
    output:
        **report_figure_outputs(),
        md="results/report.md",
        findings="results/report/findings.parquet",
        summary=report(
            "results/report/summary.html",
            caption="../report/summary.rst",
            category="0. Findings and tables",
        ),
    log:
        "results/logs/report.log",
    container:
        mcfg.rule_container(config, "report")
    resources:
        **mcfg.rule_resources(config, "report"),
    params:
        options=lambda w: mcfg.to_json(mcfg.report_options(config)),
        stages=report_stage_options,
        figures=lambda w, output: os.path.dirname(output.findings),
    shell:
        "python -m moelang report --options {params.options:q} --corpus-summary {input.corpus_summary:q}"
        " --tokens {input.tokens:q} --overlap {input.overlap:q} --similarity {input.similarity:q}"
        " --plan {input.plan:q} --plan-json {input.plan_json:q} --results {input.results:q} --tasks {input.tasks:q} {params.stages}"
        " --out {output.md:q} --figures {params.figures:q} 2>&1 | tee {log:q}"

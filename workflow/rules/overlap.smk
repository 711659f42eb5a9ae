# Stage 3: pairwise token-vocabulary overlap. See src/moelang/overlap.py.


rule overlap:
    input:
        lambda w: expand("results/tokens/{lang}.freq.parquet", lang=kept_languages()),
    output:
        table="results/overlap/overlap.parquet",
        plot="results/overlap/overlap.png",
    log:
        "results/logs/overlap.log",
    container:
        mcfg.rule_container(config, "overlap")
    resources:
        **mcfg.rule_resources(config, "overlap"),
    params:
        min_count=config["overlap"]["min_count"],
    shell:
        "python -m moelang overlap --freq {input:q} --min-count {params.min_count}"
        " --out {output.table:q} --plot {output.plot:q} 2>&1 | tee {log:q}"

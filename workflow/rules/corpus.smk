# Stage 1: corpus. See src/moelang/corpus.py for the sources and the output schemas.


rule corpus:
    resources:
        **mcfg.rule_resources(config, "corpus"),
    output:
        parquet="results/corpus/{lang}.parquet",
        stats="results/corpus/{lang}.stats.json",
    params:
        options=lambda w: mcfg.to_json(mcfg.corpus_options(config, w.lang)),
    log:
        "results/logs/corpus/{lang}.log",
    shell:
        "{MOELANG} corpus --lang {wildcards.lang:q} --options {params.options:q}"
        " --out {output.parquet:q} --stats {output.stats:q} 2>&1 | tee {log:q}"


checkpoint corpus_summary:
    resources:
        **mcfg.rule_resources(config, "corpus_summary"),
    input:
        expand("results/corpus/{lang}.stats.json", lang=LANGUAGES),
    output:
        table="results/corpus/summary.parquet",
        languages="results/corpus/languages.json",
    params:
        languages=",".join(LANGUAGES),
    log:
        "results/logs/corpus/summary.log",
    shell:
        "{MOELANG} corpus-summary --stats {input:q} --languages {params.languages:q}"
        " --out-table {output.table:q} --out-languages {output.languages:q} 2>&1 | tee {log:q}"


rule parallel:
    resources:
        **mcfg.rule_resources(config, "parallel"),
    output:
        "results/corpus/parallel.parquet",
    params:
        options=lambda w: mcfg.to_json(mcfg.parallel_options(config)),
    log:
        "results/logs/corpus/parallel.log",
    shell:
        "{MOELANG} parallel --options {params.options:q} --out {output:q} 2>&1 | tee {log:q}"

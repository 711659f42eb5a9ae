# Stage 1: corpus. See src/moelang/corpus.py for the sources and the output schemas.


CORPUS_SHARDS = {lang: mcfg.corpus_shards(config, lang) for lang in LANGUAGES}
WHOLE_CORPUS = [lang for lang, n in CORPUS_SHARDS.items() if n == 1]
SHARDED_CORPUS = [lang for lang, n in CORPUS_SHARDS.items() if n > 1]

if WHOLE_CORPUS:

    rule corpus:
        output:
            parquet="results/corpus/{lang}.parquet",
            stats="results/corpus/{lang}.stats.json",
        log:
            "results/logs/corpus/{lang}.log",
        wildcard_constraints:
            lang="|".join(WHOLE_CORPUS),
        container:
            mcfg.rule_container(config, "corpus")
        resources:
            **mcfg.rule_resources(config, "corpus"),
        params:
            options=lambda w: mcfg.to_json(mcfg.corpus_options(config, w.lang)),
        shell:
            "python -m moelang corpus --lang {wildcards.lang:q} --options {params.options:q}"
            " --out {output.parquet:q} --stats {output.stats:q} 2>&1 | tee {log:q}"


if SHARDED_CORPUS:

    # A large corpus in N jobs: each reads its part of the source, the gather merges them in
    # source order (see src/moelang/corpus.py). The parts are temporary.
    rule corpus_shard:
        output:
            parquet=temp("results/corpus/shards/{lang}/{shard}.parquet"),
            stats=temp("results/corpus/shards/{lang}/{shard}.stats.json"),
        log:
            "results/logs/corpus/{lang}.{shard}.log",
        wildcard_constraints:
            lang="|".join(SHARDED_CORPUS),
            shard=r"\d+",
        container:
            mcfg.rule_container(config, "corpus_shard")
        resources:
            **mcfg.rule_resources(config, "corpus_shard"),
        params:
            options=lambda w: mcfg.to_json(mcfg.corpus_options(config, w.lang)),
            shard=lambda w: f"{w.shard}/{CORPUS_SHARDS[w.lang]}",
        shell:
            "python -m moelang corpus --lang {wildcards.lang:q} --options {params.options:q} --shard {params.shard:q}"
            " --out {output.parquet:q} --stats {output.stats:q} 2>&1 | tee {log:q}"

    rule corpus_gather:
        input:
            parquet=lambda w: expand(
                "results/corpus/shards/{lang}/{shard}.parquet", lang=w.lang, shard=range(CORPUS_SHARDS[w.lang])
            ),
            stats=lambda w: expand(
                "results/corpus/shards/{lang}/{shard}.stats.json", lang=w.lang, shard=range(CORPUS_SHARDS[w.lang])
            ),
        output:
            parquet="results/corpus/{lang}.parquet",
            stats="results/corpus/{lang}.stats.json",
        log:
            "results/logs/corpus/{lang}.gather.log",
        wildcard_constraints:
            lang="|".join(SHARDED_CORPUS),
        container:
            mcfg.rule_container(config, "corpus_gather")
        resources:
            **mcfg.rule_resources(config, "corpus_gather"),
        params:
            options=lambda w: mcfg.to_json(mcfg.corpus_options(config, w.lang)),
        shell:
            "python -m moelang corpus-gather --lang {wildcards.lang:q} --options {params.options:q}"
            " --shards {input.parquet:q} --shard-stats {input.stats:q}"
            " --out {output.parquet:q} --stats {output.stats:q} 2>&1 | tee {log:q}"


checkpoint corpus_summary:
    input:
        expand("results/corpus/{lang}.stats.json", lang=LANGUAGES),
    output:
        table="results/corpus/summary.parquet",
        languages="results/corpus/languages.json",
    log:
        "results/logs/corpus/summary.log",
    container:
        mcfg.rule_container(config, "corpus_summary")
    resources:
        **mcfg.rule_resources(config, "corpus_summary"),
    params:
        languages=",".join(LANGUAGES),
    shell:
        "python -m moelang corpus-summary --stats {input:q} --languages {params.languages:q}"
        " --out-table {output.table:q} --out-languages {output.languages:q} 2>&1 | tee {log:q}"


rule parallel:
    output:
        "results/corpus/parallel.parquet",
    log:
        "results/logs/corpus/parallel.log",
    container:
        mcfg.rule_container(config, "parallel")
    resources:
        **mcfg.rule_resources(config, "parallel"),
    params:
        options=lambda w: mcfg.to_json(mcfg.parallel_options(config)),
    shell:
        "python -m moelang parallel --options {params.options:q} --out {output:q} 2>&1 | tee {log:q}"

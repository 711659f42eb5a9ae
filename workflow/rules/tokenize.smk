# Stage 2: tokenizer and tokenize. See src/moelang/tokenize.py for the output schemas.


rule tokenizer:
    input:
        corpus=tokenizer_inputs,
        languages="results/corpus/languages.json",
    output:
        directory("results/tokenizer"),
    log:
        "results/logs/tokenizer.log",
    container:
        mcfg.rule_container(config, "tokenizer")
    resources:
        **mcfg.rule_resources(config, "tokenizer"),
    params:
        options=lambda w: mcfg.to_json(mcfg.tokenizer_options(config)),
    shell:
        "python -m moelang tokenizer --options {params.options:q} --corpus {input.corpus:q}"
        " --out {output:q} 2>&1 | tee {log:q}"


TOKENIZE_SHARDS = config["tokenize"]["shards"]

if TOKENIZE_SHARDS == 1:

    rule tokenize:
        input:
            corpus="results/corpus/{lang}.parquet",
            tokenizer="results/tokenizer",
        output:
            tokens="results/tokens/{lang}.parquet",
            freq="results/tokens/{lang}.freq.parquet",
        log:
            "results/logs/tokenize/{lang}.log",
        container:
            mcfg.rule_container(config, "tokenize")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "tokenize"),
        params:
            batch_size=config["tokenize"]["batch_size"],
        shell:
            "RAYON_NUM_THREADS={threads} python -m moelang tokenize --corpus {input.corpus:q} --tokenizer {input.tokenizer:q}"
            " --out {output.tokens:q} --freq {output.freq:q} --batch-size {params.batch_size} 2>&1 | tee {log:q}"

else:

    # Each job tokenizes a contiguous row range of the corpus; the gather joins them in order and adds
    # up the frequencies (exactly the unsharded files). The parts are temporary.
    rule tokenize_shard:
        input:
            corpus="results/corpus/{lang}.parquet",
            tokenizer="results/tokenizer",
        output:
            tokens=temp("results/tokens/shards/{lang}/{shard}.parquet"),
            freq=temp("results/tokens/shards/{lang}/{shard}.freq.parquet"),
        log:
            "results/logs/tokenize/{lang}.{shard}.log",
        wildcard_constraints:
            shard=r"\d+",
        container:
            mcfg.rule_container(config, "tokenize_shard")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "tokenize_shard"),
        params:
            batch_size=config["tokenize"]["batch_size"],
            shard=lambda w: f"{w.shard}/{TOKENIZE_SHARDS}",
        shell:
            "RAYON_NUM_THREADS={threads} python -m moelang tokenize --corpus {input.corpus:q} --tokenizer {input.tokenizer:q}"
            " --shard {params.shard:q} --out {output.tokens:q} --freq {output.freq:q}"
            " --batch-size {params.batch_size} 2>&1 | tee {log:q}"

    rule tokenize_gather:
        input:
            tokens=expand("results/tokens/shards/{{lang}}/{shard}.parquet", shard=range(TOKENIZE_SHARDS)),
            freq=expand("results/tokens/shards/{{lang}}/{shard}.freq.parquet", shard=range(TOKENIZE_SHARDS)),
        output:
            tokens="results/tokens/{lang}.parquet",
            freq="results/tokens/{lang}.freq.parquet",
        log:
            "results/logs/tokenize/{lang}.gather.log",
        container:
            mcfg.rule_container(config, "tokenize_gather")
        resources:
            **mcfg.rule_resources(config, "tokenize_gather"),
        shell:
            "python -m moelang tokenize-gather --tokens {input.tokens:q} --freqs {input.freq:q}"
            " --out {output.tokens:q} --freq {output.freq:q} 2>&1 | tee {log:q}"

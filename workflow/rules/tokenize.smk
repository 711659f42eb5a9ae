# Stage 2: tokenizer and tokenize. See src/moelang/tokenize.py for the output schemas.


def tokenizer_inputs(wildcards):
    # A trained BPE reads the kept languages' corpora; a pretrained tokenizer reads nothing local.
    if config["tokenizer"]["type"] == "train":
        return expand("results/corpus/{lang}.parquet", lang=kept_languages())
    return []


rule tokenizer:
    resources:
        **mcfg.rule_resources(config, "tokenizer"),
    input:
        corpus=tokenizer_inputs,
        languages="results/corpus/languages.json",
    output:
        directory("results/tokenizer"),
    params:
        options=lambda w: mcfg.to_json(mcfg.tokenizer_options(config)),
    log:
        "results/logs/tokenizer.log",
    shell:
        "{MOELANG} tokenizer --options {params.options:q} --corpus {input.corpus:q}"
        " --out {output:q} 2>&1 | tee {log:q}"


rule tokenize:
    resources:
        **mcfg.rule_resources(config, "tokenize"),
    input:
        corpus="results/corpus/{lang}.parquet",
        tokenizer="results/tokenizer",
    output:
        tokens="results/tokens/{lang}.parquet",
        freq="results/tokens/{lang}.freq.parquet",
    params:
        batch_size=config["tokenize"]["batch_size"],
    threads: 2
    log:
        "results/logs/tokenize/{lang}.log",
    shell:
        "RAYON_NUM_THREADS={threads} {MOELANG} tokenize --corpus {input.corpus:q} --tokenizer {input.tokenizer:q}"
        " --out {output.tokens:q} --freq {output.freq:q} --batch-size {params.batch_size} 2>&1 | tee {log:q}"

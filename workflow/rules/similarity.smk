# Stage: layer similarity and LayerMoE expert allocation. See src/moelang/similarity.py and allocation.py.

SIMILARITY_MODEL = mcfg.similarity_model(config)


rule layer_similarity:
    resources:
        **mcfg.rule_resources(config, "layer_similarity"),
    container:
        mcfg.rule_container(config, "layer_similarity")
    input:
        model=lambda w: [PROFILED[SIMILARITY_MODEL]["ref"]] if PROFILED[SIMILARITY_MODEL]["ref"].startswith("results/") else [],
        tokens=kept_tokens,
        parallel="results/corpus/parallel.parquet",
    output:
        table=f"results/similarity/{SIMILARITY_MODEL}.parquet",
        plot=f"results/similarity/{SIMILARITY_MODEL}.png",
    params:
        options=lambda w: mcfg.to_json(mcfg.similarity_options(config)),
    threads: 2
    log:
        "results/logs/similarity.log",
    shell:
        "OMP_NUM_THREADS={threads} {MOELANG} similarity --options {params.options:q} --tokens {input.tokens:q}"
        " --parallel {input.parallel:q} --out {output.table:q} --plot {output.plot:q} 2>&1 | tee {log:q}"


rule allocate_experts:
    resources:
        **mcfg.rule_resources(config, "allocate_experts"),
    container:
        mcfg.rule_container(config, "allocate_experts")
    input:
        similarity=f"results/similarity/{SIMILARITY_MODEL}.parquet",
        specialization="results/routing/metrics/specialization.parquet",
        corpus_summary="results/corpus/summary.parquet",  # the checkpoint that decides the languages
    output:
        plan="results/allocation/plan.json",
        table="results/allocation/plan.parquet",
        plot="results/allocation/plan.png",
    params:
        options=lambda w: mcfg.to_json(mcfg.allocation_options(config, kept_languages())),
    log:
        "results/logs/allocation.log",
    shell:
        "{MOELANG} allocate --options {params.options:q} --similarity {input.similarity:q}"
        " --specialization {input.specialization:q} --out results/allocation 2>&1 | tee {log:q}"

# Stage: layer similarity and LayerMoE expert allocation. See src/moelang/similarity.py and allocation.py.

SIMILARITY_MODEL = mcfg.similarity_model(config)
SIMILARITY_METHOD = config["similarity"]["method"]


# One table per (profiled model, method): the allocation reads the configured pair, and any other
# can be asked for by name (e.g. `snakemake results/similarity/cpt-step0.parallel.parquet`).
rule layer_similarity:
    input:
        model=profiled_model_input,
        tokens=kept_tokens,
        parallel=similarity_parallel_input,
    output:
        table="results/similarity/{model}.{method}.parquet",
        plot="results/similarity/{model}.{method}.png",
    log:
        "results/logs/similarity/{model}.{method}.log",
    wildcard_constraints:
        model="|".join(map(re.escape, PROFILED)),
        method="tokens|parallel",
    # ahead of the evaluation jobs when both are ready, so that a similarity or allocation problem
    # shows before the long evaluation rather than after it
    priority: 10
    container:
        mcfg.rule_container(config, "layer_similarity")
    threads: 2
    resources:
        **mcfg.rule_resources(config, "layer_similarity"),
    params:
        options=lambda w: mcfg.to_json(mcfg.similarity_options(config, w.model, w.method)),
        parallel=lambda w, input: quoted_option("--parallel", input.parallel),
    shell:
        "OMP_NUM_THREADS={threads} python -m moelang similarity --options {params.options:q} --tokens {input.tokens:q}"
        " {params.parallel} --out {output.table:q} --plot {output.plot:q} 2>&1 | tee {log:q}"


# A checkpoint: the plans decide which expansion variants share a trained model (expand.smk), and the
# plans are known only once this job has run.
checkpoint allocate_experts:
    input:
        similarity=f"results/similarity/{SIMILARITY_MODEL}.{SIMILARITY_METHOD}.parquet",
        # the routing plan's specialisation scores (none without the routing stage: no routing plan)
        specialization=["results/routing/metrics/specialization.parquet"] if config["routing"]["enabled"] else [],
        corpus_summary=corpus_checkpoint,  # the checkpoint that decides the languages (params need them)
    output:
        plan="results/allocation/plan.json",
        table="results/allocation/plan.parquet",
        plot="results/allocation/plan.png",
    log:
        "results/logs/allocation.log",
    priority: 10
    container:
        mcfg.rule_container(config, "allocate_experts")
    resources:
        **mcfg.rule_resources(config, "allocate_experts"),
    params:
        options=lambda w: mcfg.to_json(mcfg.allocation_options(config, kept_languages())),
        specialization=lambda w, input: quoted_option("--specialization", input.specialization),
        out=lambda w, output: os.path.dirname(output.plan),
    shell:
        "python -m moelang allocate --options {params.options:q} --similarity {input.similarity:q}"
        " {params.specialization} --out {params.out:q} 2>&1 | tee {log:q}"

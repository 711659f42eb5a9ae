# Stage: routing profiles and routing metrics. See src/moelang/routing.py and routing_metrics.py.

PROFILED = model_registry.profiled(config)


ROUTING_SHARDS = config["routing"]["shards"]

if ROUTING_SHARDS == 1:

    rule profile_routing:
        input:
            model=profiled_model_input,
            tokens=kept_tokens,
        output:
            directory("results/routing/{model}"),
        log:
            "results/logs/routing/{model}.log",
        wildcard_constraints:
            model="|".join(PROFILED),
        container:
            mcfg.rule_container(config, "profile_routing")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "profile_routing"),
        params:
            options=lambda w: mcfg.to_json(mcfg.routing_options(config, w.model)),
        shell:
            "OMP_NUM_THREADS={threads} python -m moelang profile-routing --options {params.options:q} --tokens {input.tokens:q}"
            " --out {output:q} 2>&1 | tee {log:q}"

else:

    # One model's dev-split sequences (document chunks or stream windows, by routing.windowing) in N
    # jobs (every N-th sequence from the i-th); the merge adds up the counts, exactly the unsharded
    # profile. The parts are temporary.
    rule profile_routing_shard:
        input:
            model=profiled_model_input,
            tokens=kept_tokens,
        output:
            temp(directory("results/routing/shards/{model}/{shard}")),
        log:
            "results/logs/routing/{model}.{shard}.log",
        wildcard_constraints:
            model="|".join(PROFILED),
            shard=r"\d+",
        container:
            mcfg.rule_container(config, "profile_routing_shard")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "profile_routing_shard"),
        params:
            options=lambda w: mcfg.to_json(mcfg.routing_options(config, w.model)),
            shard=lambda w: f"{w.shard}/{ROUTING_SHARDS}",
        shell:
            "OMP_NUM_THREADS={threads} python -m moelang profile-routing --options {params.options:q} --tokens {input.tokens:q}"
            " --shard {params.shard:q} --out {output:q} 2>&1 | tee {log:q}"

    rule merge_routing:
        input:
            expand("results/routing/shards/{{model}}/{shard}", shard=range(ROUTING_SHARDS)),
        output:
            directory("results/routing/{model}"),
        log:
            "results/logs/routing/{model}.merge.log",
        wildcard_constraints:
            model="|".join(PROFILED),
        container:
            mcfg.rule_container(config, "merge_routing")
        resources:
            **mcfg.rule_resources(config, "merge_routing"),
        shell:
            "python -m moelang merge-routing --shards {input:q} --out {output:q} 2>&1 | tee {log:q}"


rule routing_metrics:
    input:
        profiles=lambda w: expand("results/routing/{model}", model=list(PROFILED)),
        overlap="results/overlap/overlap.parquet",
        corpus_summary=corpus_checkpoint,  # the checkpoint that decides the languages (params need them)
    output:
        tables=expand(
            "results/routing/metrics/{name}.parquet",
            name=["entropy", "jsd", "jsd_mean", "specialization", "jsd_overlap", "experts"],
        ),
        plots=expand(
            "results/routing/metrics/{name}.png",
            name=["entropy", "jsd_dynamics", "jsd_heatmap", "specialization", "jsd_overlap"],
        ),
        selected="results/routing/selected_experts.json",
    log:
        "results/logs/routing/metrics.log",
    container:
        mcfg.rule_container(config, "routing_metrics")
    resources:
        **mcfg.rule_resources(config, "routing_metrics"),
    params:
        options=lambda w: mcfg.to_json(mcfg.routing_metrics_options(config)),
        profiles=routing_profiles,
        out=lambda w, output: os.path.dirname(output.tables[0]),
    shell:
        "python -m moelang routing-metrics --options {params.options:q} --profiles {params.profiles:q}"
        " --overlap {input.overlap:q} --out {params.out:q} --selected {output.selected:q} 2>&1 | tee {log:q}"

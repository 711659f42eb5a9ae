# Stage: adaptation I, final-layer expert fine-tuning of the targets. See src/moelang/adapt.py.

ADAPT = config["adapt"]
ADAPT_TARGETS = mcfg.adapt_targets(config)
ADAPT_METHODS = list(ADAPT["methods"])
ADAPT_LRS = list(ADAPT["learning_rates"])
ADAPT_START = mcfg.adapt_start(config) if ADAPT_TARGETS else None


# One job per target (every method and rate), or per (target, method) with a {method} wildcard.
PER_METHOD = ADAPT["job_per"] == "method"
JOB_METHODS = ["{method}"] if PER_METHOD else ADAPT_METHODS


if ADAPT_TARGETS:

    rule adapt:
        input:
            start=model_registry.workflow_inputs(ADAPT_START),
            tokens="results/tokens/{lang}.parquet",
            selected="results/routing/selected_experts.json",
        output:
            [directory(path) for path in adapt_run_dirs("{lang}", JOB_METHODS)],
        log:
            "results/logs/adapt/{lang}.{method}.log" if PER_METHOD else "results/logs/adapt/{lang}.log",
        wildcard_constraints:
            method="|".join(map(re.escape, ADAPT_METHODS)),
        container:
            mcfg.rule_container(config, "adapt")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "adapt"),
        params:
            options=lambda w: mcfg.to_json(mcfg.adapt_options(config, w.lang, [w.method] if PER_METHOD else None)),
            launcher=mcfg.launcher(config, "adapt"),
            # the root of every run directory: results/adapt/{lang}/{method}/{lr}
            out=lambda w, output: str(Path(output[0]).parents[2]),
            state_dir="results/state/adapt",
        shell:
            "OMP_NUM_THREADS={threads} {params.launcher} adapt --options {params.options:q} --tokens {input.tokens:q}"
            " --selected {input.selected:q} --out {params.out:q} --state-dir {params.state_dir:q} 2>&1 | tee {log:q}"


# A checkpoint: its runs table says which methods were trained, and only those are evaluated (a method
# whose expert set is empty in every adapted layer is not trained; src/moelang/adapt.py).
checkpoint select_adapt:
    input:
        lambda w: adapt_run_dirs(w.lang, ADAPT_METHODS),
    output:
        [directory(f"results/adapt/{{lang}}/{method}/selected") for method in ADAPT_METHODS],
        table="results/adapt/{lang}/runs.parquet",
    log:
        "results/logs/adapt/{lang}.select.log",
    container:
        mcfg.rule_container(config, "select_adapt")
    resources:
        **mcfg.rule_resources(config, "select_adapt"),
    params:
        # the root of the run directories: results/adapt/{lang}/runs.parquet
        root=lambda w, output: str(Path(output.table).parents[1]),
    shell:
        "python -m moelang adapt-select --lang {wildcards.lang:q} --runs {input:q} --root {params.root:q}"
        " --out {output.table:q} 2>&1 | tee {log:q}"


rule gather_adapt:
    input:
        lambda w: expand("results/adapt/{lang}/runs.parquet", lang=adapted_targets()),
    output:
        "results/adapt/runs.parquet",
    log:
        "results/logs/adapt/gather.log",
    container:
        mcfg.rule_container(config, "gather_adapt")
    resources:
        **mcfg.rule_resources(config, "gather_adapt"),
    shell:
        "python -m moelang adapt-gather --tables {input:q} --out {output:q} 2>&1 | tee {log:q}"

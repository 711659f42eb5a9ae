# Stage: evaluation (lm-eval tasks, perplexity, one results table). See src/moelang/evaluate.py.

EVALUATED = model_registry.evaluated(config)
EVAL_FAMILIES = list(config["evaluation"]["tasks"])


def evaluated_model_input(wildcards):
    return model_registry.workflow_inputs(EVALUATED[wildcards.model])


rule eval_tasks:
    resources:
        **mcfg.rule_resources(config, "eval_tasks"),
    container:
        mcfg.rule_container(config, "eval_tasks")
    input:
        lambda w: expand("results/corpus/{lang}.parquet", lang=kept_languages()),
    output:
        directory("results/eval/tasks"),
    params:
        options=lambda w: mcfg.to_json(mcfg.evaluation_options(config)),
    log:
        "results/logs/eval/tasks.log",
    shell:
        "{MOELANG} eval-tasks --options {params.options:q} --corpus {input:q} --out {output:q} 2>&1 | tee {log:q}"


# One job per model: every task family and perplexity with the model loaded once (start-up was most of
# a job when each (model, family) was one).
EVAL_PERPLEXITY = bool(config["evaluation"]["perplexity"])
EVAL_MODEL_OUTPUTS = [f"{family}.json" for family in EVAL_FAMILIES] + (["perplexity.parquet"] if EVAL_PERPLEXITY else [])

if EVAL_MODEL_OUTPUTS:

    rule evaluate:
        resources:
            **mcfg.rule_resources(config, "evaluate"),
        container:
            mcfg.rule_container(config, "evaluate")
        input:
            model=evaluated_model_input,
            tasks="results/eval/tasks",
            tokens=kept_tokens if EVAL_PERPLEXITY else [],
        output:
            [f"results/eval/{{model}}/{name}" for name in EVAL_MODEL_OUTPUTS],
        wildcard_constraints:
            model="|".join(map(re.escape, EVALUATED)),
        params:
            options=lambda w: mcfg.to_json(mcfg.evaluation_options(config, w.model)),
            families=" ".join(EVAL_FAMILIES + (["perplexity"] if EVAL_PERPLEXITY else [])),
        threads: 2
        log:
            "results/logs/eval/{model}.log",
        shell:
            "OMP_NUM_THREADS={threads} {MOELANG} evaluate --options {params.options:q} --families {params.families}"
            " --tasks {input.tasks:q}" + (" --tokens {input.tokens:q}" if EVAL_PERPLEXITY else "")
            + " --out results/eval/{wildcards.model} 2>&1 | tee {log:q}"


def evaluated_names(wildcards=None):
    """The evaluated models of this run: an adapted model only when the corpus kept its target."""
    kept = set(kept_languages())
    return [name for name, entry in EVALUATED.items() if entry.target is None or entry.target in kept]


def eval_outputs(wildcards=None):
    return [f"results/eval/{name}/{output}" for name in evaluated_names() for output in EVAL_MODEL_OUTPUTS]


rule eval_summary:
    resources:
        **mcfg.rule_resources(config, "eval_summary"),
    container:
        mcfg.rule_container(config, "eval_summary")
    input:
        results=eval_outputs,
        tasks="results/eval/tasks",
        # the expansion's runs table (new experts, trainable fractions), only when the stage runs
        expand_runs=["results/expand/runs.parquet"] if mcfg.expand_variants(config) else [],
    output:
        table="results/eval/results.parquet",
        adaptation="results/eval/adaptation.parquet",
        expansion="results/eval/expansion.parquet",
        summary="results/eval/summary.md",
    params:
        # from the inputs: they are known once the corpus checkpoint has decided the kept languages
        options=lambda w, input: mcfg.to_json(mcfg.eval_summary_options(
            config, EVAL_FAMILIES, [n for n in EVALUATED if any(f.startswith(f"results/eval/{n}/") for f in input.results)],
            kept_languages())),
    log:
        "results/logs/eval/summary.log",
    shell:
        "{MOELANG} eval-summary --options {params.options:q} --eval-dir results/eval --tasks {input.tasks:q}"
        " 2>&1 | tee {log:q}"

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


rule evaluate_tasks:
    resources:
        **mcfg.rule_resources(config, "evaluate_tasks"),
    container:
        mcfg.rule_container(config, "evaluate_tasks")
    input:
        model=evaluated_model_input,
        tasks="results/eval/tasks",
    output:
        "results/eval/{model}/{family}.json",
    wildcard_constraints:
        model="|".join(map(re.escape, EVALUATED)),
        family="|".join(EVAL_FAMILIES) if EVAL_FAMILIES else "^$",
    params:
        options=lambda w: mcfg.to_json(mcfg.evaluation_options(config, w.model)),
    threads: 2
    log:
        "results/logs/eval/{model}.{family}.log",
    shell:
        "OMP_NUM_THREADS={threads} {MOELANG} evaluate --options {params.options:q} --family {wildcards.family:q}"
        " --tasks {input.tasks:q} --out {output:q} 2>&1 | tee {log:q}"


rule evaluate_perplexity:
    resources:
        **mcfg.rule_resources(config, "evaluate_perplexity"),
    container:
        mcfg.rule_container(config, "evaluate_perplexity")
    input:
        model=evaluated_model_input,
        tokens=kept_tokens,
    output:
        "results/eval/{model}/perplexity.parquet",
    wildcard_constraints:
        model="|".join(map(re.escape, EVALUATED)),
    params:
        options=lambda w: mcfg.to_json(mcfg.evaluation_options(config, w.model)),
    threads: 2
    log:
        "results/logs/eval/{model}.perplexity.log",
    shell:
        "OMP_NUM_THREADS={threads} {MOELANG} evaluate --options {params.options:q} --family perplexity"
        " --tokens {input.tokens:q} --out {output:q} 2>&1 | tee {log:q}"


def evaluated_names(wildcards=None):
    """The evaluated models of this run: an adapted model only when the corpus kept its target."""
    kept = set(kept_languages())
    return [name for name, entry in EVALUATED.items() if entry.target is None or entry.target in kept]


def eval_outputs(wildcards=None):
    names = evaluated_names()
    files = [f"results/eval/{name}/{family}.json" for name in names for family in EVAL_FAMILIES]
    if config["evaluation"]["perplexity"]:
        files += [f"results/eval/{name}/perplexity.parquet" for name in names]
    return files


rule eval_summary:
    resources:
        **mcfg.rule_resources(config, "eval_summary"),
    container:
        mcfg.rule_container(config, "eval_summary")
    input:
        results=eval_outputs,
        tasks="results/eval/tasks",
    output:
        table="results/eval/results.parquet",
        summary="results/eval/summary.md",
    params:
        # from the inputs: they are known once the corpus checkpoint has decided the kept languages
        options=lambda w, input: mcfg.to_json(mcfg.eval_summary_options(
            config, EVAL_FAMILIES, [n for n in EVALUATED if any(f.startswith(f"results/eval/{n}/") for f in input.results)])),
    log:
        "results/logs/eval/summary.log",
    shell:
        "{MOELANG} eval-summary --options {params.options:q} --eval-dir results/eval --tasks {input.tasks:q}"
        " 2>&1 | tee {log:q}"

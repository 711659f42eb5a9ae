# Stage: evaluation (lm-eval tasks, perplexity, one results table). See src/moelang/evaluate.py.

EVALUATED = model_registry.evaluated(config)
EVAL_FAMILIES = list(config["evaluation"]["tasks"])


rule eval_tasks:
    input:
        lambda w: expand("results/corpus/{lang}.parquet", lang=kept_languages()),
    output:
        directory("results/eval/tasks"),
    log:
        "results/logs/eval/tasks.log",
    container:
        mcfg.rule_container(config, "eval_tasks")
    resources:
        **mcfg.rule_resources(config, "eval_tasks"),
    params:
        options=lambda w: mcfg.to_json(mcfg.evaluation_options(config)),
    shell:
        "python -m moelang eval-tasks --options {params.options:q} --corpus {input:q} --out {output:q} 2>&1 | tee {log:q}"


# One job per model: every task family and perplexity with the model loaded once (start-up was most of
# a job when each (model, family) was one).
EVAL_PERPLEXITY = bool(config["evaluation"]["perplexity"])
EVAL_MODEL_OUTPUTS = [f"{family}.json" for family in EVAL_FAMILIES] + (
    ["perplexity.parquet"] if EVAL_PERPLEXITY else []
)

if EVAL_MODEL_OUTPUTS:

    rule evaluate:
        input:
            model=evaluated_model_input,
            tasks="results/eval/tasks",
            tokens=kept_tokens if EVAL_PERPLEXITY else [],
        output:
            [f"results/eval/{{model}}/{name}" for name in EVAL_MODEL_OUTPUTS],
        log:
            "results/logs/eval/{model}.log",
        wildcard_constraints:
            model="|".join(map(re.escape, EVALUATED)),
        container:
            mcfg.rule_container(config, "evaluate")
        # One thread: a job is ~5 s of single-threaded start-up and small batches, so two jobs side by side
        # use 2 cores better than one job on both (two default models: 26 s side by side, 41 s one after
        # the other with 2 threads each; measured on this 2-core machine).
        threads: 1
        resources:
            **mcfg.rule_resources(config, "evaluate"),
        params:
            options=lambda w: mcfg.to_json(mcfg.evaluation_options(config, w.model)),
            families=" ".join(EVAL_FAMILIES + (["perplexity"] if EVAL_PERPLEXITY else [])),
            out=lambda w, output: os.path.dirname(output[0]),
        shell:
            "OMP_NUM_THREADS={threads} python -m moelang evaluate --options {params.options:q} --families {params.families}"
            " --tasks {input.tasks:q}"
            + (" --tokens {input.tokens:q}" if EVAL_PERPLEXITY else "")
            + " --out {params.out:q} 2>&1 | tee {log:q}"


rule eval_summary:
    input:
        results=eval_outputs,
        # the adapted models whose method was trained (known once each target's select_adapt has run)
        adapted=adapted_eval_outputs if ADAPT_TARGETS else [],
        tasks="results/eval/tasks",
        # the expansion's runs table (new experts, trainable fractions), only when the stage runs
        expand_runs=["results/expand/runs.parquet"] if mcfg.expand_variants(config) else [],
        corpus_summary=corpus_checkpoint,  # the checkpoint that decides the languages (params need them)
    output:
        table="results/eval/results.parquet",
        adaptation="results/eval/adaptation.parquet",
        expansion="results/eval/expansion.parquet",
        summary="results/eval/summary.md",
    log:
        "results/logs/eval/summary.log",
    container:
        mcfg.rule_container(config, "eval_summary")
    resources:
        **mcfg.rule_resources(config, "eval_summary"),
    params:
        options=eval_summary_options,
        eval_dir=lambda w, output: os.path.dirname(output.table),
    shell:
        "python -m moelang eval-summary --options {params.options:q} --eval-dir {params.eval_dir:q} --tasks {input.tasks:q}"
        " 2>&1 | tee {log:q}"

# Stage: adaptation II, LayerMoE expansion of one model by each variant's allocation plan, trained in two
# stages. See src/moelang/expand.py.
#
# Stage 0 (the expanded model) and stage 1 depend on the plan's new experts per layer alone, stage 2 also
# on the classifier: variants whose plans give the same numbers share them, made once under the first
# such variant's name in config order (expand_sharing(), from the allocation checkpoint's plan.json);
# a variant whose (plan, classifier) coincides with an earlier one's has no job of its own and is
# evaluated once with it (its runs.parquet row says trained_as).

EXPAND_VARIANTS = mcfg.expand_variants(config)
EXPAND_START = mcfg.expand_start(config) if EXPAND_VARIANTS else None

# Which variants share a model is known once the allocation has run (expand_sharing() says so then);
# before it, only what the budget forces.
if EXPAND_VARIANTS and workflow.is_main_process and not os.path.exists("results/allocation/plan.json"):
    forced_note = expand_forced_sharing_note()
    if forced_note:
        sys.stderr.write(f"moelang: note: {forced_note}\n")


if EXPAND_VARIANTS:

    rule expand:
        input:
            start=model_registry.workflow_inputs(EXPAND_START),
            plan="results/allocation/plan.json",
            profile=expand_profile(),
            corpus_summary=corpus_checkpoint,  # the checkpoint that decides the languages (params need them)
        output:
            directory("results/expand/{variant}/stage0"),
        log:
            "results/logs/expand/{variant}.stage0.log",
        wildcard_constraints:
            variant="|".join(map(re.escape, EXPAND_VARIANTS)),
        container:
            mcfg.rule_container(config, "expand")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "expand"),
        params:
            options=expand_options,
            profile=lambda w, input: quoted_option("--profile-dir", input.profile),
        shell:
            "OMP_NUM_THREADS={threads} python -m moelang expand --options {params.options:q} --plan {input.plan:q}"
            " {params.profile} --out {output:q} 2>&1 | tee {log:q}"

    rule expand_stage1:
        input:
            model="results/expand/{variant}/stage0",
            tokens=lambda w: expand("results/tokens/{lang}.parquet", lang=expand_languages("new")),
        output:
            directory("results/expand/{variant}/stage1"),
        log:
            "results/logs/expand/{variant}.stage1.log",
        wildcard_constraints:
            variant="|".join(map(re.escape, EXPAND_VARIANTS)),
        container:
            mcfg.rule_container(config, "expand_stage1")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "expand_stage1"),
        params:
            options=expand_options,
            launcher=mcfg.launcher(config, "expand_stage1"),
            state_dir="results/state/expand/{variant}/stage1",
        shell:
            "OMP_NUM_THREADS={threads} {params.launcher} expand-train --stage 1 --options {params.options:q}"
            " --model {input.model:q} --tokens {input.tokens:q} --out {output:q}"
            " --state-dir {params.state_dir:q} 2>&1 | tee {log:q}"

    rule expand_stage2:
        input:
            model=lambda w: f"results/expand/{expand_sharing()[w.variant]['stage1']}/stage1",
            plan="results/allocation/plan.json",
            tokens=lambda w: expand(
                "results/tokens/{lang}.parquet", lang=expand_languages("new") + expand_languages("old")
            ),
        output:
            directory("results/expand/{variant}/stage2"),
        log:
            "results/logs/expand/{variant}.stage2.log",
        wildcard_constraints:
            variant="|".join(map(re.escape, EXPAND_VARIANTS)),
        container:
            mcfg.rule_container(config, "expand_stage2")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "expand_stage2"),
        params:
            options=expand_options,
            launcher=mcfg.launcher(config, "expand_stage2"),
            state_dir="results/state/expand/{variant}/stage2",
        shell:
            "OMP_NUM_THREADS={threads} {params.launcher} expand-train --stage 2 --options {params.options:q}"
            " --model {input.model:q} --plan {input.plan:q} --tokens {input.tokens:q} --out {output:q}"
            " --state-dir {params.state_dir:q} 2>&1 | tee {log:q}"

    rule gather_expand:
        input:
            runs=lambda w: [f"results/expand/{v}/stage2" for v in expand_trained_variants()],
            plan="results/allocation/plan.json",
        output:
            "results/expand/runs.parquet",
        log:
            "results/logs/expand/gather.log",
        container:
            mcfg.rule_container(config, "gather_expand")
        resources:
            **mcfg.rule_resources(config, "gather_expand"),
        params:
            variants=json.dumps(EXPAND_VARIANTS),
        shell:
            "python -m moelang expand-gather --runs {input.runs:q} --variants {params.variants:q} --plan {input.plan:q}"
            " --out {output:q} 2>&1 | tee {log:q}"

# Stage: the base model and its continual pre-training. See src/moelang/basemodel.py.

BASE_MODEL = config["model"]["base"]
BASE_LANGUAGE = config["languages"]["base"]
# A trained base is this workflow's output; a pretrained one is a hub id or a directory used as is.
BASE_REF = model_registry.base_model(config).ref
CPT_STEPS = mcfg.cpt_options(config).steps


if BASE_MODEL["type"] == "train":

    rule pretrain_base:
        input:
            tokens=base_language_tokens,
            tokenizer="results/tokenizer",
        output:
            directory("results/models/base"),
        log:
            "results/logs/models/pretrain.log",
        container:
            mcfg.rule_container(config, "pretrain_base")
        threads: 2
        resources:
            **mcfg.rule_resources(config, "pretrain_base"),
        params:
            options=lambda w: mcfg.to_json(mcfg.pretrain_options(config)),
            launcher=mcfg.launcher(config, "pretrain_base"),
            # the resumable training state (removed when the model is complete)
            state_dir="results/state/pretrain",
        shell:
            "OMP_NUM_THREADS={threads} {params.launcher} pretrain --options {params.options:q} --tokens {input.tokens:q}"
            " --tokenizer {input.tokenizer:q} --out {output:q} --state-dir {params.state_dir:q} 2>&1 | tee {log:q}"


rule cpt:
    input:
        base=model_registry.workflow_inputs(model_registry.base_model(config)),
        tokens=kept_high_resource_tokens,
    output:
        [directory(f"results/models/cpt/step-{step}") for step in CPT_STEPS],
        log="results/models/cpt/train_log.parquet",
    log:
        "results/logs/models/cpt.log",
    container:
        mcfg.rule_container(config, "cpt")
    threads: 2
    resources:
        **mcfg.rule_resources(config, "cpt"),
    params:
        options=lambda w: mcfg.to_json(mcfg.cpt_options(config)),
        launcher=mcfg.launcher(config, "cpt"),
        # the base's directory when this workflow trains it, else its hub id or local directory
        base=lambda w, input: input.base[0] if input.base else BASE_REF,
        out=lambda w, output: os.path.dirname(output.log),
        state_dir="results/state/cpt",
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} cpt --options {params.options:q} --base {params.base:q}"
        " --tokens {input.tokens:q} --out {params.out:q} --state-dir {params.state_dir:q} 2>&1 | tee {log:q}"

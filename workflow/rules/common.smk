# The helper functions that the Snakefile and the rule files share (the Snakemake catalog's layout).
# The rule files hold rules and the constants their rules need, and this file (included first) holds
# functions and no rule (`snakemake --lint` wants the two apart). A helper that reads a constant of a
# rule file (ADAPT_TARGETS, PROFILED, ...) reads it when it is called, after every file is included.
import json
import shlex

from moelang.adapt import lr_name, not_trained


def requested_workflow_profile(argv):
    """The value of --workflow-profile on Snakemake's command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--workflow-profile" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--workflow-profile="):
            return arg.split("=", 1)[1]
    return None


def gpu_memory_problems(config):
    """The stages whose estimated peak memory per GPU exceeds resources.gpu_memory_gb (moelang.plan),
    one line each; a plan that cannot be made (an architecture unreadable now) is a warning, not a stop."""
    from moelang.errors import MoelangError
    from moelang.plan import fit_problems

    try:
        return fit_problems(config)
    except MoelangError as error:
        sys.stderr.write(f"moelang: warning: no GPU memory check at start-up: {error}\n")
        return []


def quoted_option(flag, paths):
    """``flag PATH`` for an optional input (an empty list: nothing), quoted for the shell."""
    return f"{flag} {shlex.quote(paths[0])}" if paths else ""


# --- languages and tokens ----------------------------------------------------------------------


def kept_languages(wildcards=None):
    """Languages whose corpus is big enough (decided by the corpus_summary checkpoint)."""
    with open(checkpoints.corpus_summary.get().output.languages, encoding="utf-8") as f:
        return json.load(f)["kept"]


def corpus_checkpoint(wildcards=None):
    """The corpus checkpoint's summary, as the input of a rule whose params need the kept languages (and
    whose inputs do not already read the checkpoint). Read through the checkpoint, not named as a plain
    path: until the checkpoint's outcome is known (Snakemake's first pass over the DAG, on every run),
    the job is then marked as depending on it, and Snakemake leaves its params unchecked. Named as a
    path, the job's params are "to be determined" in that pass, compare as changed against the last
    run's, and the job and everything after it are marked to rerun; a job after it that Snakemake does
    not rebuild once the checkpoint is known keeps that mark ("input files updated by another job"), so
    a finished run was never a fixed point (the expansion's gather, the summary and the report ran
    again on every call; tests/test_workflow_dense.py: a finished run's dry run has nothing to do)."""
    return checkpoints.corpus_summary.get().output.table


def kept_tokens(wildcards=None):
    return expand("results/tokens/{lang}.parquet", lang=kept_languages())


def tokenizer_inputs(wildcards):
    # A trained BPE reads the kept languages' corpora; a pretrained tokenizer reads nothing local.
    if config["tokenizer"]["type"] == "train":
        return expand("results/corpus/{lang}.parquet", lang=kept_languages())
    return []


# --- the base model and its continual pre-training ---------------------------------------------


def kept_high_resource_tokens(wildcards):
    langs = [lang for lang in kept_languages() if lang in config["languages"]["high_resource"]]
    return expand("results/tokens/{lang}.parquet", lang=langs)


def base_language_tokens(wildcards):
    if BASE_LANGUAGE not in kept_languages():
        raise WorkflowError(
            f"moelang: the base language '{BASE_LANGUAGE}' was dropped by the corpus stage "
            f"(see results/corpus/languages.json); give it more text or change languages.base"
        )
    return f"results/tokens/{BASE_LANGUAGE}.parquet"


def model_targets():
    targets = ["results/models/base"] if BASE_MODEL["type"] == "train" else []
    if config["model"]["cpt"]["enabled"]:
        targets += [f"results/models/cpt/step-{step}" for step in CPT_STEPS]
        targets += ["results/models/cpt/train_log.parquet"]
    return targets


# --- routing and similarity ---------------------------------------------------------------------


def profiled_model_input(wildcards):
    return model_registry.workflow_inputs(PROFILED[wildcards.model])


def routing_profiles(wildcards, input):
    """Every kept language's profile file in each profile directory of ``input.profiles``."""
    return [f"{directory}/{lang}.parquet" for directory in input.profiles for lang in kept_languages()]


def similarity_parallel_input(wildcards):
    return ["results/corpus/parallel.parquet"] if wildcards.method == "parallel" else []


# --- adaptation I: final-layer expert fine-tuning ------------------------------------------------


def adapted_targets(wildcards=None):
    """The targets adapted in this run: adapt.targets that the corpus stage kept."""
    kept = set(kept_languages())
    return [lang for lang in ADAPT_TARGETS if lang in kept]


def adapt_run_dirs(lang, methods):
    return [f"results/adapt/{lang}/{method}/{lr_name(lr)}" for method in methods for lr in ADAPT_LRS]


# --- adaptation II: LayerMoE expansion ------------------------------------------------------------


def expand_options(wildcards):
    return mcfg.to_json(mcfg.expand_options(config, wildcards.variant, kept_languages()))


def expand_languages(side):
    """The allocation's old or new languages that the corpus stage kept (the variants' ``old``/``new``)."""
    allocation = mcfg.allocation_options(config, kept_languages())
    return list(allocation.old if side == "old" else allocation.new)


def expand_profile(wildcards=None):
    """The start model's routing profile, when it is profiled and the new experts copy its most-used ones."""
    if config["routing"]["enabled"] and EXPAND_START.profiled and config["expand"]["init"] == "most_used":
        return [f"results/routing/{EXPAND_START.name}"]
    return []


_EXPAND_SHARING = {}


def expand_sharing(wildcards=None):
    """Variant -> {"stage1": the variant whose stage 0 and 1 it uses, "model": the variant whose trained
    stage-2 model it is} (moelang.expand.shared_training), from the plan table, which exists once the
    allocation checkpoint has run. The first time the plans are known, one line names the variants
    whose plans and classifier setting coincide: at start-up when the allocation is done, else as soon
    as its job has written the plan."""
    from moelang.expand import sharing_note, shared_training

    path = checkpoints.allocate_experts.get().output.plan
    stamp = os.stat(path).st_mtime_ns
    if _EXPAND_SHARING.get("stamp") != stamp:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
        sharing = shared_training(EXPAND_VARIANTS, plan)
        note = sharing_note(sharing, plan, EXPAND_VARIANTS)
        if note and workflow.is_main_process and note != _EXPAND_SHARING.get("note"):
            sys.stderr.write(f"moelang: note: {note}\n")
        _EXPAND_SHARING.update(stamp=stamp, sharing=sharing, note=note)
    return _EXPAND_SHARING["sharing"]


def expand_forced_sharing_note():
    """Before the allocation has run: the line naming the variants that share a model whatever the
    similarities, when the budget forces it (allocation.new_experts equal to the layer count of a trained
    base, whose layer count the config gives; moelang.expand.forced_plan), else None."""
    from moelang.expand import forced_plan, sharing_note, shared_training

    base = config["model"]["base"]
    layers = base.get("architecture", {}).get("num_hidden_layers") if base["type"] == "train" else None
    allocation = config["allocation"]
    plan = forced_plan(allocation.get("new_experts"), layers, allocation.get("uniform_per_layer"))
    if plan is None:
        return None
    note = sharing_note(shared_training(EXPAND_VARIANTS, plan), plan, EXPAND_VARIANTS)
    _EXPAND_SHARING["note"] = note
    return note and f"allocation.new_experts {allocation['new_experts']} on {layers} layers: {note}"


def expand_trained_variants(wildcards=None):
    """The variants whose stage-2 model is trained (and evaluated): one per distinct (plan, classifier)."""
    return list(dict.fromkeys(shared["model"] for shared in expand_sharing().values()))


# --- evaluation -----------------------------------------------------------------------------------


def evaluated_model_input(wildcards):
    return model_registry.workflow_inputs(EVALUATED[wildcards.model])


def evaluated_names(wildcards=None):
    """The evaluated models of this run other than the adapted ones (adapted_eval_names): an expanded
    model once per distinct trained model (the variants that share it are not evaluated again)."""
    trained = set(expand_trained_variants()) if EXPAND_VARIANTS else set()
    return [
        name
        for name, entry in EVALUATED.items()
        if entry.target is None and (entry.variant is None or entry.variant in trained)
    ]


def untrained_adapted_models(wildcards=None):
    """Adapted models (name -> why) whose method the adapt job did not train (an expert set empty in
    every adapted layer): from each kept target's runs table, which the select_adapt checkpoint writes."""
    skipped = {}
    for lang in adapted_targets():
        reasons = not_trained(checkpoints.select_adapt.get(lang=lang).output.table)
        for name, entry in EVALUATED.items():
            if entry.target == lang and entry.method in reasons:
                skipped[name] = reasons[entry.method]
    return skipped


def adapted_eval_names(wildcards=None):
    """The adapted models this run evaluates: their target kept by the corpus, their method trained."""
    kept = set(kept_languages())
    skipped = untrained_adapted_models()
    return [name for name, e in EVALUATED.items() if e.target in kept and name not in skipped]


def expand_eval_outputs(wildcards=None):
    """Each trained expansion model's evaluation files (``rule all``)."""
    return [f"results/eval/expand-{v}/{name}" for v in expand_trained_variants() for name in EVAL_MODEL_OUTPUTS]


def eval_outputs(wildcards=None):
    return [f"results/eval/{name}/{output}" for name in evaluated_names() for output in EVAL_MODEL_OUTPUTS]


def adapted_eval_outputs(wildcards=None):
    # apart from eval_outputs: the other models' evaluations need not wait for the adaptation checkpoints
    return [f"results/eval/{name}/{output}" for name in adapted_eval_names() for output in EVAL_MODEL_OUTPUTS]


def eval_summary_options(wildcards, input):
    """The summary's options, from its inputs: they are known once the corpus checkpoint has decided
    the kept languages."""
    given = list(input.results) + list(input.adapted)
    summarised = [n for n in EVALUATED if any(f.startswith(f"results/eval/{n}/") for f in given)]
    not_evaluated = untrained_adapted_models() if ADAPT_TARGETS else {}
    return mcfg.to_json(
        mcfg.eval_summary_options(config, EVAL_FAMILIES, summarised, kept_languages(), not_evaluated=not_evaluated)
    )


# --- report ----------------------------------------------------------------------------------------


def report_figure_outputs():
    """The report's figures as named outputs, each an item of Snakemake's HTML report with its
    caption (workflow/report/<name>.rst) and section; which figures depends on the stages the config runs."""
    from moelang.report import report_figures

    figures = report_figures(config["routing"]["enabled"], bool(ADAPT_TARGETS), bool(EXPAND_VARIANTS))
    return {
        figure.name: report(
            f"results/report/{figure.name}.png",
            caption=f"../report/{figure.name}.rst",
            category=figure.section,
        )
        for figure in figures
    }


def report_stage_options(wildcards, input):
    """The report's flags for the inputs of stages a config may turn off, quoted for the shell."""
    flags = [quoted_option("--routing-metrics", [os.path.dirname(p) for p in input.routing_metrics][:1])]
    names = ("selected_experts", "adaptation", "adapt_runs", "expansion", "expand_runs")
    flags += [quoted_option(f"--{name.replace('_', '-')}", getattr(input, name)) for name in names]
    return " ".join(flag for flag in flags if flag)

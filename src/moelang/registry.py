"""One registry of the models the workflow knows.

Every model of the DAG is one :class:`ModelEntry`: the base model, the CPT checkpoints, the models
listed in ``evaluation.models``, the adapted models and the expanded models (``expand-{variant}``). The
rule files and the config helpers read :func:`model_registry` instead of building names and paths
themselves: which models are profiled (routing) and evaluated, where each one is (a workflow output
directory, a local directory, or a hub id with its revision) and which rule makes it.

A model that a training run of this workflow exports carries the run's own record,
:data:`RUN_RECORD` (``moelang_run.json``: method, trainable and total parameter counts, steps,
tokens), written by :func:`write_run_record`; the evaluation summary reads a model's trainable fraction
from it (:func:`trainable_fraction`), not from the config.

Adding models
-------------
The registry is built by the functions of :data:`MODEL_PRODUCERS`, in order; each takes the
validated config and returns the entries it adds, in DAG order. A later stage (an adaptation method,
an expanded model) adds its models by registering one more producer::

    @model_producer
    def adapted_models(config: dict) -> list[ModelEntry]:
        return [ModelEntry(name="ssft", ref="results/models/ssft", method="ssft", rule="adapt", ...)]

and a rule file making the model names it in ``rule``; its outputs are then the inputs of the
profiling and evaluation jobs of that model (:func:`workflow_inputs`) without any other change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from moelang.errors import ConfigError, MoelangError

RUN_RECORD = "moelang_run.json"  # the training run's record, in each model directory it exports


@dataclass(frozen=True)
class ModelEntry:
    """One model of the workflow."""

    name: str
    """Its name in the outputs: ``results/routing/<name>``, ``results/eval/<name>``, the ``model`` column
    of the evaluation table (``base``, ``cpt-step{N}``, or a key of ``evaluation.models``)."""
    ref: str
    """Where it is: a workflow output directory (made by ``rule``), a local directory, or a hub id."""
    revision: str | None
    """The hub revision of a hub id (the configured pretrained base's); None for a directory."""
    method: str
    """How it was made: ``base`` (the starting model), ``cpt``, a method named in ``evaluation.models``,
    later the adaptation methods (``ssft``, ...)."""
    rule: str | None
    """The Snakemake rule whose output ``ref`` is; None for a model from outside the workflow."""
    profiled: bool
    """Whether it is analysed: its routing profiled (``results/routing/<name>``, the routing metrics;
    with ``routing.enabled``, an MoE base) and its layer similarity computable (every base)."""
    evaluated: bool
    """Whether it is evaluated (``results/eval/<name>``, the evaluation table and summary)."""
    series: str
    """The ``model`` column of the routing tables: the run whose checkpoints it is (``cpt``), or ``base``."""
    checkpoint_step: int
    """Its step within that run (0: the run's starting model)."""
    trainable_fraction: float | None = None
    """The configured ``evaluation.models.<name>.trainable_fraction`` of an external model; the
    evaluation summary prefers the run's record (:func:`trainable_fraction`)."""
    target: str | None = None
    """The language an adapted model was adapted to (None for every other model)."""
    start: str | None = None
    """The name of the model an adapted or expanded model started from (its gains are measured against it)."""
    variant: str | None = None
    """The expansion variant (``expand.variants``) an expanded model is (None for every other model)."""

    @property
    def is_output(self) -> bool:
        """True when a rule of this workflow makes the model (its directory is a job's output)."""
        return self.rule is not None


Producer = Callable[[dict], list[ModelEntry]]


def base_model(config: dict) -> ModelEntry:
    """The base model: this workflow's pre-trained output, or the configured hub id / directory with
    its revision (used from where it is, never copied)."""
    base = config["model"]["base"]
    if base["type"] == "train":
        return ModelEntry(name="base", ref="results/models/base", revision=None, method="base", rule="pretrain_base",
                          profiled=False, evaluated=False, series="base", checkpoint_step=0)
    return ModelEntry(name="base", ref=base["name_or_path"], revision=base.get("revision"), method="base", rule=None,
                      profiled=False, evaluated=False, series="base", checkpoint_step=0)


def base_and_cpt_models(config: dict) -> list[ModelEntry]:
    """With CPT: its checkpoints, profiled and evaluated (step 0 is the base model, method ``base``; a
    pretrained base is step 0 itself, a trained one is also listed as ``base``, neither profiled nor
    evaluated). Without CPT: the base model alone, profiled and evaluated."""
    from moelang.config import cpt_options

    base = base_model(config)
    if not config["model"]["cpt"]["enabled"]:
        return [ModelEntry(**{**asdict(base), "profiled": True, "evaluated": True})]
    steps = cpt_options(config).steps
    entries = [ModelEntry(name=f"cpt-step{step}", ref=f"results/models/cpt/step-{step}", revision=None,
                          method="base" if step == 0 else "cpt", rule="cpt", profiled=True, evaluated=True,
                          series="cpt", checkpoint_step=step) for step in steps]
    if 0 not in steps:  # a pretrained base: step 0 is the base model itself
        entries.insert(0, ModelEntry(**{**asdict(base), "name": "cpt-step0", "profiled": True, "evaluated": True,
                                        "series": "cpt"}))
    elif base.is_output:
        entries.insert(0, base)
    return entries


def listed_models(config: dict) -> list[ModelEntry]:
    """``evaluation.models``: evaluated, not profiled (the configured base's hub revision applies when
    ``ref`` is the base's hub id; a ``ref`` that is an earlier entry's directory gets its rule in
    :func:`model_registry`)."""
    base = base_model(config)
    return [ModelEntry(name=name, ref=spec["ref"], revision=base.revision if spec["ref"] == base.ref else None,
                       method=spec["method"], rule=None, profiled=False,
                       evaluated=True, series=spec["method"], checkpoint_step=0,
                       trainable_fraction=spec.get("trainable_fraction"))
            for name, spec in config["evaluation"]["models"].items()]


def adapted_models(config: dict) -> list[ModelEntry]:
    """The selected run of every (target, method) of the adaptation stage (``adapt``), evaluated,
    named ``adapt-{target}-{method}``; made by the target's ``select_adapt`` job. A target the corpus
    stage drops has entries too: the rules ask only for the kept ones."""
    from moelang.config import adapt_targets

    if not config["adapt"]["enabled"]:
        return []
    # from the profiled models alone (the registry is still being built): adapt.start_model, else
    # routing.selection_model, else the last profiled model; moelang.config checks the names
    candidates = [e.name for e in base_and_cpt_models(config) if e.profiled]
    start = config["adapt"]["start_model"] or config["routing"]["selection_model"] or candidates[-1]
    return [ModelEntry(name=f"adapt-{lang}-{method}", ref=f"results/adapt/{lang}/{method}/selected", revision=None,
                       method=method, rule="select_adapt", profiled=False, evaluated=True,
                       series=f"adapt-{lang}-{method}", checkpoint_step=config["adapt"]["train"]["steps"],
                       target=lang, start=start)
            for lang in adapt_targets(config) for method in config["adapt"]["methods"]]


def expand_start_name(config: dict) -> str:
    """The name of the model the expansion variants start from, from the other producers alone (the
    registry is still being built): ``expand.model`` when it names a model or is one's reference, else
    the reference itself; default the similarity stage's model (``similarity.model``, else the last
    profiled model). :func:`moelang.config.expand_start` checks it."""
    chosen = config["expand"]["model"]
    if chosen is None:
        return config["similarity"]["model"] or [e.name for e in base_and_cpt_models(config) if e.profiled][-1]
    others = [e for producer in (base_and_cpt_models, adapted_models, listed_models) for e in producer(config)]
    if any(e.name == chosen for e in others):
        return chosen
    return next((e.name for e in others if e.ref == chosen), chosen)


def expanded_models(config: dict) -> list[ModelEntry]:
    """The stage-2 model of every expansion variant (``expand.variants``), evaluated, not profiled,
    named ``expand-{variant}``, method = the variant; made by the variant's ``expand_stage2`` job."""
    from moelang.config import expand_variants

    variants = expand_variants(config)
    if not variants:
        return []
    start = expand_start_name(config)
    steps = config["expand"]["stage1"]["steps"] + config["expand"]["stage2"]["steps"]
    return [ModelEntry(name=f"expand-{variant}", ref=f"results/expand/{variant}/stage2", revision=None,
                       method=variant, rule="expand_stage2", profiled=False, evaluated=True,
                       series=f"expand-{variant}", checkpoint_step=steps, start=start, variant=variant)
            for variant in variants]


MODEL_PRODUCERS: list[Producer] = [base_and_cpt_models, adapted_models, expanded_models, listed_models]
"""The functions that make the registry, in DAG order. An adaptation stage appends its own
(:func:`model_producer`); ``listed_models`` stays last so that a listed model may point at any
workflow output made before it."""


def model_producer(producer: Producer) -> Producer:
    """Register ``producer`` (config -> its entries) before :func:`listed_models`; usable as a decorator."""
    if producer not in MODEL_PRODUCERS:
        MODEL_PRODUCERS.insert(MODEL_PRODUCERS.index(listed_models), producer)
    return producer


def model_registry(config: dict) -> dict[str, ModelEntry]:
    """Every model of the workflow, name -> entry, in DAG order (the base, the CPT checkpoints by step,
    adapted models, expanded models, then ``evaluation.models``). A listed model whose ``ref`` is another entry's output
    directory is made by that entry's rule."""
    registry: dict[str, ModelEntry] = {}
    for producer in MODEL_PRODUCERS:
        for entry in producer(config):
            if entry.name in registry:
                listed = entry.name in config["evaluation"]["models"]
                key = f"evaluation.models.{entry.name}" if listed else "model"
                raise ConfigError(f"config key '{key}': the model name '{entry.name}' is taken by another model of "
                                  f"this workflow ({registry[entry.name].ref}); rename it")
            if entry.rule is None:
                maker = next((e.rule for e in registry.values() if e.is_output and e.ref == entry.ref), None)
                if maker is not None:
                    entry = ModelEntry(**{**asdict(entry), "rule": maker})
            registry[entry.name] = entry
    return registry


def profiled(config: dict) -> dict[str, ModelEntry]:
    """The models whose routing is profiled, in DAG order."""
    return {name: e for name, e in model_registry(config).items() if e.profiled}


def evaluated(config: dict) -> dict[str, ModelEntry]:
    """The evaluated models, in DAG order."""
    return {name: e for name, e in model_registry(config).items() if e.evaluated}


def workflow_outputs(config: dict) -> set[str]:
    """The model directories that rules of this workflow make (they need not exist yet)."""
    return {e.ref for e in model_registry(config).values() if e.is_output}


def workflow_inputs(entry: ModelEntry) -> list[str]:
    """A job's input for model ``entry``: its directory when a rule makes it, else nothing (a local
    directory or hub id is read where it is)."""
    return [entry.ref] if entry.is_output else []


def summary_models(config: dict) -> dict[str, dict]:
    """What the evaluation summary needs of each evaluated model: name -> {ref, method,
    trainable_fraction (the configured one of an external model; the run's record wins), target
    (the language an adapted model was adapted to, else None), start (the model its adaptation or
    expansion started from), variant (the expansion variant an expanded model is, else None)}."""
    return {name: {"ref": e.ref, "method": e.method, "trainable_fraction": e.trainable_fraction, "target": e.target,
                   "start": e.start, "variant": e.variant}
            for name, e in evaluated(config).items()}


# --------------------------------------------------------------------------------------------------
# The training run's record
# --------------------------------------------------------------------------------------------------

def write_run_record(model_dir: str | Path, method: str, counts: dict, steps: int, tokens: int) -> dict:
    """Write :data:`RUN_RECORD` into exported model directory ``model_dir``: the ``method`` that made
    it, its parameter ``counts`` as :func:`moelang.models.loading.count_parameters` gives them for the
    model as the method prepared it (total, trainable, trainable_fraction), and the optimizer
    ``steps`` and ``tokens`` it was trained for."""
    from moelang.io import atomic_path

    record = {"method": method, "total_parameters": int(counts["total"]),
              "trainable_parameters": int(counts["trainable"]),
              "trainable_fraction": float(counts["trainable_fraction"]), "steps": int(steps), "tokens": int(tokens)}
    with atomic_path(Path(model_dir) / RUN_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def read_run_record(ref: str | Path) -> dict | None:
    """The run record of model ``ref``: None for a hub id or a directory without one (a model from
    outside this workflow)."""
    path = Path(ref) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        float(record["trainable_fraction"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MoelangError(f"model record {path} is not readable ({type(exc).__name__}: {exc}); delete the model "
                           f"directory and run the step that makes it again") from None
    return record


def trainable_fraction(entry: dict) -> float | None:
    """The fraction of parameters the run that made a model trained: from the run's own record when
    the model has one, else the configured value (None when not given). A starting model (method
    ``base``, a run's step 0) trained nothing of its own: None."""
    if entry["method"] == "base":
        return None
    record = read_run_record(entry["ref"]) if entry.get("ref") else None
    if record is not None:
        return float(record["trainable_fraction"])
    return entry.get("trainable_fraction")

"""Stage: adaptation I, final-layer expert fine-tuning of a new language (paper A).

Every run starts from the same model (``adapt.start_model``; default the model whose routing chose the
expert sets, the last CPT checkpoint) and trains on the target language's train split only, through the
one training engine (:func:`moelang.train.train`). What trains is the method's (:data:`ADAPT_METHODS`,
a name -> builder registry; a new method is one :func:`adapt_method` entry):

* ``ssft``, ``seft``, ``seft_top{N}``, ``random``, ``random_hr``: the expert set of that name in
  ``results/routing/selected_experts.json`` (the routing metrics chose them on the parent language),
  in each of the final K MoE layers, plus the whole router of each of those layers (the authors do;
  weight decay then also shrinks the rows of the experts that are not trained);
* ``aeft``: every expert of the final K layers, plus their routers, and in a family with always-on
  shared experts (Qwen2-MoE's ``shared_expert`` with its ``shared_expert_gate``, DeepSeek-V3's
  ``shared_experts``) those layers' shared experts too: they are experts of the final layers;
* ``full-ft``: every parameter, with its own training settings (``adapt.full_ft``,
  :func:`full_ft_settings`): by default the authors' Full-FT (paper A's OLMo trainer: load balancing
  0.01, z-loss 0.001, weight decay on every parameter, norms, biases and embeddings too, and a rate
  still in its warm-up, rising linearly over the run from 0.59 x lr to lr as theirs from 1e-5 to
  1.7e-5); ``recipe: expert_methods`` trains it with ``adapt.train`` as the expert methods (ours);
* ``lora``: PEFT LoRA on the final K layers' fused expert tensors and routers
  (:mod:`moelang.models.lora`), merged into the weights before saving.

The expert methods train the chosen slices as their own small experts module
(:func:`moelang.models.adapters.split_experts`): optimizer state and weight decay touch nothing else,
and every other slice, layer, norm and the embeddings end bit-identical to the start. With
``adapt.mask_router`` (default) the router of each adapted layer routes among the chosen experts only
while training (:mod:`moelang.models.router_mask`); evaluation and the saved model never see the
mask. No load-balancing loss by default (``adapt.train.aux_loss_coef: 0``, as the authors).

Every (method, learning rate) of the job is one run with its own training state
(``results/state/adapt/{lang}/{method}/lr-{lr}``, resumable like any training job). Runs whose trainable
parameters all lie in the final K layers share one pass of the frozen layers below them
(``adapt.share_frozen_pass``, :mod:`moelang.sweep`); ``full-ft`` trains alone. After training, each
run's perplexity on the target is measured on two disjoint sets of documents (:mod:`moelang.splits`):
the dev split, which selects the learning rate per (target, method) (:func:`select_runs`), and the test
split, which is reported (the evaluation stage measures the selected model on it again, with the other
languages). Selection never reads the test perplexity.

A method whose expert set is empty in every adapted layer (the selection thresholds left the parent no
specific expert, say) is not trained: it would train the routers alone, which no paper method does.
Its run directories hold :data:`NOT_RUN_FILE` (the reason) and no model, ``runs.parquet`` records it
as not run, and the workflow does not evaluate it (:func:`not_trained`). A set empty in some layers
only trains the others (their routers too); ``experts_per_layer`` records the 0.

Outputs
-------
``results/adapt/{lang}/{method}/lr-{lr}/``
    the adapted model (a plain ``save_pretrained`` checkpoint of the start model's architecture, with
    its tokenizer), ``train_log.parquet`` (the engine's log), ``moelang_run.json`` (method, parameter
    counts, steps, tokens) and ``perplexity.json`` (``lang``, ``method``, ``lr``, ``layers``,
    ``experts_per_layer``, ``final_loss``, and ``dev`` and ``test``: each ``n_tokens``, ``nll``,
    ``perplexity`` on the target's dev and test split); a method that is not
    trained: :data:`NOT_RUN_FILE` alone (``lang``, ``method``, ``lr``, ``layers``, ``experts_per_layer``,
    ``reason``).
``results/adapt/{lang}/{method}/selected/``
    the selected run's files (hard links: no second copy), the model the evaluation stage sees; a
    method that is not trained: its :data:`NOT_RUN_FILE` alone.
``results/adapt/{lang}/runs.parquet``, ``results/adapt/runs.parquet`` (:data:`RUNS_SCHEMA`)
    one row per run: ``lang``, ``method``, ``lr`` float64, ``layers`` list<int32> (the adapted layers),
    ``experts_per_layer`` list<int32> (experts trained in each of them; every expert for aeft, full-ft
    and lora), ``trainable_params`` int64, ``total_params`` int64, ``trainable_fraction`` float64,
    ``steps`` int64, ``tokens`` int64, ``final_loss`` float64 (the training loss of the last step),
    ``dev_perplexity`` float64 (on the target's dev split: what selects), ``test_perplexity`` float64
    (on its test split, disjoint documents: what is reported), ``selected`` bool (the lowest dev
    perplexity of its (lang, method); ties go to the smaller rate), ``trained`` bool (false: not run, its measured columns null),
    ``not_run_reason`` string (why; null for a trained run).

Our schedule differs from the authors' (authors-code.md): their cosine horizon runs past the end of
training, so their rate stays near its peak; ours (``adapt.train``) decays to ``min_lr_ratio`` x lr
at the last step unless ``cosine_horizon_steps`` is set.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import pyarrow as pa

from moelang.errors import ConfigError, MoelangError
from moelang.io import atomic_dir, atomic_path, log, write_json, write_table
from moelang.options import AdaptOptions

RUNS_SCHEMA = pa.schema([
    ("lang", pa.string()),
    ("method", pa.string()),
    ("lr", pa.float64()),
    ("layers", pa.list_(pa.int32())),
    ("experts_per_layer", pa.list_(pa.int32())),
    ("trainable_params", pa.int64()),
    ("total_params", pa.int64()),
    ("trainable_fraction", pa.float64()),
    ("steps", pa.int64()),
    ("tokens", pa.int64()),
    ("final_loss", pa.float64()),
    ("dev_perplexity", pa.float64()),
    ("test_perplexity", pa.float64()),
    ("selected", pa.bool_()),
    ("trained", pa.bool_()),
    ("not_run_reason", pa.string()),
])
PERPLEXITY_FILE = "perplexity.json"
NOT_RUN_FILE = "not_run.json"  # in a run directory (and selected/) of a method that was not trained
SELECTED_DIR = "selected"
WEIGHTS_NOT_KEPT_FILE = "weights_not_kept.json"  # a run whose model was dropped (adapt.keep_models: selected)
EXPERT_SET_METHODS = ("ssft", "seft", "random", "random_hr")  # and seft_top{N}: sets in selected_experts.json


def lr_name(lr: float) -> str:
    """The run directory's name for learning rate ``lr``: ``lr-0.001``, ``lr-1e-05`` (Python's ``g``)."""
    return f"lr-{lr:g}"


# --------------------------------------------------------------------------------------------------
# The method registry
# --------------------------------------------------------------------------------------------------

@dataclass
class AdaptContext:
    """What a method's builder gets: the start model's adapter, the adapted layers, the target's
    expert sets (method -> {layer: expert ids}) and the job's options."""

    adapter: object
    layers: list[int]
    expert_sets: dict[str, dict[str, list[int]]]
    options: AdaptOptions

    def expert_set(self, name: str) -> dict[int, list[int]]:
        if name not in self.expert_sets:
            raise MoelangError(f"adapt: results/routing/selected_experts.json has no '{name}' set for "
                               f"'{self.options.lang}' (it has {', '.join(sorted(self.expert_sets))}); use one of "
                               f"those in adapt.methods, or rerun the routing metrics")
        sets = {int(layer): list(ids) for layer, ids in self.expert_sets[name].items()}
        if sorted(sets) != self.layers:
            raise MoelangError(f"adapt: the '{name}' experts of '{self.options.lang}' are for layers {sorted(sets)}, "
                               f"the start model's final {len(self.layers)} MoE layers are {self.layers}; rerun the "
                               f"routing metrics on the start model (routing.selection_model = adapt.start_model)")
        return sets


Builder = Callable[[AdaptContext], object]  # -> moelang.models.methods.TrainingMethod
ADAPT_METHODS: dict[str, Builder] = {}
"""Method name -> builder of its :class:`~moelang.models.methods.TrainingMethod`."""


def adapt_method(name: str):
    """Register a builder under ``name`` (decorator)."""
    def register(builder: Builder) -> Builder:
        ADAPT_METHODS[name] = builder
        return builder
    return register


def method_builder(name: str) -> Builder:
    """The builder of ``name``; ``seft_top{N}`` names the chosen-set method of that set."""
    if name in ADAPT_METHODS:
        return ADAPT_METHODS[name]
    if re.fullmatch(r"seft_top\d+", name):
        return lambda ctx: _expert_subset(ctx, ctx.expert_set(name))
    raise ConfigError(f"config key 'adapt.methods': '{name}' is not a method; use one of "
                      f"{', '.join(known_methods())}")


def known_methods(top_n: int | None = None) -> list[str]:
    names = list(ADAPT_METHODS)
    names.insert(names.index("seft") + 1, f"seft_top{top_n if top_n is not None else 'N'}")
    return names


def trains_final_layers_only(name: str) -> bool:
    """True for methods whose trainable parameters all lie in the adapted layers (they may share the
    frozen pass below them)."""
    return name != "full-ft"


def _expert_subset(ctx: AdaptContext, experts: dict[int, list[int]], shared: bool = False):
    from moelang.models.methods import ExpertSubset

    return ExpertSubset(experts=experts, routers=list(ctx.layers), shared=list(ctx.layers) if shared else [],
                        mask_router=ctx.options.mask_router)


for _name in EXPERT_SET_METHODS:
    adapt_method(_name)(lambda ctx, name=_name: _expert_subset(ctx, ctx.expert_set(name)))


@adapt_method("aeft")
def _aeft(ctx: AdaptContext):
    counts = ctx.adapter.experts_per_layer
    return _expert_subset(ctx, {layer: list(range(counts[layer])) for layer in ctx.layers}, shared=True)


@adapt_method("full-ft")
def _full_ft(ctx: AdaptContext):
    from moelang.models.methods import FullTraining

    return FullTraining()


@adapt_method("lora")
def _lora(ctx: AdaptContext):
    from moelang.models.lora import LoRASettings, LoRATraining, expected_lora_parameters

    spec = ctx.options.lora
    settings = LoRASettings(rank=spec["rank"], alpha=float(spec["alpha"]), targets=tuple(spec["targets"]),
                            layers=len(ctx.layers), seed=ctx.options.seed)
    settings.check("adapt.lora")
    match, rule = spec.get("match"), spec.get("match_rule", "at_least")
    if match is not None:
        if match != "ssft" or rule not in LORA_MATCH_RULES:
            raise ConfigError(f"config key 'adapt.lora': match {match!r}, match_rule {rule!r}; give match ssft (or "
                              f"null) and match_rule one of {', '.join(LORA_MATCH_RULES)}")
        budget = ssft_trainable_parameters(ctx)
        per_rank = expected_lora_parameters(ctx.adapter.model, dataclasses.replace(settings, rank=1))
        rank = matched_lora_rank(per_rank, budget, rule)
        settings = dataclasses.replace(settings, rank=rank)
        log.info("adapt %s: lora rank %d (%s trainable parameters, %s per rank) for ssft's %s (adapt.lora.match_rule: "
                 "%s; alpha %g)", ctx.options.lang, rank, f"{rank * per_rank:,}", f"{per_rank:,}", f"{budget:,}", rule,
                 settings.alpha)
    return LoRATraining(settings)


def not_run_reason(name: str, ctx: AdaptContext) -> str | None:
    """Why method ``name`` is not trained for the target, or None: an expert-set method whose set is
    empty in every adapted layer would train the routers alone, which is no method of the paper (a set
    empty in some layers only trains the others, and the runs table records it per layer)."""
    from moelang.routing_metrics import empty_everywhere, set_setting

    if name in ("aeft", "full-ft", "lora"):
        return None
    sets = ctx.expert_set(name)
    if not empty_everywhere({str(layer): ids for layer, ids in sets.items()}):
        return None
    return (f"its expert set is empty in every adapted layer ({', '.join(map(str, ctx.layers))}) of "
            f"results/routing/selected_experts.json; {set_setting(name)} decides the set")


LORA_MATCH_RULES = ("at_least", "nearest")


def ssft_trainable_parameters(ctx: AdaptContext) -> int:
    """What the ``ssft`` run of ``ctx``'s target trains, counted from the start model's tensor shapes
    (no copy of the model): in each adapted layer, its chosen experts' tensors and the whole router,
    as :class:`~moelang.models.methods.ExpertSubset` trains them."""
    sets = ctx.expert_set("ssft")
    total = 0
    for index in ctx.layers:
        layer = ctx.adapter.moe_layer(index)
        tensors = sum(getattr(layer.experts, n).numel() for n in layer.expert_tensor_names(ctx.adapter.spec))
        total += tensors // layer.num_experts * len(set(sets[index]))
        total += sum(p.numel() for p in layer.router.parameters())
    return total


def matched_lora_rank(per_rank: int, budget: int, rule: str) -> int:
    """The LoRA rank for a budget of ``budget`` trainable parameters when each unit of rank costs
    ``per_rank`` (LoRA's count is linear in the rank): ``at_least``, the smallest rank whose count is
    >= the budget; ``nearest``, the rank whose count is closest to it (ties to the larger). At least 1."""
    at_least = max(1, math.ceil(budget / per_rank))
    if rule == "at_least" or at_least == 1:
        return at_least
    below = at_least - 1
    return below if budget - below * per_rank < at_least * per_rank - budget else at_least


FULL_FT_RECIPES = ("authors", "expert_methods")


def full_ft_settings(train, spec: dict | None):
    """The ``full-ft`` runs' settings: ``train`` (a run's :class:`~moelang.options.TrainSettings`) with
    ``spec`` (``adapt.full_ft``; keys left out take the authors' values) applied. ``recipe:
    expert_methods`` leaves ``train`` as it is; ``authors`` sets the load-balancing and z-loss weights,
    weight decay on every parameter (``weight_decay_all``: the 1-D norms and biases too; the
    embeddings are matrices and always decayed) and the warm-up: linear from ``warmup_start_ratio`` x
    lr over ``warmup_steps`` (null: every step, so the rate reaches lr at the last step and never
    decays, as the authors' run, which ended inside the CPT's warm-up)."""
    from moelang.options import FULL_FT_AUTHORS

    spec = dict(FULL_FT_AUTHORS) | dict(spec or {})
    unknown = sorted(set(spec) - set(FULL_FT_AUTHORS))
    if unknown:
        raise ConfigError(f"config key 'adapt.full_ft': unknown keys {unknown}; use {', '.join(FULL_FT_AUTHORS)}")
    if spec["recipe"] not in FULL_FT_RECIPES:
        raise ConfigError(f"config key 'adapt.full_ft.recipe': {spec['recipe']!r}; use one of {', '.join(FULL_FT_RECIPES)}")
    if spec["recipe"] == "expert_methods":
        return train
    warmup = train.steps if spec["warmup_steps"] is None else int(spec["warmup_steps"])
    if not 0 <= warmup <= train.steps or not 0 <= spec["warmup_start_ratio"] <= 1:
        raise ConfigError(f"config key 'adapt.full_ft': warmup_steps {spec['warmup_steps']} and warmup_start_ratio "
                          f"{spec['warmup_start_ratio']}; give 0..adapt.train.steps ({train.steps}, or null: the whole "
                          f"run) and a ratio from 0 to 1")
    return train.replace(aux_loss_coef=float(spec["aux_loss_coef"]), z_loss_coef=float(spec["z_loss_coef"]),
                         decay_norms_and_biases=bool(spec["weight_decay_all"]), warmup_steps=warmup,
                         warmup_start_ratio=float(spec["warmup_start_ratio"]))


def trained_experts(name: str, ctx: AdaptContext) -> list[int]:
    """Experts trained in each adapted layer (for the runs table)."""
    counts = ctx.adapter.experts_per_layer
    if name in ("aeft", "full-ft", "lora"):
        return [counts[layer] for layer in ctx.layers]
    sets = ctx.expert_set(name)
    return [len(sets[layer]) for layer in ctx.layers]


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def final_moe_layers(adapter, k: int) -> list[int]:
    layers = sorted(adapter.experts_per_layer)
    if k > len(layers):
        raise MoelangError(f"config key 'routing.final_layers': {k} adapted layers, the start model has "
                           f"{len(layers)} MoE layers; use at most {len(layers)}")
    return layers[-k:]


def read_expert_sets(selected_path: str | Path, lang: str) -> dict[str, dict[str, list[int]]]:
    selected = json.loads(Path(selected_path).read_text(encoding="utf-8"))
    if lang not in selected:
        raise MoelangError(f"adapt: '{lang}' has no selected experts in {selected_path} (its parent has no routing "
                           f"profile, or the corpus dropped it); remove it from adapt.targets")
    return selected[lang]


def run_dirs(out_root: str | Path, lang: str, methods: list[str], learning_rates: list[float]) -> dict[tuple, Path]:
    return {(m, lr): Path(out_root) / lang / m / lr_name(lr) for m in methods for lr in learning_rates}


def adapt_target(token_file: str | Path, selected_path: str | Path, options: AdaptOptions | dict,
                 out_root: str | Path, state_root: str | Path) -> list[dict]:
    """Train every (method, learning rate) of ``options`` on ``options.lang``; write each run's
    directory under ``out_root/{lang}/{method}/lr-{lr}`` (see the module docstring). A run whose
    export is already staged in its state (a job killed after it) is not trained again."""
    options = AdaptOptions.coerce(options)
    from transformers import AutoTokenizer

    from moelang.models import ModelAdapter, load_model
    from moelang.train import exclusive_state

    lang = options.lang
    for name in options.methods:
        method_builder(name)  # an unknown method stops before anything loads
    if "full-ft" in options.methods:
        full_ft_settings(options.train, options.full_ft)  # so does a bad adapt.full_ft
    expert_sets = read_expert_sets(selected_path, lang)
    state_root = Path(state_root) / lang
    state_root.mkdir(parents=True, exist_ok=True)
    with exclusive_state(state_root / "job"):
        tokenizer = AutoTokenizer.from_pretrained(options.ref, revision=options.revision,
                                                  trust_remote_code=options.trust_remote_code)
        start = load_model(options.ref, revision=options.revision, dtype=options.dtype, device="cpu",
                           trust_remote_code=options.trust_remote_code)
        adapter = ModelAdapter(start)
        if not adapter.is_moe:
            raise MoelangError(f"adapt: the start model '{options.start}' has no MoE layers; expert fine-tuning needs "
                               f"an MoE model (adapt.start_model)")
        ctx = AdaptContext(adapter=adapter, layers=final_moe_layers(adapter, options.final_layers),
                           expert_sets=expert_sets, options=options)
        not_run = {name: reason for name in options.methods if (reason := not_run_reason(name, ctx))}
        methods = {name: method_builder(name)(ctx) for name in options.methods
                   if name not in not_run}  # checks every set first
        for name, reason in not_run.items():
            _write_not_run(out_root, ctx, name, reason)
        runs = [(name, lr) for name in methods for lr in options.learning_rates]
        log.info("adapt %s: %d runs (%s x lr %s) from %s, layers %s", lang, len(runs), ", ".join(methods) or "none",
                 ", ".join(f"{lr:g}" for lr in options.learning_rates), options.start, ctx.layers)
        _train_runs(start, tokenizer, token_file, ctx, methods, runs, state_root)
        results = []
        for name, lr in runs:
            staged = _staged(state_root, name, lr)
            results.append(json.loads((staged / PERPLEXITY_FILE).read_text()))
        from moelang.train import publish

        if options.keep_models == "selected":
            _drop_unselected_weights(lang, runs, results, state_root)
        for name, lr in runs:
            publish(_run_state(state_root, name, lr), {"model": Path(out_root) / lang / name / lr_name(lr)})
        for name in methods:
            for leftover in sorted((state_root / name).glob("*.lock")):  # the published runs' locks
                leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (state_root / name).rmdir()
    return results


def _drop_unselected_weights(lang: str, runs: list[tuple[str, float]], results: list[dict], state_root: Path) -> None:
    """``adapt.keep_models: selected``: the weights of every run but each method's selected one (by
    :func:`select_runs`, the selection job's rule, on this job's runs: a job holds all rates of its
    methods) are deleted from the staged exports before they are published; the run keeps its record,
    log and perplexities, and says so in :data:`WEIGHTS_NOT_KEPT_FILE`."""
    table = pl.DataFrame({"lang": [lang] * len(runs), "method": [name for name, _ in runs],
                          "lr": [float(lr) for _, lr in runs],
                          "dev_perplexity": [float(r["dev"]["perplexity"]) for r in results]})
    selected = select_runs(table)
    for (name, lr), keep in zip(runs, selected["selected"]):
        staged = _staged(state_root, name, lr)
        if keep or (staged / WEIGHTS_NOT_KEPT_FILE).is_file():
            continue
        chosen = selected.filter(pl.col("selected") & (pl.col("method") == name))["lr"].to_list()
        write_json({"reason": f"adapt.keep_models: selected; {name} selects lr {chosen[0]:g} by dev perplexity"},
                   staged / WEIGHTS_NOT_KEPT_FILE)
        for weights in [*staged.glob("*.safetensors"), *staged.glob("*.safetensors.index.json")]:
            weights.unlink()
        log.info("adapt %s: %s lr %g: weights not kept (adapt.keep_models: selected)", lang, name, lr)


def _write_not_run(out_root: str | Path, ctx: AdaptContext, name: str, reason: str) -> None:
    """The run directories of a method that is not trained: each holds :data:`NOT_RUN_FILE` alone (no
    model), which the selection records as not run and the workflow does not evaluate."""
    options = ctx.options
    log.warning("adapt %s: %s is not trained: %s", options.lang, name, reason)
    for lr in options.learning_rates:
        record = {"lang": options.lang, "method": name, "lr": lr, "layers": ctx.layers,
                  "experts_per_layer": trained_experts(name, ctx), "reason": reason}
        with atomic_dir(Path(out_root) / options.lang / name / lr_name(lr)) as tmp:
            write_json(record, tmp / NOT_RUN_FILE)


def _run_state(state_root: Path, name: str, lr: float) -> Path:
    return state_root / name / lr_name(lr)


def _staged(state_root: Path, name: str, lr: float) -> Path:
    from moelang.train import staged_path

    return staged_path(_run_state(state_root, name, lr), "model")


def _finished(staged: Path) -> bool:
    return (staged / PERPLEXITY_FILE).is_file()


def _train_runs(start, tokenizer, token_file, ctx: AdaptContext, methods: dict, runs: list[tuple[str, float]],
                state_root: Path) -> None:
    """Train the runs not finished yet: those that may share the frozen pass together (when the
    options say so and :mod:`moelang.sweep` is there), the others one by one."""
    from moelang.train import PackedStream

    options = ctx.options
    todo = [(name, lr) for name, lr in runs if not _finished(_staged(state_root, name, lr))]
    for name, lr in runs:
        if (name, lr) not in todo:
            log.info("adapt %s: %s lr %g already trained (staged in %s)", options.lang, name, lr,
                     _run_state(state_root, name, lr))
    settings = {run: options.train.replace(lr=run[1], seed=options.seed, mixture={options.lang: 1.0}) for run in todo}
    settings = {run: full_ft_settings(value, options.full_ft) if run[0] == "full-ft" else value
                for run, value in settings.items()}

    def stream():
        first = next(iter(settings.values()))
        return PackedStream({options.lang: token_file}, {options.lang: 1.0}, first.seq_len, tokenizer.eos_token_id,
                            options.seed)

    shared = [run for run in todo if options.share_frozen_pass and trains_final_layers_only(run[0])]
    alone = [run for run in todo if run not in shared]
    size = options.sweep_group_size or len(shared) or 1
    groups = [shared[i:i + size] for i in range(0, len(shared), size)]
    for group in groups:
        if len(group) < 2 or not _sweep_available():
            alone = group + alone
            continue
        from moelang.sweep import SweepRun, train_sweep

        sweep_runs = []
        for name, lr in group:
            sweep_runs.append(SweepRun(settings=settings[(name, lr)], method=copy.deepcopy(methods[name]),
                                       state_dir=_run_state(state_root, name, lr),
                                       export_steps=_exports(tokenizer, state_root, name, lr, settings[(name, lr)]),
                                       inputs=_inputs(options, name)))
        log.info("adapt %s: %d runs share one pass of the layers below %d", options.lang, len(group), ctx.layers[0])
        results = train_sweep(start, stream(), sweep_runs)
        for (name, lr), result in zip(group, results):
            _finish_run(result, ctx, name, lr, settings[(name, lr)], state_root, token_file, tokenizer)
    for name, lr in alone:
        from moelang.train import train

        model = copy.deepcopy(start)
        result = train(model, stream(), settings[(name, lr)], _run_state(state_root, name, lr),
                       inputs=_inputs(options, name), method=copy.deepcopy(methods[name]),
                       export_steps=_exports(tokenizer, state_root, name, lr, settings[(name, lr)]))
        _finish_run(result, ctx, name, lr, settings[(name, lr)], state_root, token_file, tokenizer)
        del model


def _sweep_available() -> bool:
    try:
        import moelang.sweep  # noqa: F401
    except ImportError:
        return False
    return True


def _inputs(options: AdaptOptions, name: str) -> dict[str, str]:
    """What else a run's training state depends on (the engine fingerprints weights, data and method)."""
    return {"start model": f"{options.start} ({options.ref})", "adaptation method": name,
            "lora": json.dumps(options.lora, sort_keys=True) if name == "lora" else ""}


def _exports(tokenizer, state_root: Path, name: str, lr: float, settings) -> dict:
    from moelang.train import export_model

    staged = _staged(state_root, name, lr)
    return {settings.steps: lambda m, sd: export_model(m, tokenizer, staged, state_dict=sd)}


def _finish_run(result, ctx: AdaptContext, name: str, lr: float, settings, state_root: Path, token_file,
                tokenizer) -> None:
    """After a run: its log, run record and dev and test perplexity on the target, staged with its model."""
    from moelang.models import load_model
    from moelang.models.loading import resolve_device
    from moelang.options import EvaluationOptions
    from moelang.perplexity import perplexity
    from moelang.registry import write_run_record
    from moelang.splits import DEV, TEST

    staged = _staged(state_root, name, lr)
    write_table(result.log_table(), staged / "train_log.parquet")
    write_run_record(staged, name, result.parameters, settings.steps, result.tokens_at(settings.steps))
    # measured on the exported model, as the evaluation stage will load it
    model = load_model(staged, dtype=ctx.options.dtype, device=resolve_device(ctx.options.device)).eval()
    heldout = EvaluationOptions(**ctx.options.heldout)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # Dev selects the rate; test (disjoint documents) is what is reported. Both are measured on every run:
    # a pass over tokens_per_language tokens is small next to training.
    measured = {split: perplexity(model, token_file, eos, heldout, split) for split in (DEV, TEST)}
    record = {"lang": ctx.options.lang, "method": name, "lr": lr, "layers": ctx.layers,
              "experts_per_layer": trained_experts(name, ctx), "final_loss": result.final_loss, **measured}
    write_json(record, staged / PERPLEXITY_FILE)  # last: its presence marks the run finished
    log.info("adapt %s: %s lr %g: loss %.3f, perplexity dev %.2f test %.2f, %s trainable (%.3f%%)", ctx.options.lang,
             name, lr, result.final_loss, measured[DEV]["perplexity"], measured[TEST]["perplexity"],
             f"{result.parameters['trainable']:,}", 100 * result.parameters["trainable_fraction"])


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

def runs_table(run_dirs: list[str | Path]) -> pl.DataFrame:
    """One row per run directory (:data:`RUNS_SCHEMA`), ``selected`` set by :func:`select_runs`."""
    from moelang.registry import read_run_record

    rows = []
    for directory in map(Path, run_dirs):
        if (directory / NOT_RUN_FILE).is_file():
            rows.append(_not_run_row(directory))
            continue
        result_file = directory / PERPLEXITY_FILE
        if not result_file.is_file():
            raise MoelangError(f"adapt: '{directory}' has no {PERPLEXITY_FILE}; it is not a finished adaptation run "
                               f"(rerun the adapt job)")
        measured = json.loads(result_file.read_text(encoding="utf-8"))
        record = read_run_record(directory)
        if record is None:
            raise MoelangError(f"adapt: '{directory}' has no run record; rerun the adapt job")
        rows.append({"lang": measured["lang"], "method": measured["method"], "lr": float(measured["lr"]),
                     "layers": measured["layers"], "experts_per_layer": measured["experts_per_layer"],
                     "trainable_params": record["trainable_parameters"], "total_params": record["total_parameters"],
                     "trainable_fraction": record["trainable_fraction"], "steps": record["steps"],
                     "tokens": record["tokens"], "final_loss": measured["final_loss"],
                     "dev_perplexity": measured["dev"]["perplexity"],
                     "test_perplexity": measured["test"]["perplexity"], "selected": False, "trained": True,
                     "not_run_reason": None})
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=RUNS_SCHEMA))


def _not_run_row(directory: Path) -> dict:
    """The runs-table row of a method that was not trained (:data:`NOT_RUN_FILE`): what was measured
    is null, the adapted layers and the (empty) experts per layer are kept."""
    record = json.loads((directory / NOT_RUN_FILE).read_text(encoding="utf-8"))
    return {"lang": record["lang"], "method": record["method"], "lr": float(record["lr"]), "layers": record["layers"],
            "experts_per_layer": record["experts_per_layer"], "trainable_params": None, "total_params": None,
            "trainable_fraction": None, "steps": None, "tokens": None, "final_loss": None,
            "dev_perplexity": None, "test_perplexity": None, "selected": False, "trained": False,
            "not_run_reason": record["reason"]}


def select_runs(table: pl.DataFrame) -> pl.DataFrame:
    """Mark, per (lang, method), the run with the lowest dev perplexity (ties: the smaller rate; a
    non-finite perplexity is never chosen over a finite one). The test perplexity plays no part. A run that
    was not trained (``trained`` false) is never selected."""
    ranked = table.with_columns(
        pl.when(pl.col("dev_perplexity").is_finite()).then(pl.col("dev_perplexity"))
        .otherwise(float("inf")).alias("_ppl"))
    if "trained" in table.columns:
        ranked = ranked.filter(pl.col("trained"))
    best = ranked.sort(["lang", "method", "_ppl", "lr"]).group_by(["lang", "method"], maintain_order=True).first()
    chosen = set(zip(best["lang"], best["method"], best["lr"]))
    return table.with_columns(
        pl.Series("selected", [(l, m, lr) in chosen for l, m, lr in zip(table["lang"], table["method"], table["lr"])]))


# Snakemake's marker in a directory output: the directory's modification time. Never hard-linked: the
# link would share it with the source run, and Snakemake touching selected/'s marker would make the run
# (this job's input) newer than the job's output (a failed job, or a rerun on the next invocation).
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"


def _link_tree(source: Path, dest: Path) -> None:
    """``dest`` as a tree of hard links to ``source``'s files (a copy where links cannot be made),
    Snakemake's timestamp marker left out."""
    from moelang.train import _link_or_copy

    for path in sorted(p for p in source.rglob("*") if p.is_file() and p.name != SNAKEMAKE_TIMESTAMP):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path, target)


def select_target(lang: str, method_dirs: dict[str, list[str | Path]], out_table: str | Path,
                  selected_root: str | Path) -> pl.DataFrame:
    """The selection job of one target: ``runs.parquet`` of its runs and, per method,
    ``{selected_root}/{method}/selected`` holding the chosen run's files."""
    runs = [d for dirs in method_dirs.values() for d in dirs]
    table = select_runs(runs_table(runs))
    if set(table["lang"]) - {lang}:
        raise MoelangError(f"adapt selection: runs of {sorted(set(table['lang']) - {lang})} given for '{lang}'")
    for row in table.filter(pl.col("selected")).iter_rows(named=True):
        source = Path(selected_root) / row["method"] / lr_name(row["lr"])
        with atomic_dir(Path(selected_root) / row["method"] / SELECTED_DIR) as tmp:
            _link_tree(source, tmp)
        log.info("adapt %s: %s selects lr %g (dev perplexity %.2f; reported: test perplexity %.2f)", lang,
                 row["method"], row["lr"], row["dev_perplexity"], row["test_perplexity"])
    not_run = table.filter(~pl.col("trained")).group_by("method", maintain_order=True).first()
    for row in not_run.iter_rows(named=True):  # selected/ holds the marker alone: no model to evaluate
        source = Path(selected_root) / row["method"] / lr_name(row["lr"])  # its NOT_RUN_FILE alone
        with atomic_dir(Path(selected_root) / row["method"] / SELECTED_DIR) as tmp:
            _link_tree(source, tmp)
        log.info("adapt %s: %s was not trained (%s)", lang, row["method"], row["not_run_reason"])
    write_table(table.to_arrow().cast(RUNS_SCHEMA), out_table)
    return table


def not_trained(runs_path: str | Path) -> dict[str, str]:
    """method -> why, for the methods of a target's ``runs.parquet`` that were not trained: the
    workflow evaluates the others only."""
    table = pl.read_parquet(runs_path, columns=["method", "trained", "not_run_reason"])
    return {m: r for m, r in table.filter(~pl.col("trained")).select("method", "not_run_reason").unique(
        "method", maintain_order=True).iter_rows()}


def gather_runs(tables: list[str | Path], out_table: str | Path) -> pl.DataFrame:
    """``results/adapt/runs.parquet``: every target's runs table."""
    parts = [pl.read_parquet(t) for t in tables]
    table = pl.concat(parts) if parts else pl.from_arrow(RUNS_SCHEMA.empty_table())
    write_table(table.to_arrow().cast(RUNS_SCHEMA), out_table)
    return table

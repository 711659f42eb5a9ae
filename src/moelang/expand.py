"""Stage: LayerMoE expansion (paper B), one variant at a time, in three steps.

A *variant* (``expand.variants``) is an allocation plan (``results/allocation/plan.json``: the new
experts per layer and the classifier layers of a method: ``layermoe``, ``uniform`` (MoE-LPR),
``mola``, ``routing``) and whether stage 2 adds router classifiers.

1. **expand** (:func:`expand_variant`): the model the plan was made on grows by the plan's new
   experts (:func:`moelang.models.layermoe.build.expand_model`): a dense base is upcycled (the FFN
   stays as expert 0, the new experts are its copies, the new router is xavier-normal); an MoE base's
   new experts copy its parent languages' most-used experts of that layer (the routing profile of the
   start model, summed over the parents of the new languages; ``init: random`` copies random
   experts). The result is a ``layermoe_<family>`` transformers model, saved with its tokenizer and
   ``expansion.json``. With ``admit_steps`` (ours) it is saved with the new experts' softmax mass at
   0, so it computes exactly what the start model computes (a grown MoE's copied router rows would
   otherwise tie with their sources), and stage 1 raises the mass to full over its first
   ``admit_steps`` steps (:mod:`moelang.models.layermoe.admission`).
2. **stage 1** (:func:`train_stage`, ``stage=1``): the new experts and the routers of the expanded
   layers train on the new languages (equal mixture), LM loss + ``stage1.aux_loss_coef`` x load
   balancing (each layer with its own expert count). The original experts, attention, norms and
   embeddings stay bit-identical.
3. **stage 2** (``stage=2``): with ``classifier``, router classifiers go on the plan's classifier
   layers; then only routers and classifiers train, on the new languages plus a replay of the old
   ones (``replay_fraction`` of the sequences), with the loss of :func:`stage2_loss`: LM +
   ``lpr_weight`` x routing prior + ``classifier_weight`` x classifier cross-entropy, no balance loss.

Variants whose plans give the same new experts per layer share steps 1 and 2, and those that also
have the same classifier setting share step 3 (:func:`shared_training`; the workflow trains each once,
under the first such variant's name, and evaluates each distinct model once). Every training
step runs through the one engine (:func:`moelang.train.train`): resumable, bit-identical on resume,
each loss term a column of the train log.

Routing prior (MoE-LPR's loss, generalised from "expert 0" to "the layer's original experts"): over
the tokens of old-language sequences, in every expanded layer, the cross-entropy of the original
experts as the target class, ``-log(sum_{e original} q_e / sum_e q_e)``; averaged over (layer,
token). ``lpr_form: probabilities`` (the authors' code): ``q = exp(softmax(logits))``, a double
softmax (for a dense base: ``-P_0 + log sum_j exp P_j``); ``lpr_form: logits``: ``q = exp(logits)``,
the plain cross-entropy on the router logits.

Outputs
-------
``results/expand/{variant}/stage0|stage1|stage2/``
    the model (safetensors, ``config.json`` of ``layermoe_<family>``), its tokenizer,
    ``expansion.json`` (what was expanded, how; the plan), ``expand_run.json`` (trained stages: the
    stage's trainable parameters and final losses, and those of the stages before),
    ``train_log.parquet`` (trained stages, :data:`moelang.train.LOG_SCHEMA` plus the loss terms) and
    the registry's run record.
``results/expand/runs.parquet`` (:func:`gather_runs`), one row per variant, :data:`RUNS_SCHEMA`:
    ``variant``, ``plan``, ``base`` (the model expanded), ``trained_as`` (the variant whose stage-2
    model it is: itself, or the earlier variant it shares the model with), ``classifier`` bool,
    ``experts_per_layer`` list<int32>, ``new_experts`` int64, ``classifier_layers`` list<int32>, ``total_params`` int64,
    ``stage1_trainable_params`` / ``stage2_trainable_params`` int64, ``stage1_trainable_fraction`` /
    ``stage2_trainable_fraction`` float64, ``stage1_loss`` / ``stage1_aux_loss`` (last step),
    ``stage2_loss``, ``stage2_lpr_loss``, ``stage2_classifier_loss``, ``stage2_classifier_accuracy``
    float64 (the last training step; NaN where a term does not exist); for variants with a classifier
    (null otherwise): ``classifier_pooling`` / ``classifier_decision`` string (how it read and decided),
    ``classifier_heldout_accuracy`` list<float64> (one per entry of ``classifier_layers``: its
    accuracy on the test split of the old and new languages, :func:`classifier_heldout_accuracy`),
    ``classifier_majority_baseline`` float64 (always answering the larger class on those sequences)
    and ``classifier_heldout_sequences`` int64.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, write_json, write_table
from moelang.options import ExpandOptions
from moelang.splits import TEST

EXPANSION_FILE = "expansion.json"
RUN_FILE = "expand_run.json"
# Files of a stage's directory that record how it was made, not what it is (the train log's
# tokens_per_s differs on every run): left out of the fingerprint of the model the next stage starts from.
RECORD_FILES = ("train_log.parquet", RUN_FILE, "moelang_run.json")
LPR_FORMS = ("probabilities", "logits")
INITS = ("most_used", "random")

RUNS_SCHEMA = pa.schema([
    ("variant", pa.string()),
    ("plan", pa.string()),
    ("base", pa.string()),
    ("trained_as", pa.string()),
    ("classifier", pa.bool_()),
    ("experts_per_layer", pa.list_(pa.int32())),
    ("new_experts", pa.int64()),
    ("classifier_layers", pa.list_(pa.int32())),
    ("total_params", pa.int64()),
    ("stage1_trainable_params", pa.int64()),
    ("stage1_trainable_fraction", pa.float64()),
    ("stage2_trainable_params", pa.int64()),
    ("stage2_trainable_fraction", pa.float64()),
    ("stage1_loss", pa.float64()),
    ("stage1_aux_loss", pa.float64()),
    ("stage2_loss", pa.float64()),
    ("stage2_lpr_loss", pa.float64()),
    ("stage2_classifier_loss", pa.float64()),
    ("stage2_classifier_accuracy", pa.float64()),
    ("classifier_pooling", pa.string()),
    ("classifier_decision", pa.string()),
    ("classifier_heldout_accuracy", pa.list_(pa.float64())),
    ("classifier_majority_baseline", pa.float64()),
    ("classifier_heldout_sequences", pa.int64()),
])


# --------------------------------------------------------------------------------------------------
# The plan and the profile
# --------------------------------------------------------------------------------------------------

def read_plan(plan_path: str | Path, method: str) -> dict:
    """The ``method`` entry of ``plan.json``, checked; one line naming what is wrong otherwise."""
    path = Path(plan_path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoelangError(f"expansion: cannot read the allocation plan '{path}' ({type(exc).__name__}); run the "
                           f"allocation stage (`moelang allocate`) first") from None
    if method not in plan:
        failed = plan.get("_meta", {}).get("failed", {})
        why = f" (the allocation left it out: {failed[method]})" if method in failed else ""
        methods = ", ".join(k for k in plan if not k.startswith("_"))
        raise MoelangError(f"expansion: the plan '{path}' has no method '{method}'{why}; its methods: {methods}; "
                           f"change the variant's plan (expand.variants) or the allocation")
    entry = plan[method]
    new = entry.get("new_experts_per_layer")
    if not isinstance(new, list) or any(not isinstance(n, int) or n < 0 for n in new):
        raise MoelangError(f"expansion: plan '{path}' method '{method}' has no valid new_experts_per_layer; remake it "
                           f"with the allocation stage")
    return entry


def shared_training(variants: dict[str, dict], plan: dict) -> dict[str, dict[str, str]]:
    """Which variants train the same model, from the allocation's ``plan`` (``plan.json`` read) and
    ``variants`` (``expand.variants``: name -> {plan, classifier}, in config order): variant ->
    ``{"stage1": the variant whose stage 0 and stage 1 it uses, "model": the variant whose stage-2
    model it is}``, each the first variant in config order with the same key. Stage 0 and 1 depend on
    the plan's new experts per layer alone; stage 2 also on the classifier (and, with one, on the
    plan's classifier layers). Different plan methods can give the same numbers (a budget of one new
    expert per layer makes every plan all ones), so the key is the numbers, not the method's name.
    A variant whose method is not in the plan (the allocation left it out) shares nothing: its own
    jobs stop with :func:`read_plan`'s message."""
    def numbers(variant: dict) -> tuple:
        entry = plan.get(variant["plan"])
        new = entry.get("new_experts_per_layer") if isinstance(entry, dict) else None
        return ("plan", tuple(new)) if isinstance(new, list) else ("no plan", variant["plan"])

    def model_key(variant: dict) -> tuple:
        entry = plan.get(variant["plan"])
        layers = (entry.get("classifier_layers") or []) if variant["classifier"] and isinstance(entry, dict) else []
        return numbers(variant), bool(variant["classifier"]), tuple(layers)

    stage1_owner: dict[tuple, str] = {}
    model_owner: dict[tuple, str] = {}
    return {name: {"stage1": stage1_owner.setdefault(numbers(v), name),
                   "model": model_owner.setdefault(model_key(v), name)} for name, v in variants.items()}


def coinciding_variants(sharing: dict[str, dict[str, str]]) -> list[list[str]]:
    """The groups of variants (two or more, the owner first) that share one trained model."""
    groups: dict[str, list[str]] = {}
    for name, shared in sharing.items():
        groups.setdefault(shared["model"], []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def sharing_note(sharing: dict[str, dict[str, str]], plan: dict, variants: dict[str, dict]) -> str | None:
    """One line naming the variants whose plans and classifier setting coincide (None if none do)."""
    groups = coinciding_variants(sharing)
    if not groups:
        return None
    parts = []
    for names in groups:
        new = (plan.get(variants[names[0]]["plan"]) or {}).get("new_experts_per_layer")
        parts.append(f"{', '.join(names)} (new experts per layer {new}, classifier "
                     f"{'yes' if variants[names[0]]['classifier'] else 'no'}: trained once as {names[0]})")
    return ("expansion variants with identical plans share one trained and evaluated model: " + "; ".join(parts)
            + "; they are one model in the results, not a comparison (change allocation.new_experts or "
              "expand.variants to compare different plans)")


def forced_plan(new_experts: int | None, layers: int | None, uniform_per_layer: int | None) -> dict | None:
    """The plans a budget forces before the allocation has run (``plan.json``'s shape, for
    :func:`shared_training`): ``allocation.new_experts`` equal to the layer count gives every method one
    new expert per layer (each gives every layer at least one; fewer is rejected), and, with them all
    alike, the same classifier layers; ``uniform`` with ``uniform_per_layer`` has its own budget. None
    when the budget forces nothing, or the layer count is not known before a model is read."""
    if not new_experts or new_experts != layers:
        return None
    from moelang.allocation import METHODS

    ones = {"new_experts_per_layer": [1] * layers, "classifier_layers": []}
    plan = {method: ones for method in METHODS}
    if uniform_per_layer:
        plan["uniform"] = {"new_experts_per_layer": [uniform_per_layer] * layers, "classifier_layers": []}
    return plan


def parent_expert_counts(profile_dir: str | Path, parents: list[str]) -> dict[int, np.ndarray]:
    """Per layer, how often the ``parents``' dev-split tokens used each expert (summed over the
    parents), from a routing profile directory (``results/routing/{model}``)."""
    frames = []
    for lang in sorted(set(parents)):
        path = Path(profile_dir) / f"{lang}.parquet"
        if not path.is_file():
            raise MoelangError(f"expansion: the routing profile '{path}' of parent language '{lang}' does not exist; "
                               f"profile the start model first, or set expand.init: random")
        frames.append(pl.read_parquet(path, columns=["layer", "expert", "count"]))
    table = pl.concat(frames).group_by(["layer", "expert"]).agg(pl.col("count").sum()).sort(["layer", "expert"])
    counts: dict[int, np.ndarray] = {}
    for layer, part in table.group_by("layer", maintain_order=True):
        size = int(part["expert"].max()) + 1
        array = np.zeros(size)
        array[part["expert"].to_numpy()] = part["count"].to_numpy()
        counts[int(layer[0])] = array
    return counts


# --------------------------------------------------------------------------------------------------
# Step 1: expand
# --------------------------------------------------------------------------------------------------

def check_options(options: ExpandOptions) -> None:
    if options.init not in INITS:
        raise MoelangError(f"expansion option init: '{options.init}'; use one of {', '.join(INITS)}")
    if options.lpr_form not in LPR_FORMS:
        raise MoelangError(f"expansion option lpr_form: '{options.lpr_form}'; use one of {', '.join(LPR_FORMS)}")
    if not 0 <= options.replay_fraction < 1:
        raise MoelangError(f"expansion option replay_fraction: {options.replay_fraction}; choose in [0, 1)")
    if not options.new:
        raise MoelangError("expansion: no new language; set allocation.new (or keep a target language)")
    if not 0 <= options.admit_steps <= options.stage1.steps:
        raise MoelangError(f"expansion option admit_steps: {options.admit_steps}; admit the new experts within stage 1 "
                           f"(0 to {options.stage1.steps} steps, stage1.steps), or raise stage1.steps")
    for name in ("aux_loss_coef", "z_loss_coef"):
        if getattr(options.stage2, name):
            raise MoelangError(f"expansion option stage2.{name}: {getattr(options.stage2, name)}; stage 2 trains "
                               f"with the LM, routing-prior and classifier losses only (no balance or z-loss): set 0")


def expand_variant(options: ExpandOptions | dict, plan_path: str | Path, out_dir: str | Path,
                   profile_dir: str | Path | None = None) -> dict:
    """Step 1: the start model grown by the variant's plan, saved to ``out_dir`` (see the module
    docstring). Returns the expansion record."""
    options = ExpandOptions.coerce(options)
    check_options(options)
    entry = read_plan(plan_path, options.plan)  # a bad plan stops before the model loads
    from transformers import AutoTokenizer

    from moelang.models import load_model
    from moelang.models.layermoe.build import expand_model, expansion_family, most_used_experts
    from moelang.train import export_model

    tokenizer = AutoTokenizer.from_pretrained(options.ref, revision=options.revision,
                                              trust_remote_code=options.trust_remote_code)
    model = load_model(options.ref, revision=options.revision, dtype=options.dtype, device="cpu",
                       trust_remote_code=options.trust_remote_code)
    family, old = expansion_family(model)
    new = entry["new_experts_per_layer"]
    if len(new) != len(old):
        raise MoelangError(f"expansion: the plan '{plan_path}' ({options.plan}) has {len(new)} layers and the model "
                           f"'{options.start}' {len(old)}; make the plan on this model (similarity.model, "
                           f"expand.model)")
    sources = None
    grows = any(n and o > 1 for n, o in zip(new, old))  # a layer with experts to copy from (else: FFN copies)
    if grows and options.init == "most_used":
        if not options.profile_model or profile_dir is None:
            raise MoelangError(f"expansion {options.variant}: init most_used copies the parents' most-used experts "
                               f"from the start model's routing profile, and '{options.start}' has none here "
                               f"(not profiled, or routing.enabled false; by hand: --profile-dir); set "
                               f"expand.init: random")
        parents = [options.parents.get(lang, lang) for lang in options.new]
        usage = parent_expert_counts(profile_dir, parents)
        sources = {i: most_used_experts(usage[i][:old[i]] if i in usage else np.zeros(old[i]), n)
                   for i, n in enumerate(new) if n and old[i] > 1}
        log.info("expansion %s: new experts copy the most-used experts of %s", options.variant,
                 ", ".join(sorted(set(parents))))
    elif grows:
        log.info("expansion %s: new experts copy random existing experts (seed %d)", options.variant, options.seed)
    expanded, record = expand_model(model, new, top_k=options.top_k, sources=sources, noise=options.noise,
                                    seed=options.seed)
    del model
    if options.admit_steps:
        from moelang.models.layermoe.admission import set_new_expert_prior

        set_new_expert_prior(expanded, 0.0)  # stage 1 admits the new experts; until then: the base's output
    record.update(variant=options.variant, plan=options.plan, start=options.start, start_ref=options.ref,
                  init=options.init if grows else "ffn_copies", stage=0, admit_steps=options.admit_steps,
                  plan_classifier_layers=list(entry.get("classifier_layers") or []))
    log.info("expansion %s (%s plan): %d new experts, experts per layer %s", options.variant, options.plan,
             record["new_experts"], record["experts_per_layer"])
    export_model(expanded, tokenizer, out_dir,
                 extra_files={EXPANSION_FILE: lambda path: path.write_text(json.dumps(record, indent=1) + "\n")})
    return record


# --------------------------------------------------------------------------------------------------
# Steps 2 and 3: training
# --------------------------------------------------------------------------------------------------

def _routing_prior(router_logits, originals: list[int], token_old, form: str):
    import torch

    terms = []
    for logits, n_orig in zip(router_logits, originals):
        if n_orig is None:
            continue
        chosen = logits[token_old].float()
        scores = torch.softmax(chosen, dim=-1) if form == "probabilities" else chosen
        terms.append(torch.logsumexp(scores, dim=-1) - torch.logsumexp(scores[:, :n_orig], dim=-1))
    return torch.cat(terms).mean()


def stage2_loss(old_languages: list[str], originals: list[int], options: ExpandOptions):
    """Stage 2's loss (see the module docstring): ``loss_fn(model, batch, outputs, langs)`` for the
    engine; it asks the model for router and classifier logits (``config_flags``). ``originals``:
    the original expert count of each MoE layer, in the order of the router logits (None: a layer
    without new experts, left out of the routing prior)."""
    import torch
    import torch.nn.functional as F

    old_set = set(old_languages)

    def loss_fn(model, batch, outputs, langs):
        lm = outputs.loss
        old = torch.tensor([lang in old_set for lang in langs], device=batch.device)
        metrics = {"loss": lm}
        loss = lm
        router_logits = outputs.router_logits or ()
        if options.lpr_weight > 0 and router_logits:
            token_old = old.repeat_interleave(batch.shape[1])
            if bool(token_old.any()):
                lpr = _routing_prior(router_logits, originals, token_old, options.lpr_form)
            else:  # no old-language sequence in this micro-batch: a zero term that keeps the graph
                lpr = router_logits[0].sum() * 0.0
            loss = loss + options.lpr_weight * lpr
            metrics["lpr_loss"] = lpr
        classifier_logits = getattr(outputs, "classifier_logits", None) or ()
        if classifier_logits:
            groups = (~old).long()  # old 0, new 1
            # causal decisions: every position's prefix is classified as its sequence's group (the packed
            # batches have no padding); sequence decisions: one per sequence
            labels = [groups if c.dim() == 2 else groups[:, None].expand(c.shape[:2]) for c in classifier_logits]
            if options.classifier_balance:  # each group present counts equally, whatever the replay share
                sizes = torch.bincount(groups, minlength=2)
                weights = 1.0 / (sizes[groups] * int((sizes > 0).sum()))
            else:
                weights = torch.full((len(langs),), 1.0 / len(langs), device=batch.device)
            cls = torch.stack([(F.cross_entropy(c.float().flatten(0, -2), y.reshape(-1), reduction="none")
                                .view(len(langs), -1).mean(dim=1) * weights).sum()
                               for c, y in zip(classifier_logits, labels)]).mean()
            accuracy = torch.stack([(c.argmax(-1) == y).float().mean()
                                    for c, y in zip(classifier_logits, labels)]).mean()
            loss = loss + options.classifier_weight * cls
            metrics |= {"classifier_loss": cls, "classifier_accuracy": accuracy.detach()}
        return loss, metrics

    loss_fn.config_flags = ("output_router_logits", "output_classifier_logits")
    return loss_fn


def stage_settings(options: ExpandOptions, stage: int, languages: list[str]):
    """The stage's training settings and mixture over ``languages`` (those with token files)."""
    settings = options.stage1 if stage == 1 else options.stage2
    new = list(options.new)
    old = list(options.old) if stage == 2 and options.replay_fraction > 0 else []
    missing = [lang for lang in new if lang not in languages]
    if missing:
        raise MoelangError(f"expansion stage {stage}: no token file of the new language(s) {', '.join(missing)}; "
                           f"pass results/tokens/<lang>.parquet of every new language with --tokens")
    missing = [lang for lang in old if lang not in languages]
    if missing:
        raise MoelangError(f"expansion stage {stage}: replay_fraction {options.replay_fraction} but no token file of "
                           f"the old language(s) {', '.join(missing)}; pass them with --tokens, or set "
                           f"expand.replay_fraction: 0")
    replay = options.replay_fraction if old else 0.0
    mixture = {lang: (1 - replay) / len(new) for lang in new}
    mixture |= {lang: replay / len(old) for lang in old if replay > 0}
    return settings.replace(seed=options.seed, mixture=mixture), mixture


def _finished(staged: Path) -> bool:
    return (staged / RUN_FILE).is_file()


def train_stage(stage: int, options: ExpandOptions | dict, model_dir: str | Path, token_files: dict[str, str | Path],
                out_dir: str | Path, state_dir: str | Path, plan_path: str | Path | None = None) -> dict:
    """Step 2 (``stage=1``) or 3 (``stage=2``) of the variant, from the model in ``model_dir`` (the
    expanded model, or stage 1's), into ``out_dir`` (see the module docstring). Killed and started
    again, it resumes from its last checkpoint in ``state_dir``. Returns the stage's run record."""
    options = ExpandOptions.coerce(options)
    check_options(options)
    if stage not in (1, 2):
        raise MoelangError(f"expansion: stage {stage}; the stages are 1 and 2")
    model_dir = Path(model_dir)
    before = "the expanded model (moelang expand)" if stage == 1 else "the stage-1 model (moelang expand-train --stage 1)"
    if not (model_dir / EXPANSION_FILE).is_file():
        raise MoelangError(f"expansion stage {stage}: '{model_dir}' is not an expanded model (no {EXPANSION_FILE}); "
                           f"give {before}")
    expansion = json.loads((model_dir / EXPANSION_FILE).read_text(encoding="utf-8"))
    if expansion.get("stage") != stage - 1:
        raise MoelangError(f"expansion stage {stage}: '{model_dir}' is the model after stage {expansion.get('stage')}; "
                           f"give {before}")
    classifier_layers: list[int] = []
    if stage == 2 and options.classifier:
        if plan_path is None:
            raise MoelangError("expansion stage 2 with classifiers: pass --plan results/allocation/plan.json")
        classifier_layers = list(read_plan(plan_path, options.plan).get("classifier_layers") or [])
        if not classifier_layers:
            raise MoelangError(f"expansion {options.variant}: classifier: true, but the {options.plan} plan has no "
                               f"classifier layers (allocation.classifier_layers); give the allocation classifier "
                               f"layers, or set the variant's classifier: false (the ablation)")
    settings, mixture = stage_settings(options, stage, list(token_files))
    from moelang.train import publish, staged_path, tree_digest

    state_dir = Path(state_dir)
    staged = staged_path(state_dir, "model")
    # what the staged result was made from: a finished state made from other inputs is trained again
    made_from = {"model": tree_digest(model_dir, skip_suffixes=RECORD_FILES),
                 "options": options.replace(ref="").to_json(),
                 "classifier_layers": classifier_layers, "mixture": mixture}
    if _finished(staged) and json.loads((staged / RUN_FILE).read_text(encoding="utf-8")).get("made_from") != made_from:
        log.warning("expansion %s stage %d: the staged result in %s was made from other inputs; training again",
                    options.variant, stage, state_dir)
        shutil.rmtree(state_dir)
    if not _finished(staged):
        _train(stage, options, model_dir, token_files, settings, mixture, classifier_layers, state_dir, staged,
               made_from)
    else:
        log.info("expansion %s stage %d: already trained (staged in %s)", options.variant, stage, state_dir)
    record = json.loads((staged / RUN_FILE).read_text(encoding="utf-8"))
    publish(state_dir, {"model": Path(out_dir)})
    return record


def _train(stage: int, options: ExpandOptions, model_dir: Path, token_files: dict, settings, mixture: dict,
           classifier_layers: list[int], state_dir: Path, staged: Path, made_from: dict) -> None:
    from transformers import AutoTokenizer

    from moelang.models import ModelAdapter, load_model
    from moelang.models.layermoe.admission import AdmittedExpertSubset
    from moelang.models.layermoe.build import add_classifiers
    from moelang.models.methods import ModuleSubset
    from moelang.registry import write_run_record
    from moelang.train import PackedStream, export_model, train

    expansion = json.loads((model_dir / EXPANSION_FILE).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=options.dtype, device="cpu")
    adapter = ModelAdapter(model)
    layers = [layer for layer in adapter.moe_layers if layer.num_experts > layer.router.num_original]
    loss_fn = None
    if stage == 1:
        method = AdmittedExpertSubset(experts={m.index: list(range(m.router.num_original, m.num_experts))
                                               for m in layers},
                                      routers=[m.index for m in layers], admit_steps=options.admit_steps)
    else:
        add_classifiers(model, classifier_layers, seed=options.seed, pooling=options.classifier_pooling,
                        decision=options.classifier_decision)
        adapter = ModelAdapter(model)
        names = [f"model.layers.{m.index}.mlp.gate" for m in adapter.moe_layers]
        names += [f"model.layers.{i}.mlp.classifier" for i in classifier_layers]
        method = ModuleSubset(modules=names, peak_lrs={f"model.layers.{i}.mlp.classifier": options.classifier_lr
                                                       for i in classifier_layers} if options.classifier_lr else {})
        # one entry per router, in the order of the router logits; None: a layer without new experts,
        # whose prior term is 0 by construction (left out of the mean)
        originals = [m.router.num_original if m.num_experts > m.router.num_original else None
                     for m in adapter.moe_layers]
        loss_fn = stage2_loss(options.old, originals, options)
    languages = ", ".join(f"{lang} {share:.2f}" for lang, share in mixture.items())
    log.info("expansion %s stage %d: %d steps on %s%s", options.variant, stage, settings.steps, languages,
             f"; classifiers on layers {classifier_layers}" if classifier_layers else "")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream = PackedStream({lang: token_files[lang] for lang in mixture}, mixture, settings.seq_len, eos, options.seed)
    inputs = {"expanded model": str(model_dir), "expansion": json.dumps(expansion, sort_keys=True),
              "stage": str(stage), "classifier layers": json.dumps(classifier_layers),
              "loss": json.dumps({k: getattr(options, k) for k in ("lpr_weight", "lpr_form", "classifier_weight",
                                                                   "classifier_pooling", "classifier_decision",
                                                                   "classifier_balance", "classifier_lr")})
              if stage == 2 else ""}
    expansion = expansion | {"stage": stage}
    if stage == 2:
        expansion |= {"classifier_layers": classifier_layers}
    result = train(model, stream, settings, state_dir, inputs=inputs, method=method, loss_fn=loss_fn,
                   export_steps={settings.steps: lambda m, sd: export_model(m, tokenizer, staged, state_dict=sd)})
    write_table(result.log_table(), staged / "train_log.parquet")
    write_run_record(staged, f"{options.variant} stage {stage}", result.parameters, settings.steps,
                     result.tokens_at(settings.steps))
    write_json(expansion, staged / EXPANSION_FILE)
    last = result.log[-1] if result.log else {}
    previous = {}
    if stage == 2 and (model_dir / RUN_FILE).is_file():
        previous = json.loads((model_dir / RUN_FILE).read_text(encoding="utf-8"))
    run = {**previous, "variant": options.variant, "plan": options.plan, "base": options.start,
           "classifier": bool(classifier_layers), "experts_per_layer": expansion["experts_per_layer"],
           "new_experts": expansion["new_experts"], "classifier_layers": classifier_layers,
           "total_params": int(result.parameters["total"]),
           f"stage{stage}_trainable_params": int(result.parameters["trainable"]),
           f"stage{stage}_trainable_fraction": float(result.parameters["trainable_fraction"]),
           f"stage{stage}_steps": settings.steps, "made_from": made_from}
    for key in ("loss", "aux_loss", "lpr_loss", "classifier_loss", "classifier_accuracy"):
        if key in last:
            run[f"stage{stage}_{key}"] = float(last[key])
    if classifier_layers:
        eval_files = {lang: token_files[lang] for lang in [*options.old, *options.new] if lang in token_files}
        run |= classifier_heldout_accuracy(staged, eval_files, options.old, options.new, settings.seq_len,
                                           options.classifier_eval_sequences, options.seed)
        log.info("expansion %s: classifier held-out accuracy %s on %d sequences (majority class %.3f)",
                 options.variant, ", ".join(f"layer {layer} {acc:.3f}" for layer, acc in
                                            zip(classifier_layers, run["classifier_heldout_accuracy"])),
                 run["classifier_heldout_sequences"], run["classifier_majority_baseline"])
    with atomic_path(staged / RUN_FILE) as tmp:  # last: its presence marks the stage finished
        tmp.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    log.info("expansion %s stage %d: loss %.3f, %s of %s parameters trained (%.2f%%)", options.variant, stage,
             result.final_loss, f"{result.parameters['trainable']:,}", f"{result.parameters['total']:,}",
             100 * result.parameters["trainable_fraction"])


# --------------------------------------------------------------------------------------------------
# The classifier on held-out text
# --------------------------------------------------------------------------------------------------

# The classifiers' accuracy is measured on documents that neither trained them nor chose anything: the
# test split of every old and new language.
CLASSIFIER_EVAL_SPLIT = TEST


def _balance_classes(windows: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """``(group, windows)`` per language with the larger group cut to the smaller one's size, taking its
    languages' windows in turn (the first of each language, then the second, ...), so that it stays
    spread over its languages."""
    size = min(sum(len(rows) for g, rows in windows if g == group) for group in (0, 1))
    keep = [0] * len(windows)
    for group in (0, 1):
        members = [i for i, (g, _) in enumerate(windows) if g == group]
        order = sorted(((depth, i) for i in members for depth in range(len(windows[i][1]))))
        for _, i in order[:size]:
            keep[i] += 1
    return [(g, rows[:n]) for (g, rows), n in zip(windows, keep) if n]


def classifier_heldout_accuracy(model_dir: str | Path, token_files: dict[str, str | Path], old: list[str],
                                new: list[str], seq_len: int, sequences: int, seed: int,
                                split: str = CLASSIFIER_EVAL_SPLIT, micro_batch: int = 8,
                                balanced: bool = True) -> dict:
    """Each router classifier's accuracy on held-out sequences of the old (class 0) and new (class 1)
    languages, as the saved model in ``model_dir`` decides when it scores text: with ``causal``
    decisions every position's decision counts (from its prefix), with ``sequence`` decisions one per
    sequence. Up to ``sequences`` windows of ``seq_len`` tokens per language from its ``split``
    documents (a language with too little text is left out, with a warning); with ``balanced`` the
    larger class is then cut to the smaller one's size (spread over its languages), so that the score
    does not reward a classifier for having learned stage 2's replay share rather than the languages.
    The majority-class baseline is the share of the larger class among the decisions counted (0.5 when
    balanced; every window has the same length, so sequences and positions give the same share)."""
    import torch

    from moelang.models import load_model
    from moelang.train import packed_windows

    from transformers import AutoTokenizer

    model = load_model(model_dir, dtype="float32", device="cpu").eval()
    layers = list(model.config.classifier_layers or [])
    if not layers:
        raise MoelangError(f"classifier accuracy: the model '{model_dir}' has no router classifier")
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    eos = 0 if eos is None else eos  # the training stream's separator (expand._train)
    windows = []  # (group, windows) per language
    for group, langs in ((0, old), (1, new)):
        for lang in (lang for lang in langs if lang in token_files):
            try:
                windows.append((group, packed_windows(token_files[lang], seq_len, eos, seed, split)[:sequences]))
            except MoelangError as exc:
                log.warning("classifier accuracy: %s left out (%s)", lang, exc)
    counts = [sum(len(rows) for g, rows in windows if g == group) for group in (0, 1)]
    if not all(counts):
        raise MoelangError(f"classifier accuracy: no held-out ('{split}') sequence of the "
                           f"{'old' if not counts[0] else 'new'} languages; add text or lower the sequence length")
    if balanced:
        windows = _balance_classes(windows)
        counts = [min(counts)] * 2
    ids = torch.from_numpy(np.concatenate([rows for _, rows in windows]).astype(np.int64))
    target = torch.tensor([g for g, rows in windows for _ in range(len(rows))])
    correct = torch.zeros(len(layers), dtype=torch.float64)
    decisions = 0
    with torch.no_grad():
        for start in range(0, len(ids), micro_batch):
            out = model(input_ids=ids[start:start + micro_batch], output_classifier_logits=True)
            group = target[start:start + micro_batch]
            for i, logits in enumerate(out.classifier_logits):
                truth = group if logits.dim() == 2 else group[:, None].expand(logits.shape[:2])
                correct[i] += (logits.argmax(-1) == truth).sum().double()
            decisions += out.classifier_logits[0].shape[:-1].numel()
    return {"classifier_heldout_accuracy": (correct / decisions).tolist(),
            "classifier_majority_baseline": max(counts) / sum(counts),
            "classifier_heldout_sequences": sum(counts),
            "classifier_pooling": model.config.classifier_pooling,
            "classifier_decision": model.config.classifier_decision}


# --------------------------------------------------------------------------------------------------
# The runs table
# --------------------------------------------------------------------------------------------------

def gather_runs(stage2_dirs: list[str | Path], out_table: str | Path, variants: dict[str, dict] | None = None,
                plan: dict | None = None) -> pl.DataFrame:
    """``results/expand/runs.parquet``: one row per variant, from the stage-2 directories. With
    ``variants`` (``expand.variants``) and ``plan`` (``plan.json`` read), a variant that shares an
    earlier variant's trained model (:func:`shared_training`) gets that model's row under its own name
    and plan, ``trained_as`` naming the variant the model was trained as; without them, one row per
    directory, each its own model."""
    runs = {}
    for directory in map(Path, stage2_dirs):
        path = directory / RUN_FILE
        if not path.is_file():
            raise MoelangError(f"expand-gather: '{directory}' has no {RUN_FILE}; it is not a finished stage-2 "
                               f"model (rerun its expand_stage2 job)")
        run = json.loads(path.read_text(encoding="utf-8"))
        runs[run["variant"]] = run
    if variants is None:
        named = {name: (name, run["plan"]) for name, run in runs.items()}
    else:
        sharing = shared_training(variants, plan or {})
        named = {name: (sharing[name]["model"], spec["plan"]) for name, spec in variants.items()}
    rows = []
    for name, (trained_as, plan_name) in named.items():
        if trained_as not in runs:
            raise MoelangError(f"expand-gather: variant '{name}' is trained as '{trained_as}', whose stage-2 "
                               f"directory is not among --runs; pass results/expand/{trained_as}/stage2")
        run = runs[trained_as] | {"variant": name, "plan": plan_name, "trained_as": trained_as}
        rows.append({field: run.get(field, math.nan if pa.types.is_floating(RUNS_SCHEMA.field(field).type) else None)
                     for field in RUNS_SCHEMA.names})
    table = pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)
    write_table(table, out_table)
    return pl.from_arrow(table)

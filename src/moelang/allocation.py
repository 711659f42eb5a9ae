"""Stage: LayerMoE's per-layer allocation of new experts, its baselines, and a routing-informed variant.

From the similarity table of one model (:mod:`moelang.similarity`):

* layer score ``S_i = (mean new-old similarity + mean new-new similarity) / 2`` (with a single new
  language the new-new term does not exist and ``S_i`` is the new-old mean; this is logged);
* ``N_i = ceil((1/S_i) / sum_j (1/S_j) * delta)``: higher similarity, fewer experts. ``N_i`` counts the
  layer's existing experts when ``counts_existing`` (LayerMoE on a dense model: the original FFN is
  expert 0, so the layer gets ``N_i - 1`` new experts); otherwise ``N_i`` is the number of new experts.
  Whether the model is dense or an MoE, and how many experts each layer has, is read from the
  similarity table's ``experts`` column, so the pipeline and ``moelang allocate`` by hand agree.
  The budget is ``delta``, or a total number of new experts (a delta that gives exactly that total
  is searched (the right end of its plateau); if ties make the exact total impossible, the largest total below it is
  taken and logged). A budget that leaves a layer without a new expert is rejected with the fix;
* non-positive layer scores (cross-script pairs such as en-ru can have a mean cosine <= 0): the paper
  assumes positive similarities, so what happens then is ours (``allocation.nonpositive``): ``shift``
  (the default) maps every score through ``(1 + S_i) / 2``, the cosine's range [-1, 1] onto [0, 1]
  (order kept; applied only when some S_i <= 0, so positive tables give the paper's numbers);
  ``clip`` raises the non-positive scores to the smallest positive one (those layers get as many
  experts as the least similar positive layer); ``error`` fails the methods that need 1/S_i;
* router-classifier layers: LayerMoE's scripts list them by hand (Qwen group 1: 5, 6, 10, 11, 12, 13,
  23) and publish no rule, and their list is not "the top layers by S". ``classifier_layers`` is
  either such an explicit list of layer indices (the authors' way; taken as given for every method)
  or a number m, for **our rule**: the m layers with the highest ``S`` (null: m = as many as the layers
  that receive the method's smallest count).

Baselines: ``uniform`` (MoE-LPR: the same number in every layer, a remainder spread evenly over
depth, at LayerMoE's total; or, with ``uniform_per_layer``, MoE-LPR's own budget of that many new
experts in every layer, as the LayerMoE paper compares with: 5 per layer, 120 new experts, against
LayerMoE's 48 on Qwen1.5-1.8B); ``mola`` (MoLA as the LayerMoE authors run it,
``stage1+2-6B-mola-g2.sh`` line 31: 2, 4, 6, 8 experts per layer in the first, second, third and last
quarter of depth, counting the FFN of their dense base, so 1, 3, 5, 7 **new** experts per layer, 96
in 24 layers: a fixed shape and budget (``mola_budget: authors``, the default). On an MoE base the
same 1, 3, 5, 7 new experts per quarter are added, whatever the base's experts (the budget is
MoLA's new experts, the unit LayerMoE's budget is given in on an MoE; scaling by a 64-expert
base's experts would add 64 to 448 new experts per layer). Layer i of n is in quarter
``floor(4 i / n)``, so when n is not divisible by 4 the quarters differ by at most one layer (n = 6:
1, 1, 3, 5, 5, 7). ``mola_budget: layermoe_total``: the shape 2, 4, 6, 8 scaled to LayerMoE's total
by largest remainders, ties to the earlier layer, and a layer left at 0 raised to 1 by taking one
from the largest count, the earliest on ties (ours: a comparison at equal budget); and
``increasing`` (ours, kept for older plans: proportional to depth, ``i + 1``, with at least one per
layer, at LayerMoE's total).
Beyond both papers, ``routing``: weights proportional to the routing stage's language-specialisation
score of the layer (more specialised layers get more new experts), optionally mixed with LayerMoE's
inverse-similarity weights (``routing_weight`` 1 = routing only, 0.5 = half each), rounded by largest
remainders with at least one new expert per layer. The baselines at LayerMoE's total take it; without
a LayerMoE plan, ``new_experts`` (with a ``delta`` budget they then have no total and fail too; the
authors' MoLA and ``uniform_per_layer`` have budgets of their own and do not).

Each method stands alone: one that cannot be computed (its reason: non-positive scores under
``nonpositive: error``, a delta too small for it, no specialisation scores) is left out of the plan,
named with its reason in ``_meta.failed`` and in a warning, and the others are written; the job
fails (one line with every reason) only when no method gives a plan. When every method gives the
same plan, ``_meta.all_methods_agree`` is true and a warning says that the comparison is empty.

Outputs: ``plan.json`` ``{method: {"experts_per_layer": [...], "new_experts_per_layer": [...],
"classifier_layers": [...]}}`` plus ``"_meta"`` (layers, scores, scores used, delta, budget, failed
methods, agreement); ``plan.parquet``: ``method`` string, ``layer`` int32, ``score`` float64 (S_i),
``score_used`` float64 (S_i after the non-positive treatment: what 1/S_i is taken of), ``experts``
int64, ``new_experts`` int64, ``classifier`` bool; ``plan.png``, a bar chart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, pyplot, save_figure, write_json
from moelang.options import AllocationOptions

METHODS = ("layermoe", "uniform", "mola", "increasing", "routing")
MOLA_STEPS = (2, 4, 6, 8)  # MoLA's experts per quarter of depth, counting a dense base's FFN (stage1+2-6B-mola-g2.sh)
MOLA_BUDGETS = ("authors", "layermoe_total")
NONPOSITIVE = ("shift", "clip", "error")
# what allocation reads from its input tables: column -> the kind of dtype it must have
SIMILARITY_COLUMNS = {"layer": "integer", "lang_a": "string", "lang_b": "string", "similarity": "number",
                      "experts": "integer"}
SPECIALIZATION_COLUMNS = {"model": "string", "checkpoint_step": "integer", "layer": "integer", "score": "number"}
REMAKE_SIMILARITY = ("remake it with the similarity stage (delete the file and run the workflow again, or "
                     "`moelang similarity`)")
REMAKE_SPECIALIZATION = ("remake it with the routing metrics stage (delete the file and run the workflow again, or "
                         "`moelang routing-metrics`)")
NO_SPECIALIZATION = "no specialisation table given (by hand: --specialization results/routing/metrics/specialization.parquet)"


# --------------------------------------------------------------------------------------------------
# input tables
# --------------------------------------------------------------------------------------------------

def _dtype_is(dtype, kind: str) -> bool:
    if kind == "integer":
        return dtype.is_integer()
    if kind == "number":
        return dtype.is_numeric()
    return dtype == pl.String


def read_table(path: str | Path, what: str, columns: dict[str, str], fix: str,
               optional: tuple[str, ...] = ()) -> pl.DataFrame:
    """The Parquet table at ``path`` with ``columns`` of the right kinds, or one line that names the
    file, what is wrong with it and ``fix`` (a truncated, foreign or older file must not end in a
    traceback)."""
    try:
        table = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MoelangError(f"allocation: the {what} '{path}' is not a readable Parquet file ({reason}); {fix}") from None
    missing = [name for name in columns if name not in table.columns and name not in optional]
    if missing:
        raise MoelangError(f"allocation: the {what} '{path}' has no column {', '.join(missing)} (its columns: "
                           f"{', '.join(table.columns)}); {fix}")
    wrong = [f"{name} is {table.schema[name]}, not {kind}" for name, kind in columns.items()
             if name in table.columns and not _dtype_is(table.schema[name], kind)]
    if wrong:
        raise MoelangError(f"allocation: the {what} '{path}' has the wrong column types ({'; '.join(wrong)}); {fix}")
    return table


def read_similarity(path: str | Path, need_experts: bool = True) -> pl.DataFrame:
    """The similarity table at ``path``, checked; ``need_experts``: its ``experts`` column too (tables
    made before the column existed work by hand with ``--existing``)."""
    table = read_table(path, "similarity table", SIMILARITY_COLUMNS, REMAKE_SIMILARITY, optional=("experts",))
    if need_experts and "experts" not in table.columns:
        raise MoelangError(f"allocation: the similarity table '{path}' has no column experts (made by an older "
                           f"moelang); {REMAKE_SIMILARITY}, or by hand pass --existing N (experts per layer)")
    if table.height == 0:
        raise MoelangError(f"allocation: the similarity table '{path}' has no rows; {REMAKE_SIMILARITY}")
    return table


def layer_experts(similarity: pl.DataFrame, path: str | Path) -> dict[int, int]:
    """layer -> the experts the layer has (1: a dense FFN), from the similarity table."""
    per_layer = similarity.group_by("layer").agg(pl.col("experts").unique()).sort("layer")
    out = {}
    for layer, values in per_layer.iter_rows():
        if len(values) != 1 or values[0] is None or values[0] < 1:
            raise MoelangError(f"allocation: the similarity table '{path}' gives layer {layer} the expert counts "
                               f"{values}; one count >= 1 per layer is expected; {REMAKE_SIMILARITY}")
        out[int(layer)] = int(values[0])
    return out


def read_specialization(path: str | Path, model: str | None, checkpoint_step: int | None) -> tuple[dict | None, str | None]:
    """(layer -> specialisation score of the chosen checkpoint, None), or (None, why the routing method
    has none)."""
    table = read_table(path, "specialisation table", SPECIALIZATION_COLUMNS, REMAKE_SPECIALIZATION)
    if model is not None:
        table = table.filter(pl.col("model") == model)
    if checkpoint_step is not None:
        table = table.filter(pl.col("checkpoint_step") == checkpoint_step)
    checkpoints = sorted(table.select("model", "checkpoint_step").unique().iter_rows())
    if not checkpoints:
        return None, (f"the specialisation table '{path}' has no rows for model {model} at step {checkpoint_step}; "
                      f"the routing metrics must include the similarity model (similarity.model)")
    if len(checkpoints) > 1:
        raise MoelangError(f"allocation: the specialisation table '{path}' has {len(checkpoints)} checkpoints "
                           f"({', '.join(f'{m} step {s}' for m, s in checkpoints)}); pick the similarity model's with "
                           f"--checkpoint-step N (or run with --config, as the workflow does)")
    return dict(table.select("layer", "score").iter_rows()), None


# --------------------------------------------------------------------------------------------------
# layer scores
# --------------------------------------------------------------------------------------------------

def layer_scores(similarity: pl.DataFrame, old: list[str], new: list[str]) -> tuple[list[int], np.ndarray]:
    """(layers, S_i) from a similarity table (pairs in either order), as measured (no treatment)."""
    if not new:
        raise MoelangError("allocation: no new language; set allocation.new (by hand: --new)")
    if not old:
        raise MoelangError("allocation: no old language; set allocation.old (by hand: --old)")
    overlap = set(old) & set(new)
    if overlap:
        raise MoelangError(f"allocation: {sorted(overlap)} are both old and new; a language is one or the other "
                           f"(fix allocation.old / allocation.new)")
    sim = similarity.filter(pl.col("lang_a") != pl.col("lang_b")).select("layer", "lang_a", "lang_b", "similarity")
    both = pl.concat([sim, sim.rename({"lang_a": "lang_b", "lang_b": "lang_a"}).select(sim.columns)])
    present = set(both["lang_a"])
    missing = [lang for lang in old + new if lang not in present]
    if missing:
        raise MoelangError(f"allocation: the similarity table has no pair with {missing}; remove them from "
                           f"allocation.old/new, or give them text for similarity.method (tokens: a kept corpus; "
                           f"parallel: a column in corpus.parallel)")
    layers = sorted(both["layer"].unique().to_list())
    new_old = both.filter(pl.col("lang_a").is_in(new) & pl.col("lang_b").is_in(old))
    new_new = both.filter(pl.col("lang_a").is_in(new) & pl.col("lang_b").is_in(new))
    by_layer_no = dict(new_old.group_by("layer").agg(pl.col("similarity").mean()).iter_rows())
    if len(new) == 1:
        log.info("allocation: a single new language (%s): S_i is the mean new-old similarity alone", new[0])
        terms = [by_layer_no]
    else:
        terms = [by_layer_no, dict(new_new.group_by("layer").agg(pl.col("similarity").mean()).iter_rows())]
    gaps = [layer for layer in layers if any(term.get(layer) is None for term in terms)]
    if gaps:
        raise MoelangError(f"allocation: the similarity table has no new-old or new-new pair at layers {gaps}; "
                           f"{REMAKE_SIMILARITY}")
    scores = np.array([sum(term[layer] for term in terms) / len(terms) for layer in layers], dtype=np.float64)
    nan = [layers[i] for i in np.flatnonzero(~np.isfinite(scores))]
    if nan:
        raise MoelangError(f"allocation: the similarity table has NaN or infinite similarities at layers {nan} "
                           f"(overflowing activations); set model.dtype: float32 and {REMAKE_SIMILARITY}")
    return layers, scores


def treat_nonpositive(layers: list[int], scores: np.ndarray, treatment: str) -> tuple[np.ndarray, list[int]]:
    """(the scores 1/S_i is taken of, the layers whose S_i <= 0) under ``allocation.nonpositive``
    (ours: see the module docstring). Raises when the treatment leaves no usable scores."""
    bad = scores <= 0
    bad_layers = [layers[i] for i in np.flatnonzero(bad)]
    if not bad.any():
        return scores, []
    if treatment == "error":
        raise MoelangError(f"layer score S_i <= 0 at layers {bad_layers} (lowest {scores.min():.4g}); LayerMoE's 1/S_i "
                           f"needs positive similarities: set allocation.nonpositive: shift (or clip), or choose "
                           f"another similarity.method or similarity.model")
    if treatment == "shift":
        used = (1 + scores) / 2
        if (used <= 0).any():
            raise MoelangError(f"layer score S_i = -1 at layers {[layers[i] for i in np.flatnonzero(used <= 0)]}, "
                               f"which the shift (1 + S_i) / 2 maps to 0; set allocation.nonpositive: clip")
    elif treatment == "clip":
        if bad.all():
            raise MoelangError("every layer score S_i is <= 0, so clip has no positive score to raise them to; set "
                               "allocation.nonpositive: shift")
        used = np.where(bad, scores[~bad].min(), scores)
    else:
        raise MoelangError(f"allocation.nonpositive is '{treatment}'; use one of {', '.join(NONPOSITIVE)}")
    log.warning("allocation: layer score S_i <= 0 at layers %s (lowest %.4g); allocation.nonpositive: %s gives the "
                "scores %s", bad_layers, scores.min(), treatment, ", ".join(f"{s:.4g}" for s in used))
    return used, bad_layers


# --------------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------------

def layermoe_counts(scores: np.ndarray, delta: float) -> np.ndarray:
    """N_i = ceil((1/S_i) / sum_j(1/S_j) * delta), in exact rational-free float arithmetic with a guard
    against 2.0000000001-style round-up."""
    inv = 1.0 / np.asarray(scores, dtype=np.float64)
    raw = inv / inv.sum() * delta
    return np.ceil(np.round(raw, 9)).astype(np.int64)


def delta_for_total(scores: np.ndarray, total_new: int, existing) -> tuple[float, int]:
    """A delta whose allocation has exactly ``total_new`` new experts (the right end of the smallest
    such plateau of the step function), else the largest total below it. ``existing``: experts N_i
    counts besides the new ones, per layer or for all. Returns (delta, total)."""
    inv = 1.0 / np.asarray(scores, dtype=np.float64)
    weights = inv / inv.sum()
    existing = np.asarray(existing, dtype=np.int64)
    # N_i steps up to k just after delta = (k - 1) / w_i: candidate deltas are the points k / w_i,
    # where N_i = k: the right end of each plateau of the total.
    upper = total_new + int(existing.max()) + 1
    candidates = sorted({k / w for w in weights for k in range(1, upper + 1)})
    best = None
    for delta in candidates:
        got = int((layermoe_counts(scores, delta) - existing).sum())
        if got == total_new:
            return delta, got
        if got < total_new:
            best = (delta, got)
        if got > total_new:
            break
    if best is None:
        raise MoelangError(f"{total_new} new experts cannot be split over {len(scores)} layers with at least one each; "
                           f"set allocation.new_experts (--new-experts) to at least {len(scores)}")
    log.warning("allocation: ties make exactly %d new experts impossible; using %d", total_new, best[1])
    return best


def spread(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split proportionally to ``weights`` with at least 1 per entry (largest remainders;
    ties go to the earlier entry)."""
    n = len(weights)
    if total < n:
        raise MoelangError(f"{total} new experts cannot give each of {n} layers one; set allocation.new_experts "
                           f"(--new-experts) to at least {n}")
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1 / n)
    extra = total - n
    raw = weights * extra
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: extra - counts.sum()]] += 1
    return counts + 1


def mola_shape(n_layers: int) -> np.ndarray:
    """MoLA's 2, 4, 6, 8 experts per quarter of depth: layer i is in quarter floor(4 i / n)."""
    return np.array([MOLA_STEPS[4 * i // n_layers] for i in range(n_layers)], dtype=np.int64)


def mola_new(n_layers: int) -> np.ndarray:
    """The authors' MoLA budget in new experts: their 2, 4, 6, 8 experts per quarter count the dense
    base's FFN, so 1, 3, 5, 7 new experts per layer (96 in 24 layers), on any base."""
    return mola_shape(n_layers) - 1


def scale_shape(shape: np.ndarray, total: int) -> np.ndarray:
    """``shape`` scaled to ``total`` by largest remainders (ties to the earlier entry), then every 0
    raised to 1 with one taken from the largest count (the first on ties, so that a rising shape stays
    rising). A shape whose sum is ``total`` comes back unchanged."""
    n = len(shape)
    if total < n:
        raise MoelangError(f"{total} new experts cannot give each of {n} layers one; set allocation.new_experts "
                           f"(--new-experts) to at least {n}")
    raw = np.asarray(shape, dtype=np.float64) / np.sum(shape) * total
    counts = np.floor(np.round(raw, 9)).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    for i in np.flatnonzero(counts == 0):
        largest = int(np.argmax(counts))
        counts[largest] -= 1
        counts[i] = 1
    return counts


def uniform(n_layers: int, total: int) -> np.ndarray:
    """MoE-LPR's uniform allocation; a remainder spread evenly over depth."""
    return np.array([(i + 1) * total // n_layers - i * total // n_layers for i in range(n_layers)], dtype=np.int64)


@dataclass
class Plan:
    method: str
    layers: list[int]
    scores: np.ndarray  # S_i as measured
    experts: np.ndarray  # N_i (what the method allocates, counting existing experts if configured)
    new: np.ndarray
    classifier_layers: list[int]

    def as_json(self) -> dict:
        return {"experts_per_layer": [int(x) for x in self.experts], "new_experts_per_layer": [int(x) for x in self.new],
                "classifier_layers": self.classifier_layers}


@dataclass
class Allocation:
    """Every method's plan for one similarity table, and why the others have none."""

    layers: list[int]
    scores: np.ndarray  # S_i as measured
    scores_used: np.ndarray | None  # after allocation.nonpositive; None when it gave no usable scores
    nonpositive_layers: list[int]
    plans: dict[str, Plan]
    failed: dict[str, str]  # method -> reason
    delta: float | None  # LayerMoE's delta (given, or searched for new_experts)
    total: int | None  # new experts of every plan

    @property
    def all_methods_agree(self) -> bool:
        """At least two methods gave a plan, and all of them the same new experts per layer."""
        return len(self.plans) > 1 and len({tuple(plan.new) for plan in self.plans.values()}) == 1


def classifier_layers(layers: list[int], scores: np.ndarray, counts: np.ndarray, m: int | list[int] | None) -> list[int]:
    """The router-classifier layers: an explicit list as given; else our rule, the ``m`` layers with
    the highest S (None: as many as the layers with the smallest count)."""
    if isinstance(m, (list, tuple)):
        return sorted(int(layer) for layer in m)
    if m is None:
        m = int((counts == counts.min()).sum())
    order = np.argsort(-scores, kind="stable")[:m]
    return sorted(layers[i] for i in order)


def allocate(similarity: pl.DataFrame, old: list[str], new: list[str], *, delta: float | None = None,
             new_experts: int | None = None, existing: int | Mapping[int, int] = 1, counts_existing: bool = True,
             classifier: int | list[int] | None = None, specialization: dict[int, float] | None = None,
             routing_weight: float = 1.0, nonpositive: str = "shift",
             no_specialization: str = NO_SPECIALIZATION, uniform_per_layer: int | None = None,
             mola_budget: str = "authors") -> Allocation:
    """Every allocation method for one similarity table (see the module docstring). Problems of the
    input as a whole raise; a method that cannot be computed is recorded in ``failed``."""
    if (delta is None) == (new_experts is None):
        raise MoelangError("allocation: give exactly one budget, allocation.delta or allocation.new_experts "
                           "(by hand: --delta or --new-experts)")
    if nonpositive not in NONPOSITIVE:
        raise MoelangError(f"allocation: allocation.nonpositive is '{nonpositive}'; use one of {', '.join(NONPOSITIVE)}")
    if mola_budget not in MOLA_BUDGETS:
        raise MoelangError(f"allocation: allocation.mola_budget is '{mola_budget}'; use one of {', '.join(MOLA_BUDGETS)}")
    if not 0 <= routing_weight <= 1:
        raise MoelangError(f"allocation: allocation.routing_weight (--routing-weight) is {routing_weight}; use a "
                           f"number from 0 to 1")
    if isinstance(classifier, int) and classifier < 0:
        raise MoelangError(f"allocation: allocation.classifier_layers (--classifier-layers) is {classifier}; use 0 or more")
    layers, scores = layer_scores(similarity, old, new)
    n = len(layers)
    if isinstance(classifier, (list, tuple)):
        unknown = sorted({int(layer) for layer in classifier} - set(layers))
        if unknown or len(set(classifier)) != len(classifier):
            what = f"layers {unknown} that the similarity table does not have" if unknown else "a layer twice"
            raise MoelangError(f"allocation: allocation.classifier_layers (--classifier-layers) lists {what} (its "
                               f"layers: {layers[0]}..{layers[-1]}); list each layer once, or give a number for our "
                               f"highest-S rule")
    if delta is not None and not delta > 0:
        raise MoelangError(f"allocation: allocation.delta (--delta) must be positive, got {delta}")
    if new_experts is not None and new_experts < n:
        raise MoelangError(f"allocation: {new_experts} new experts cannot give each of {n} layers one; set "
                           f"allocation.new_experts (--new-experts) to at least {n}")
    if isinstance(existing, Mapping):
        existing = np.array([existing[layer] for layer in layers], dtype=np.int64)
    base = np.broadcast_to(np.asarray(existing if counts_existing else 0, dtype=np.int64), (n,))
    try:
        scores_used, bad_layers = treat_nonpositive(layers, scores, nonpositive)
        score_problem = None
    except MoelangError as exc:
        scores_used, bad_layers, score_problem = None, [layers[i] for i in np.flatnonzero(scores <= 0)], str(exc)
    result = Allocation(layers, scores, scores_used, bad_layers, {}, {}, delta, None)

    def plan(name: str, new_alloc: np.ndarray) -> Plan:
        return Plan(name, layers, scores, new_alloc + base, new_alloc, classifier_layers(layers, scores, new_alloc, classifier))

    def layermoe() -> Plan:
        if score_problem is not None:
            raise MoelangError(score_problem)
        used_delta = delta if delta is not None else delta_for_total(scores_used, new_experts, base)[0]
        counts = layermoe_counts(scores_used, used_delta)
        short = np.flatnonzero(counts - base < 1)
        if short.size:
            if new_experts is not None:
                raise MoelangError(f"the delta that gives {new_experts} new experts leaves layers "
                                   f"{[layers[i] for i in short]} without one; raise allocation.new_experts (--new-experts)")
            weights = (1 / scores_used) / (1 / scores_used).sum()
            need = max((base[i] + 1) / weights[i] for i in short)
            raise MoelangError(f"delta {used_delta:g} gives layers {[layers[i] for i in short]} no new expert; raise "
                               f"allocation.delta (--delta) to at least {math.ceil(need * 1e6) / 1e6:g}, or give "
                               f"allocation.new_experts instead")
        result.delta = used_delta
        return Plan("layermoe", layers, scores, counts, counts - base,
                    classifier_layers(layers, scores, counts, classifier))

    def routing(total: int) -> Plan:
        if specialization is None:
            raise MoelangError(no_specialization)
        missing = [layer for layer in layers if layer not in specialization]
        if missing:
            raise MoelangError(f"no specialisation score for layers {missing} (dense layers have none); the routing "
                               f"method needs an MoE layer at every layer")
        spec = np.array([max(specialization[layer], 0.0) for layer in layers])
        weights = spec / spec.sum() if spec.sum() > 0 else np.full(n, 1 / n)
        if routing_weight < 1:  # LayerMoE's 1/S_i mixed in
            if score_problem is not None:
                raise MoelangError(f"allocation.routing_weight {routing_weight:g} mixes in 1/S_i, and {score_problem}")
            inv = 1 / scores_used
            weights = routing_weight * weights + (1 - routing_weight) * inv / inv.sum()
        return plan("routing", spread(weights, total))

    def attempt(name: str, make) -> None:
        try:
            result.plans[name] = make()
        except MoelangError as exc:
            result.failed[name] = str(exc)
            log.warning("allocation: no %s plan: %s", name, exc)

    attempt("layermoe", layermoe)
    # the baselines at equal budget share LayerMoE's total (comparable plans); without it, the asked-for total
    result.total = int(result.plans["layermoe"].new.sum()) if "layermoe" in result.plans else new_experts
    if uniform_per_layer is not None:  # MoE-LPR's own budget: the same count in every layer, whatever the total
        attempt("uniform", lambda: plan("uniform", np.full(n, uniform_per_layer, dtype=np.int64)))
    if mola_budget == "authors":  # MoLA's own fixed shape and budget, whatever LayerMoE's total
        attempt("mola", lambda: plan("mola", mola_new(n)))
    if result.total is None:
        for name in [m for m in METHODS[1:] if m not in result.plans]:
            result.failed[name] = ("the budget is allocation.delta, whose total of new experts comes from the layermoe "
                                   "plan, which failed; give allocation.new_experts (--new-experts) instead")
            log.warning("allocation: no %s plan: %s", name, result.failed[name])
    else:
        if uniform_per_layer is None:
            attempt("uniform", lambda: plan("uniform", uniform(n, result.total)))
        if mola_budget == "layermoe_total":
            attempt("mola", lambda: plan("mola", scale_shape(mola_shape(n), result.total)))
        attempt("increasing", lambda: plan("increasing", spread(np.arange(1, n + 1), result.total)))
        attempt("routing", lambda: routing(result.total))
    result.plans = {name: result.plans[name] for name in METHODS if name in result.plans}  # one order, however made
    if not result.plans:
        by_reason: dict[str, list[str]] = {}
        for name, reason in result.failed.items():
            by_reason.setdefault(reason, []).append(name)
        raise MoelangError("allocation: no method gives a plan: " +
                           "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()))
    if result.all_methods_agree:
        log.warning("allocation: every method (%s) gives the same plan %s: with %d layers and %d new experts the "
                    "comparison between methods is empty; a larger allocation.new_experts separates them",
                    ", ".join(result.plans), list(map(int, next(iter(result.plans.values())).new)), n, result.total)
    return result


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------

def _floats(values) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def write_plan(result: Allocation, out_dir: str | Path, meta: dict) -> dict:
    out_dir = Path(out_dir)
    payload = {name: plan.as_json() for name, plan in result.plans.items()}
    payload["_meta"] = {**meta, "delta": result.delta, "layers": result.layers, "scores": _floats(result.scores),
                        "scores_used": _floats(result.scores_used), "nonpositive_layers": result.nonpositive_layers,
                        "total_new_experts": result.total,
                        "new_experts_by_method": {name: int(p.new.sum()) for name, p in result.plans.items()},
                        "methods": list(result.plans), "failed": result.failed,
                        "all_methods_agree": result.all_methods_agree}
    write_json(payload, out_dir / "plan.json")
    used = result.scores_used
    rows = []
    for name, plan in result.plans.items():
        for i, layer in enumerate(plan.layers):
            rows.append((name, layer, float(plan.scores[i]), None if used is None else float(used[i]),
                         int(plan.experts[i]), int(plan.new[i]), layer in plan.classifier_layers))
    table = pl.DataFrame(rows, schema={"method": pl.String, "layer": pl.Int32, "score": pl.Float64,
                                       "score_used": pl.Float64, "experts": pl.Int64, "new_experts": pl.Int64,
                                       "classifier": pl.Boolean}, orient="row")
    with atomic_path(out_dir / "plan.parquet") as tmp:
        table.write_parquet(tmp)
    plot_plan(table, out_dir / "plan.png", list(result.failed))
    log.info("allocation: %s", "; ".join(f"{n}: {list(map(int, p.new))}" for n, p in result.plans.items()))
    if result.failed:
        log.warning("allocation: the plan has %s; no plan for %s (reasons in plan.json _meta.failed)",
                    ", ".join(result.plans), ", ".join(result.failed))
    return payload


def plot_plan(plan: pl.DataFrame, path, failed=()) -> None:
    """New experts per layer of every method in ``plan`` (the ``plan.parquet`` table) side by side,
    with each method's total, its router-classifier layers (C) and the layer score S_i (and the S_i
    used, where ``allocation.nonpositive`` changed it); ``failed``: methods without a plan. The stage's
    ``plan.png`` and the report's allocation figure."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    methods = plan["method"].unique(maintain_order=True).to_list()
    layers = sorted(plan["layer"].unique().to_list())
    x = np.arange(len(layers))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7, len(layers) * 0.8), 4.4))
    for k, method in enumerate(methods):
        part = plan.filter(pl.col("method") == method).sort("layer")
        total = int(part["new_experts"].sum())
        bars = ax.bar(x + k * width - 0.4 + width / 2, part["new_experts"], width, label=f"{method} ({total} new)")
        for bar, classifier in zip(bars, part["classifier"]):
            if classifier:
                ax.annotate("C", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
    first = plan.filter(pl.col("method") == methods[0]).sort("layer")
    ax2 = ax.twinx()
    ax2.plot(x, first["score"], "k--o", markersize=3, label="layer score S (right axis)")
    if first["score_used"].is_not_null().all() and (first["score_used"] != first["score"]).any():
        ax2.plot(x, first["score_used"], "k:", label="S used (allocation.nonpositive)")
    ax2.set_ylabel("layer score S (mean cosine)")
    ax.set_xticks(x, layers)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (C: router-classifier layer of the plan)")
    ax.set_ylabel("new experts")
    ax.set_title("New experts per layer, every allocation method" + (f"; no plan: {', '.join(failed)}" if failed else ""))
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = ax2.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.1, 1.0))
    save_figure(fig, path)


def run_allocation(similarity_path: str | Path, options: AllocationOptions | dict, out_dir: str | Path,
                   specialization_path: str | Path | None = None) -> Allocation:
    """The allocate stage: read the similarity (and specialisation) tables, write the plan. The
    experts each layer has come from the similarity table unless ``options.existing`` is set;
    options left out take the config schema's defaults (:class:`AllocationOptions`' own)."""
    options = AllocationOptions.coerce(options)
    given_existing = options.existing
    similarity = read_similarity(similarity_path, need_experts=given_existing is None)
    if given_existing is None:
        existing = layer_experts(similarity, similarity_path)
    else:
        existing = {int(layer): int(given_existing) for layer in similarity["layer"].unique()}
    is_moe = max(existing.values()) > 1
    counts_existing = options.counts_existing
    if counts_existing is None:
        counts_existing = not is_moe
    log.info("allocation: %s (%s experts per layer): N_i counts %s", "an MoE" if is_moe else "a dense model",
             ",".join(map(str, sorted(set(existing.values())))),
             "the existing experts too" if counts_existing else "new experts only")
    specialization, no_specialization = None, NO_SPECIALIZATION
    if specialization_path is not None:
        specialization, no_specialization = read_specialization(specialization_path, options.model,
                                                                options.checkpoint_step)
    nonpositive = options.nonpositive
    result = allocate(similarity, list(options.old or []), list(options.new or []), delta=options.delta,
                      new_experts=options.new_experts, existing=existing, counts_existing=counts_existing,
                      classifier=options.classifier_layers, specialization=specialization,
                      routing_weight=float(options.routing_weight), nonpositive=nonpositive,
                      no_specialization=no_specialization or NO_SPECIALIZATION,
                      uniform_per_layer=options.uniform_per_layer, mola_budget=options.mola_budget)
    meta = {"old": list(options.old), "new": list(options.new),
            "existing_experts_per_layer": [existing[layer] for layer in result.layers], "counts_existing": counts_existing,
            "nonpositive": nonpositive, "similarity": str(similarity_path),
            "specialization": None if specialization_path is None else str(specialization_path)}
    write_plan(result, out_dir, meta)
    return result

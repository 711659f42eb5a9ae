"""Stage: LayerMoE's per-layer allocation of new experts, its baselines, and a routing-informed variant.

From the similarity table of one model (:mod:`moelang.similarity`):

* layer score ``S_i = (mean new-old similarity + mean new-new similarity) / 2`` (with a single new
  language the new-new term does not exist and ``S_i`` is the new-old mean; this is logged);
* ``N_i = ceil((1/S_i) / sum_j (1/S_j) * delta)``: higher similarity, fewer experts. ``N_i`` counts the
  layer's existing experts when ``counts_existing`` (LayerMoE on a dense model: the original FFN is
  expert 0, so the layer gets ``N_i - 1`` new experts); otherwise ``N_i`` is the number of new experts.
  The budget is ``delta``, or a total number of new experts (a delta that gives exactly that total
  is searched (the right end of its plateau); if ties make the exact total impossible, the largest total below it is
  taken and logged). A budget that leaves a layer without a new expert, or a non-positive score, is
  rejected with the fix;
* router-classifier layers: the ``classifier_layers`` layers with the highest ``S`` (default: as many as
  layers that receive the smallest count, the paper's choice).

Baselines with the same total of new experts: ``uniform`` (MoE-LPR: the same number in every layer,
a remainder spread evenly over depth) and ``increasing`` (MoLA-like: proportional to depth).
Beyond both papers, ``routing``: weights proportional to the routing stage's language-specialisation
score of the layer (more specialised layers get more new experts), optionally mixed with LayerMoE's
inverse-similarity weights (``routing_weight`` 1 = routing only, 0.5 = half each), rounded by largest
remainders with at least one new expert per layer.

Outputs: ``plan.json`` ``{method: {"experts_per_layer": [...], "new_experts_per_layer": [...],
"classifier_layers": [...]}}`` plus ``"_meta"`` (layers, scores, delta, budget);
``plan.parquet``: ``method`` string, ``layer`` int32, ``score`` float64 (S_i), ``experts`` int64,
``new_experts`` int64, ``classifier`` bool; ``plan.png``, a bar chart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, save_figure, write_json

METHODS = ("layermoe", "uniform", "increasing", "routing")


def layer_scores(similarity: pl.DataFrame, old: list[str], new: list[str]) -> tuple[list[int], np.ndarray]:
    """(layers, S_i) from a similarity table (pairs in either order)."""
    if not new:
        raise MoelangError("allocation: no new language; set allocation.new (or --new)")
    if not old:
        raise MoelangError("allocation: no old language; set allocation.old (or --old)")
    overlap = set(old) & set(new)
    if overlap:
        raise MoelangError(f"allocation: {sorted(overlap)} are both old and new; a language is one or the other")
    sim = similarity.filter(pl.col("lang_a") != pl.col("lang_b"))
    both = pl.concat([sim, sim.rename({"lang_a": "lang_b", "lang_b": "lang_a"}).select(sim.columns)])
    present = set(both["lang_a"])
    missing = [lang for lang in old + new if lang not in present]
    if missing:
        raise MoelangError(f"allocation: the similarity table has no pair with {missing}; profile those languages or "
                           f"remove them from allocation.old/new")
    layers = sorted(both["layer"].unique().to_list())
    new_old = both.filter(pl.col("lang_a").is_in(new) & pl.col("lang_b").is_in(old))
    new_new = both.filter(pl.col("lang_a").is_in(new) & pl.col("lang_b").is_in(new))
    by_layer_no = dict(new_old.group_by("layer").agg(pl.col("similarity").mean()).iter_rows())
    if len(new) == 1:
        log.info("allocation: a single new language (%s): S_i is the mean new-old similarity alone", new[0])
        scores = np.array([by_layer_no[layer] for layer in layers])
    else:
        by_layer_nn = dict(new_new.group_by("layer").agg(pl.col("similarity").mean()).iter_rows())
        scores = np.array([(by_layer_no[layer] + by_layer_nn[layer]) / 2 for layer in layers])
    bad = [layers[i] for i, s in enumerate(scores) if not s > 0]
    if bad:
        raise MoelangError(f"allocation: layer score S_i <= 0 at layers {bad}; LayerMoE's 1/S_i weighting needs positive "
                           f"similarities (use the routing method, or another similarity method/model)")
    return layers, scores


def layermoe_counts(scores: np.ndarray, delta: float) -> np.ndarray:
    """N_i = ceil((1/S_i) / sum_j(1/S_j) * delta), in exact rational-free float arithmetic with a guard
    against 2.0000000001-style round-up."""
    inv = 1.0 / np.asarray(scores, dtype=np.float64)
    raw = inv / inv.sum() * delta
    return np.ceil(np.round(raw, 9)).astype(np.int64)


def delta_for_total(scores: np.ndarray, total_new: int, existing: int) -> tuple[float, int]:
    """A delta whose allocation has exactly ``total_new`` new experts (the right end of the smallest
    such plateau of the step function), else the largest total below it. Returns (delta, total)."""
    inv = 1.0 / np.asarray(scores, dtype=np.float64)
    weights = inv / inv.sum()
    # N_i steps up to k just after delta = (k - 1) / w_i: candidate deltas are the points k / w_i,
    # where N_i = k: the right end of each plateau of the total.
    upper = total_new + existing + 1
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
        raise MoelangError(f"allocation: {total_new} new experts cannot be split over {len(scores)} layers with at least "
                           f"one each; ask for at least {len(scores)}")
    log.warning("allocation: ties make exactly %d new experts impossible; using %d", total_new, best[1])
    return best


def spread(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split proportionally to ``weights`` with at least 1 per entry (largest remainders;
    ties go to the earlier entry)."""
    n = len(weights)
    if total < n:
        raise MoelangError(f"allocation: {total} new experts cannot give each of {n} layers one; ask for at least {n}")
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1 / n)
    extra = total - n
    raw = weights * extra
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: extra - counts.sum()]] += 1
    return counts + 1


def uniform(n_layers: int, total: int) -> np.ndarray:
    """MoE-LPR's uniform allocation; a remainder spread evenly over depth."""
    return np.array([(i + 1) * total // n_layers - i * total // n_layers for i in range(n_layers)], dtype=np.int64)


@dataclass
class Plan:
    method: str
    layers: list[int]
    scores: np.ndarray
    experts: np.ndarray  # N_i (what the method allocates, counting existing experts if configured)
    new: np.ndarray
    classifier_layers: list[int]

    def as_json(self) -> dict:
        return {"experts_per_layer": [int(x) for x in self.experts], "new_experts_per_layer": [int(x) for x in self.new],
                "classifier_layers": self.classifier_layers}


def classifier_layers(layers: list[int], scores: np.ndarray, counts: np.ndarray, m: int | None) -> list[int]:
    if m is None:
        m = int((counts == counts.min()).sum())
    order = np.argsort(-scores, kind="stable")[:m]
    return sorted(layers[i] for i in order)


def allocate(similarity: pl.DataFrame, old: list[str], new: list[str], *, delta: float | None = None,
             new_experts: int | None = None, existing: int = 1, counts_existing: bool = True,
             classifier: int | None = None, specialization: dict[int, float] | None = None,
             routing_weight: float = 1.0) -> tuple[dict[str, Plan], float]:
    """Every allocation method for one similarity table (see the module docstring), and the delta used."""
    if (delta is None) == (new_experts is None):
        raise MoelangError("allocation: give exactly one budget, delta or a total of new experts (new_experts)")
    layers, scores = layer_scores(similarity, old, new)
    base = existing if counts_existing else 0
    if delta is None:
        if new_experts < len(layers):
            raise MoelangError(f"allocation: {new_experts} new experts cannot give each of {len(layers)} layers one; ask "
                               f"for at least {len(layers)}")
        delta, _ = delta_for_total(scores, new_experts, base)
    if delta <= 0:
        raise MoelangError(f"allocation: delta must be positive, got {delta}")
    counts = layermoe_counts(scores, delta)
    new_counts = counts - base
    if (new_counts < 1).any():
        short = [layers[i] for i in np.flatnonzero(new_counts < 1)]
        inv = 1 / scores
        need = max((base + 1) / (inv[i] / inv.sum()) for i in np.flatnonzero(new_counts < 1))
        raise MoelangError(f"allocation: delta {delta:g} gives layers {short} no new expert; raise delta to at least "
                           f"{math.ceil(need * 1e6) / 1e6:g} (or ask for more new experts)")
    total = int(new_counts.sum())
    plans = {"layermoe": Plan("layermoe", layers, scores, counts, new_counts,
                              classifier_layers(layers, scores, counts, classifier))}
    for name, new_alloc in (("uniform", uniform(len(layers), total)),
                            ("increasing", spread(np.arange(1, len(layers) + 1), total))):
        plans[name] = Plan(name, layers, scores, new_alloc + base, new_alloc,
                           classifier_layers(layers, scores, new_alloc, classifier))
    if specialization is not None:
        missing = [layer for layer in layers if layer not in specialization]
        if missing:
            log.warning("allocation: no specialisation score for layers %s; the routing method is skipped", missing)
        else:
            spec = np.array([max(specialization[layer], 0.0) for layer in layers])
            spec_w = spec / spec.sum() if spec.sum() > 0 else np.full(len(layers), 1 / len(layers))
            inv = 1 / scores
            weights = routing_weight * spec_w + (1 - routing_weight) * inv / inv.sum()
            new_alloc = spread(weights, total)
            plans["routing"] = Plan("routing", layers, scores, new_alloc + base, new_alloc,
                                    classifier_layers(layers, scores, new_alloc, classifier))
    return plans, delta


def write_plan(plans: dict[str, Plan], delta: float, out_dir: str | Path, meta: dict) -> None:
    out_dir = Path(out_dir)
    payload = {name: plan.as_json() for name, plan in plans.items()}
    first = next(iter(plans.values()))
    payload["_meta"] = {**meta, "delta": delta, "layers": first.layers,
                        "scores": [float(s) for s in first.scores],
                        "total_new_experts": int(plans["layermoe"].new.sum())}
    write_json(payload, out_dir / "plan.json")
    rows = []
    for name, plan in plans.items():
        for i, layer in enumerate(plan.layers):
            rows.append((name, layer, float(plan.scores[i]), int(plan.experts[i]), int(plan.new[i]),
                         layer in plan.classifier_layers))
    table = pl.DataFrame(rows, schema={"method": pl.String, "layer": pl.Int32, "score": pl.Float64, "experts": pl.Int64,
                                       "new_experts": pl.Int64, "classifier": pl.Boolean}, orient="row")
    with atomic_path(out_dir / "plan.parquet") as tmp:
        table.write_parquet(tmp)
    _plot(plans, out_dir / "plan.png")
    log.info("allocation: %s", "; ".join(f"{n}: {list(map(int, p.new))}" for n, p in plans.items()))


def _plot(plans: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plans)
    first = plans[names[0]]
    x = np.arange(len(first.layers))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, len(x) * 0.6), 4.2))
    for k, name in enumerate(names):
        ax.bar(x + k * width - 0.4 + width / 2, plans[name].new, width, label=name)
    for layer in first.classifier_layers:
        ax.annotate("C", (first.layers.index(layer) - 0.4 + width / 2, first.new[first.layers.index(layer)]),
                    ha="center", va="bottom", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, first.scores, "k--o", markersize=3, label="layer score S")
    ax2.set_ylabel("layer score S (mean cosine)")
    ax.set_xticks(x, first.layers)
    ax.set_xlabel("layer (C: LayerMoE router-classifier layer)")
    ax.set_ylabel("new experts")
    ax.set_title(f"New experts per layer ({int(first.new.sum())} in all)")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def existing_experts(model_ref: str | Path, options: dict) -> tuple[int, bool]:
    """(experts per layer the model has, whether it is an MoE) from its config alone (no weights)."""
    from moelang.models import count_parameters, load_config

    config = load_config(str(model_ref), revision=options.get("revision"),
                         trust_remote_code=options.get("trust_remote_code", False))
    counts = count_parameters(config=config)
    if "num_experts" in counts:
        return int(counts["num_experts"]), True
    return 1, False


def run_allocation(similarity_path: str | Path, options: dict, out_dir: str | Path,
                   specialization_path: str | Path | None = None) -> dict:
    """The allocate stage: read the similarity (and specialisation) tables, write the plan."""
    similarity = pl.read_parquet(similarity_path)
    if options.get("model_ref"):
        existing, is_moe = existing_experts(options["model_ref"], options)
    else:
        existing, is_moe = int(options.get("existing", 1)), False
    counts_existing = options.get("counts_existing")
    if counts_existing is None:
        counts_existing = not is_moe
    specialization = None
    if specialization_path is not None and Path(specialization_path).is_file():
        spec = pl.read_parquet(specialization_path)
        if "model" in options and "checkpoint_step" in options:
            spec = spec.filter((pl.col("model") == options["model"]) & (pl.col("checkpoint_step") == options["checkpoint_step"]))
        specialization = dict(spec.select("layer", "score").iter_rows()) or None
    plans, delta = allocate(similarity, list(options["old"]), list(options["new"]), delta=options.get("delta"),
                            new_experts=options.get("new_experts"), existing=existing, counts_existing=counts_existing,
                            classifier=options.get("classifier_layers"), specialization=specialization,
                            routing_weight=float(options.get("routing_weight", 1.0)))
    meta = {"old": list(options["old"]), "new": list(options["new"]), "existing_experts_per_layer": existing,
            "counts_existing": counts_existing, "similarity": str(similarity_path)}
    write_plan(plans, delta, out_dir, meta)
    return {name: plan.as_json() for name, plan in plans.items()}

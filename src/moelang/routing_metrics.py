"""Stage: routing metrics (section A of the project's science notes), from the routing profiles.

With ``c_l(e)`` the number of language-``l`` tokens that had expert ``e`` among their top-k at a layer
and ``q_l = c_l / sum_e c_l(e)`` its normalised distribution:

* **entropy** ``H(l) = -sum_e q_l(e) ln q_l(e)`` (nats), per (model, checkpoint, language, layer);
* **Jensen-Shannon divergence** ``JSD(a, b) = 1/2 KL(q_a || m) + 1/2 KL(q_b || m)``, ``m = (q_a + q_b)/2``,
  natural log (equal to ``scipy.spatial.distance.jensenshannon(q_a, q_b) ** 2``), per pair ``a < b``
  in config order, and its mean over pairs per layer: over all languages, without English, and (the
  authors' Fig. 5) over the high-resource languages only, with and without English;
* **language-specialisation score** ``I(L; E) / H(L)`` in bits from the language x expert count table
  (``P(l, e) = c_l(e) / sum c``): 0 when experts say nothing about the language, 1 when they identify it;
* **JSD vs vocabulary overlap**: at one layer (default: the last MoE layer), Pearson and Spearman r
  between pairwise JSD and pairwise overlap (each overlap measure), with the number of pairs, over
  every pair and over the authors' pairs (their Fig. 6: HR x LR and HR-HR, LR-LR excluded), and
  separately per pair type (HR-LR, HR-HR); LR are the targets;
* **expert selection** in the final ``K`` MoE layers of the selection model: activation shares
  ``a_l(e) = c_l(e) / sum_e' c_l(e')`` over the high-resource languages; an expert is *specific* to its
  top language when the share gap to the second language is at least ``alpha``; *shared* experts are
  the top ``k`` by mean share; a target language takes its parent's experts.

Expert sets per target (``selected_experts.json``):

* ``seft``: the parent's specific experts;
* ``ssft``: ``seft`` plus shared experts, by ``routing.shared_mode``: ``k_extra`` (the authors' runs) adds
  the ``k`` best-ranked shared experts that are not already in ``seft`` (always ``k`` more), ``union``
  (the authors' generator) is ``seft`` united with the top ``k`` (fewer when they overlap);
* ``seft_top{N}``: the ``N`` experts with the largest parent share gap;
* ``random``: as many random experts per layer as ``seft`` (the authors' control), seeded;
* ``random_hr``: the ``seft`` set of another parent (the authors' "randomHR" control), through a fixed
  derangement of the parents (:func:`random_hr_donors`).

Outputs (``results/routing/metrics/``)
--------------------------------------
``entropy.parquet``: model, checkpoint_step, lang, layer, entropy.
``jsd.parquet``: model, checkpoint_step, layer, lang_a, lang_b, jsd.
``jsd_mean.parquet``: model, checkpoint_step, layer, languages (``all`` | ``without_en`` |
``high_resource`` | ``high_resource_without_en``), mean_jsd, n_pairs.
``specialization.parquet``: model, checkpoint_step, layer, score.
``jsd_overlap.parquet``: model, checkpoint_step, layer, measure, pairs (``all`` | ``without_lr_lr`` |
``hr_lr`` | ``hr_hr``), pearson_r, pearson_p, spearman_r, spearman_p, n_pairs.
``experts.parquet``: model, checkpoint_step, layer, expert, top_lang, top_share, second_share, gap,
specific_lang (null unless gap >= alpha), mean_share, shared_rank, shared.
``results/routing/selected_experts.json``: ``{target_lang: {method: {layer: [expert ids]}}}`` with
methods ``ssft``, ``seft``, ``seft_top{N}``, ``random`` and ``random_hr`` (above).
Plots: ``entropy.png``, ``jsd_dynamics.png``, ``jsd_heatmap.png``, ``specialization.png``,
``jsd_overlap.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, pyplot, save_figure, write_json
from moelang.options import RoutingMetricsOptions

# --------------------------------------------------------------------------------------------------
# Metrics on plain arrays
# --------------------------------------------------------------------------------------------------


def normalise(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("a routing distribution needs at least one count")
    return counts / total


def entropy(counts) -> float:
    """Natural-log entropy of the normalised counts."""
    q = normalise(counts)
    nz = q[q > 0]
    return float(-(nz * np.log(nz)).sum())


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / m[mask])).sum())


def jsd(counts_a, counts_b) -> float:
    """Jensen-Shannon divergence (natural log) of two count vectors."""
    p, q = normalise(counts_a), normalise(counts_b)
    m = (p + q) / 2
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def specialization(table) -> float:
    """I(L; E) / H(L) in bits from a languages x experts count table (NaN with a single language)."""
    joint = np.asarray(table, dtype=np.float64)
    joint = joint / joint.sum()
    p_lang = joint.sum(axis=1)
    p_expert = joint.sum(axis=0)
    h_lang = -sum(p * np.log2(p) for p in p_lang if p > 0)
    if h_lang <= 0:
        return float("nan")
    nz = joint > 0
    mutual = float((joint[nz] * np.log2(joint[nz] / np.outer(p_lang, p_expert)[nz])).sum())
    return mutual / h_lang


def select_experts(shares: dict[str, np.ndarray], alpha: float, shared_k: int) -> dict:
    """Language-specific experts by activation gap and shared experts by mean share.

    ``shares``: language -> activation shares over the experts (each sums to 1), the high-resource
    languages. Returns ``{"specific": {lang: [e, ...]}, "shared": [e, ...], "per_expert": [...]}``.
    Ties are broken by the lower expert id (stable sorts)."""
    langs = list(shares)
    matrix = np.stack([shares[lang] for lang in langs])  # [L, E]
    order = np.argsort(-matrix, axis=0, kind="stable")
    top, second = order[0], order[1] if len(langs) > 1 else order[0]
    n_experts = matrix.shape[1]
    top_share = matrix[top, np.arange(n_experts)]
    second_share = matrix[second, np.arange(n_experts)] if len(langs) > 1 else np.zeros(n_experts)
    gap = top_share - second_share
    specific: dict[str, list[int]] = {lang: [] for lang in langs}
    for e in range(n_experts):
        if gap[e] >= alpha:
            specific[langs[top[e]]].append(e)
    mean_share = matrix.mean(axis=0)
    shared_order = np.argsort(-mean_share, kind="stable")
    rank = np.empty(n_experts, dtype=np.int64)
    rank[shared_order] = np.arange(1, n_experts + 1)
    per_expert = [{"expert": e, "top_lang": langs[top[e]], "top_share": float(top_share[e]),
                   "second_share": float(second_share[e]), "gap": float(gap[e]),
                   "specific_lang": langs[top[e]] if gap[e] >= alpha else None,
                   "mean_share": float(mean_share[e]), "shared_rank": int(rank[e]), "shared": bool(rank[e] <= shared_k)}
                  for e in range(n_experts)]
    return {"specific": specific, "shared": sorted(int(e) for e in shared_order[:shared_k]),
            "shared_order": [int(e) for e in shared_order], "per_expert": per_expert}


def ssft_experts(specific: list[int], shared_order: list[int], shared_k: int, mode: str) -> list[int]:
    """The SSFT set: the specific experts plus shared ones. ``k_extra`` (the authors' runs): the
    ``shared_k`` best-ranked experts of ``shared_order`` not already specific, so always ``shared_k``
    more (fewer only when the layer runs out of experts); ``union`` (the authors' generator): the specific
    experts united with the top ``shared_k``."""
    if mode == "union":
        return sorted(set(specific) | set(shared_order[:shared_k]))
    if mode == "k_extra":
        extra = [e for e in shared_order if e not in set(specific)][:shared_k]
        return sorted(set(specific) | set(extra))
    raise MoelangError(f"routing.shared_mode '{mode}' is not known; use 'k_extra' or 'union'")


# The authors' randomHR control: target <- the target whose parent's seft set it trains.
AUTHORS_TARGETS = {"ca": "es", "et": "fi", "mr": "hi", "sk": "cs", "uk": "ru", "ur": "ar"}
AUTHORS_RANDOM_HR = {"ur": "sk", "sk": "ca", "ca": "et", "et": "mr", "mr": "uk", "uk": "ur"}


def random_hr_donors(targets: dict[str, str], high_resource: list[str]) -> dict[str, str]:
    """target -> the parent whose ``seft`` set is the target's ``random_hr`` control.

    With the authors' targets, their mapping (ur<-sk, sk<-ca, ca<-et, et<-mr, mr<-uk, uk<-ur: each
    target takes the parent of the target after the arrow). Otherwise a cyclic shift of the distinct
    parents, ordered as in ``high_resource`` (parents missing from it after, in target order): each
    parent's targets take the next parent's set, the last parent's the first's. No parent keeps its own
    set; with the paper's high-resource order this shift is the authors' mapping. Fewer than two
    distinct parents: no derangement exists, and the result is empty."""
    if targets == AUTHORS_TARGETS:
        return {target: AUTHORS_TARGETS[donor] for target, donor in AUTHORS_RANDOM_HR.items()}
    return cyclic_parent_donors(targets, high_resource)


def cyclic_parent_donors(targets: dict[str, str], high_resource: list[str]) -> dict[str, str]:
    """The general derangement of :func:`random_hr_donors`: each parent's targets take the next
    distinct parent (in ``high_resource`` order) as donor, cyclically; empty with a single parent."""
    distinct = list(dict.fromkeys(targets.values()))
    rank = {lang: i for i, lang in enumerate(high_resource)}
    parents = sorted(distinct, key=lambda p: (rank.get(p, len(rank)), distinct.index(p)))
    if len(parents) < 2:
        return {}
    following = {p: parents[(i + 1) % len(parents)] for i, p in enumerate(parents)}
    return {target: following[parent] for target, parent in targets.items()}


def top_by_gap(shares: dict[str, np.ndarray], lang: str, n: int) -> list[int]:
    """The ``n`` experts with the largest share gap of ``lang`` over the best other language."""
    others = np.stack([v for l, v in shares.items() if l != lang]) if len(shares) > 1 else np.zeros((1, len(shares[lang])))
    gap = shares[lang] - others.max(axis=0)
    return sorted(int(e) for e in np.argsort(-gap, kind="stable")[:n])


def set_setting(method: str) -> str:
    """The setting that decides the size of ``method``'s expert set (named when a set comes out empty)."""
    if method.startswith("seft_top"):
        return "routing.top_n"
    return {"seft": "routing.alpha", "random": "routing.alpha (as many as seft)",
            "random_hr": "routing.alpha (the donor parent's seft)",
            "ssft": "routing.alpha and routing.shared_k"}.get(method, "routing.alpha")


def empty_layers(sets: dict[str, list[int]]) -> list[int]:
    """The layers (as ints, ascending) where one method's set (``{layer: [expert ids]}``) is empty."""
    return sorted(int(layer) for layer, ids in sets.items() if not ids)


def empty_everywhere(sets: dict[str, list[int]]) -> bool:
    """True when a method's set has no expert in any layer: there is nothing to train."""
    return bool(sets) and len(empty_layers(sets)) == len(sets)


def empty_set_notice(selected: dict, options: RoutingMetricsOptions | dict) -> str | None:
    """One line for the user when the selection leaves sets of ``selected`` ({target: {method: {layer:
    ids}}}) empty: those empty in every final layer (the adaptation stage does not train them) and
    those empty in some layers only (trained in the others), each with the setting that decides it.
    None when no set is empty."""
    options = RoutingMetricsOptions.coerce(options)
    everywhere, some = [], []
    for target, methods in selected.items():
        for method, sets in methods.items():
            layers = empty_layers(sets)
            if not layers:
                continue
            if empty_everywhere(sets):
                everywhere.append(f"{target} {method} [{set_setting(method)}]")
            else:
                some.append(f"{target} {method} (layer {', '.join(map(str, layers))}) [{set_setting(method)}]")
    if not everywhere and not some:
        return None
    parts = []
    if everywhere:
        parts.append(f"empty in every final layer, so not trained or evaluated: {'; '.join(everywhere)}")
    if some:
        parts.append(f"empty in some final layers only, trained in the others: {'; '.join(some)}")
    return (f"routing metrics: the selection (routing.alpha = {options.alpha:g}, routing.shared_k = "
            f"{options.shared_k}, routing.top_n = {options.top_n}) leaves expert sets empty: {' | '.join(parts)}; "
            f"lower routing.alpha (or raise routing.top_n / routing.shared_k) for larger sets")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def read_profiles(paths: list[str | Path]) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    if not frames:
        raise MoelangError("routing metrics: no routing profile given; run the profile_routing rule first")
    return pl.concat(frames)


def _groups(profiles: pl.DataFrame):
    """(model, checkpoint_step, layer) -> {lang: counts array ordered by expert}."""
    out: dict[tuple, dict[str, np.ndarray]] = {}
    for (model, step, layer, lang), frame in profiles.sort("expert").group_by(
            ["model", "checkpoint_step", "layer", "lang"], maintain_order=True):
        out.setdefault((model, step, layer), {})[lang] = frame["count"].to_numpy()
    return out


def metric_tables(profiles: pl.DataFrame, languages: list[str], base_language: str = "en",
                  high_resource: list[str] | None = None) -> dict[str, pl.DataFrame]:
    """Entropy, pairwise JSD, mean JSD and specialisation for every (model, checkpoint, layer). With
    ``high_resource``, the mean JSD also over the pairs of high-resource languages only (with and
    without the base language: the authors' Fig. 5)."""
    order = {lang: i for i, lang in enumerate(languages)}
    subsets = [("all", lambda a, b: True),
               (f"without_{base_language}", lambda a, b: base_language not in (a, b))]
    if high_resource:
        hr = set(high_resource)
        subsets += [("high_resource", lambda a, b: a in hr and b in hr),
                    (f"high_resource_without_{base_language}",
                     lambda a, b: a in hr and b in hr and base_language not in (a, b))]
    ent, pairs, means, spec = [], [], [], []
    for (model, step, layer), by_lang in sorted(_groups(profiles).items()):
        langs = sorted((l for l in by_lang if l in order and by_lang[l].sum() > 0), key=order.get)
        for lang in langs:
            ent.append((model, step, lang, layer, entropy(by_lang[lang])))
        layer_pairs = []
        for i, a in enumerate(langs):
            for b in langs[i + 1:]:
                value = jsd(by_lang[a], by_lang[b])
                pairs.append((model, step, layer, a, b, value))
                layer_pairs.append((a, b, value))
        for subset, keep in subsets:
            values = [v for a, b, v in layer_pairs if keep(a, b)]
            means.append((model, step, layer, subset, float(np.mean(values)) if values else float("nan"), len(values)))
        if len(langs) > 1:
            spec.append((model, step, layer, specialization(np.stack([by_lang[l] for l in langs]))))
    return {
        "entropy": pl.DataFrame(ent, schema={"model": pl.String, "checkpoint_step": pl.Int64, "lang": pl.String,
                                             "layer": pl.Int32, "entropy": pl.Float64}, orient="row"),
        "jsd": pl.DataFrame(pairs, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                           "lang_a": pl.String, "lang_b": pl.String, "jsd": pl.Float64}, orient="row"),
        "jsd_mean": pl.DataFrame(means, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                                "languages": pl.String, "mean_jsd": pl.Float64, "n_pairs": pl.Int64},
                                 orient="row"),
        "specialization": pl.DataFrame(spec, schema={"model": pl.String, "checkpoint_step": pl.Int64,
                                                     "layer": pl.Int32, "score": pl.Float64}, orient="row"),
    }


PAIR_SETS = ("all", "without_lr_lr", "hr_lr", "hr_hr")


def pair_type(a: str, b: str, high_resource, targets) -> str:
    """``hr_hr``, ``hr_lr`` (either order), ``lr_lr``, or ``other`` (a language that is neither)."""
    kinds = sorted("hr" if lang in high_resource else "lr" if lang in targets else "other" for lang in (a, b))
    return "other" if "other" in kinds else "_".join(kinds)


def jsd_overlap_table(jsd_table: pl.DataFrame, overlap: pl.DataFrame, layer: int | None,
                      high_resource: list[str] | None = None, targets=None) -> pl.DataFrame:
    """Pearson and Spearman r between pairwise JSD at ``layer`` (default: the last profiled layer) and
    each symmetric overlap measure, over every pair (``pairs = all``) and, with ``high_resource`` and
    ``targets`` (the LR languages), over the authors' pairs (``without_lr_lr``: HR x LR and HR-HR) and
    each of their two types (``hr_lr``, ``hr_hr``)."""
    from scipy import stats

    rows = []
    symmetric = overlap.filter(pl.col("measure").is_in(["jaccard", "weighted"]))
    pair_sets = PAIR_SETS if high_resource and targets else ("all",)
    for (model, step), frame in jsd_table.group_by(["model", "checkpoint_step"], maintain_order=True):
        at = layer if layer is not None else int(frame["layer"].max())
        pairs = frame.filter(pl.col("layer") == at)
        joined = pairs.join(symmetric, on=["lang_a", "lang_b"], how="inner")
        if len(pair_sets) > 1:
            kinds = [pair_type(a, b, set(high_resource or []), set(targets or []))
                     for a, b in zip(joined["lang_a"], joined["lang_b"])]
            joined = joined.with_columns(pl.Series("pair_type", kinds, dtype=pl.String))
        for measure, by_measure in joined.group_by("measure", maintain_order=True):
            for pair_set in pair_sets:
                if pair_set == "all":
                    part = by_measure
                elif pair_set == "without_lr_lr":
                    part = by_measure.filter(pl.col("pair_type").is_in(["hr_hr", "hr_lr"]))
                else:
                    part = by_measure.filter(pl.col("pair_type") == pair_set)
                n = part.height
                x, y = part["value"].to_numpy(), part["jsd"].to_numpy()
                if n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                    pr, pp = stats.pearsonr(x, y)
                    sr, sp = stats.spearmanr(x, y)
                else:
                    pr = pp = sr = sp = float("nan")
                rows.append((model, step, at, measure[0] if isinstance(measure, tuple) else measure, pair_set,
                             float(pr), float(pp), float(sr), float(sp), n))
    order = {name: i for i, name in enumerate(PAIR_SETS)}
    table = pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                       "measure": pl.String, "pairs": pl.String, "pearson_r": pl.Float64,
                                       "pearson_p": pl.Float64, "spearman_r": pl.Float64, "spearman_p": pl.Float64,
                                       "n_pairs": pl.Int64}, orient="row")
    return (table.with_columns(pl.col("pairs").replace_strict(order, return_dtype=pl.Int32).alias("_order"))
            .sort("model", "checkpoint_step", "measure", "_order").drop("_order"))


def expert_selection(profiles: pl.DataFrame, model: str, step: int, high_resource: list[str],
                     targets: dict[str, str], options: RoutingMetricsOptions | dict,
                     seed: int) -> tuple[pl.DataFrame, dict]:
    """experts.parquet rows and selected_experts.json for the final K MoE layers of one model."""
    options = RoutingMetricsOptions.coerce(options)
    groups = {k: v for k, v in _groups(profiles).items() if k[0] == model and k[1] == step}
    if not groups:
        raise MoelangError(f"routing metrics: no profile of model '{model}' step {step} to select experts from")
    layers = sorted(k[2] for k in groups)[-options.final_layers:]
    rows, chosen = [], {}
    for layer in layers:
        by_lang = groups[(model, step, layer)]
        hr = [l for l in high_resource if l in by_lang and by_lang[l].sum() > 0]
        if len(hr) < 2:
            raise MoelangError(f"routing metrics: expert selection needs at least two high-resource languages with "
                               f"profiles; have {hr}")
        shares = {l: normalise(by_lang[l]) for l in hr}
        selection = select_experts(shares, options.alpha, options.shared_k)
        for record in selection["per_expert"]:
            rows.append({"model": model, "checkpoint_step": step, "layer": layer, **record})
        chosen[layer] = (shares, selection)
    rng = np.random.default_rng(seed)
    selected: dict = {}
    top_n = options.top_n
    mode = options.shared_mode
    # from every configured target, so that a target the corpus dropped does not reshuffle the others' donors
    donors = random_hr_donors(options.targets or targets, high_resource)
    for target, parent in targets.items():
        if any(parent not in shares for shares, _ in chosen.values()):
            continue  # a parent without a profile: nothing to select from
        donor = donors.get(target)
        if donor is not None and any(donor not in shares for shares, _ in chosen.values()):
            log.warning("routing metrics: %s's random_hr donor %s has no profile; no random_hr set for %s",
                        target, donor, target)
            donor = None
        methods: dict[str, dict[str, list[int]]] = {"ssft": {}, "seft": {}, f"seft_top{top_n}": {}, "random": {}}
        if donor is not None:
            methods["random_hr"] = {}
        for layer, (shares, selection) in chosen.items():
            specific = selection["specific"][parent]
            n_experts = len(shares[parent])
            methods["seft"][str(layer)] = specific
            methods["ssft"][str(layer)] = ssft_experts(specific, selection["shared_order"], options.shared_k, mode)
            methods[f"seft_top{top_n}"][str(layer)] = top_by_gap(shares, parent, min(top_n, n_experts))
            methods["random"][str(layer)] = sorted(int(e) for e in rng.choice(n_experts, size=len(specific),
                                                                              replace=False))
            if donor is not None:
                methods["random_hr"][str(layer)] = selection["specific"][donor]
        selected[target] = methods
    table = pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                       "expert": pl.Int32, "top_lang": pl.String, "top_share": pl.Float64,
                                       "second_share": pl.Float64, "gap": pl.Float64, "specific_lang": pl.String,
                                       "mean_share": pl.Float64, "shared_rank": pl.Int64, "shared": pl.Boolean})
    return table, selected


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

def _integer_layers(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _steps_cmap(steps):
    plt = pyplot()
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(1, len(steps) - 1)) for i, s in enumerate(steps)}


def plot_entropy(ent: pl.DataFrame, path, base_language: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = sorted(ent["checkpoint_step"].unique().to_list())
    colors = _steps_cmap(steps)
    for step in steps:
        frame = ent.filter(pl.col("checkpoint_step") == step)
        base = frame.filter(pl.col("lang") == base_language).sort("layer")
        rest = frame.filter(pl.col("lang") != base_language).group_by("layer").agg(pl.col("entropy").mean()).sort("layer")
        if base.height:
            ax.plot(base["layer"], base["entropy"], "-o", color=colors[step], label=f"step {step}: {base_language}")
        ax.plot(rest["layer"], rest["entropy"], "--s", color=colors[step], label=f"step {step}: mean of others")
    _integer_layers(ax)
    ax.set_ylabel("routing entropy (nats)")
    ax.set_title("Routing entropy per layer")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_per_checkpoint(frame: pl.DataFrame, column: str, path, ylabel: str, title: str) -> None:
    """``column`` against the layer, one line per checkpoint."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = sorted(frame["checkpoint_step"].unique().to_list())
    colors = _steps_cmap(steps)
    for step in steps:
        part = frame.filter(pl.col("checkpoint_step") == step).sort("layer")
        ax.plot(part["layer"], part[column], "-o", color=colors[step], label=f"step {step}")
    _integer_layers(ax)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_jsd_dynamics(jsd_mean: pl.DataFrame, path, base_language: str) -> None:
    """Mean pairwise JSD per layer, a line per checkpoint: over every language (left) and over the
    high-resource languages only, with the base language (solid) and without it (dashed; the authors'
    Fig. 5) on the right, when those rows exist."""
    plt = pyplot()
    hr_rows = jsd_mean.filter(pl.col("languages").str.starts_with("high_resource"))
    panels = [("all", None, "all languages")]
    if hr_rows.height:
        panels.append(("high_resource", f"high_resource_without_{base_language}", "high-resource languages"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    steps = sorted(jsd_mean["checkpoint_step"].unique().to_list())
    colors = _steps_cmap(steps)
    for ax, (solid, dashed, title) in zip(axes[0], panels):
        for step in steps:
            at_step = jsd_mean.filter(pl.col("checkpoint_step") == step)
            part = at_step.filter(pl.col("languages") == solid).sort("layer")
            label = f"step {step}" if dashed is None else f"step {step}: with {base_language}"
            ax.plot(part["layer"], part["mean_jsd"], "-o", color=colors[step], label=label)
            if dashed is not None:
                part = at_step.filter(pl.col("languages") == dashed).sort("layer")
                ax.plot(part["layer"], part["mean_jsd"], "--s", color=colors[step],
                        label=f"step {step}: without {base_language}")
        _integer_layers(ax)
        ax.set_ylabel("mean pairwise JSD (nats)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Routing divergence, {title}")
        ax.legend(fontsize=7, ncol=2 if dashed else 1)
    save_figure(fig, path)


def plot_jsd_heatmap(jsd_table: pl.DataFrame, path, languages: list[str]) -> None:
    plt = pyplot()
    last_step = jsd_table["checkpoint_step"].max()
    frame = jsd_table.filter(pl.col("checkpoint_step") == last_step)
    layer = frame["layer"].max()
    frame = frame.filter(pl.col("layer") == layer)
    langs = [l for l in languages if l in set(frame["lang_a"]) | set(frame["lang_b"])]
    index = {l: i for i, l in enumerate(langs)}
    grid = np.zeros((len(langs), len(langs)))
    for a, b, v in frame.select("lang_a", "lang_b", "jsd").iter_rows():
        grid[index[a], index[b]] = grid[index[b], index[a]] = v
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(grid, cmap="magma")
    ax.set_xticks(range(len(langs)), langs, rotation=90)
    ax.set_yticks(range(len(langs)), langs)
    for i in range(len(langs)):
        for j in range(len(langs)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if grid[i, j] < grid.max() * 0.6 else "black")
    ax.set_title(f"Routing JSD, layer {layer}, step {last_step}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="JSD (nats)")
    save_figure(fig, path)


def plot_jsd_overlap(jsd_table: pl.DataFrame, overlap: pl.DataFrame, summary: pl.DataFrame, path,
                     measure: str = "jaccard", high_resource: list[str] | None = None, targets=None) -> None:
    """The last checkpoint's pairs, coloured by type (HR-HR, HR-LR; LR-LR grey: the authors exclude
    them), with the least-squares line over the pairs the r is reported for (the authors' pairs when
    the summary has them, else all) and each set's Pearson r in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    if summary.height:
        last = summary.filter((pl.col("checkpoint_step") == summary["checkpoint_step"].max())
                              & (pl.col("measure") == measure))
        layer = int(last["layer"][0]) if last.height else int(jsd_table["layer"].max())
        step = summary["checkpoint_step"].max()
        frame = jsd_table.filter((pl.col("checkpoint_step") == step) & (pl.col("layer") == layer))
        joined = frame.join(overlap.filter(pl.col("measure") == measure), on=["lang_a", "lang_b"])
        hr, lr = set(high_resource or []), set(targets or [])
        kinds = np.array([pair_type(a, b, hr, lr) if hr and lr else "other"
                          for a, b in zip(joined["lang_a"], joined["lang_b"])])
        x, y = joined["value"].to_numpy(), joined["jsd"].to_numpy()
        r_of = {p: r for p, r, n in last.select("pairs", "pearson_r", "n_pairs").iter_rows()} if last.height else {}
        n_of = dict(last.select("pairs", "n_pairs").iter_rows()) if last.height else {}
        styles = {"hr_hr": ("tab:blue", "HR-HR"), "hr_lr": ("tab:orange", "HR-LR"),
                  "lr_lr": ("lightgrey", "LR-LR (excluded)"), "other": ("tab:green", "pairs")}
        for kind, (color, name) in styles.items():
            pick = kinds == kind
            if pick.any():
                r = r_of.get(kind)
                label = f"{name}, r = {r:.2f} (n = {n_of[kind]})" if r is not None else name
                ax.scatter(x[pick], y[pick], s=18, color=color, label=label)
        for a, b, xi, yi in zip(joined["lang_a"], joined["lang_b"], x, y):
            ax.annotate(f"{a}-{b}", (xi, yi), fontsize=6, alpha=0.7)
        fit_set = "without_lr_lr" if "without_lr_lr" in r_of else "all"
        fit = np.isin(kinds, ["hr_hr", "hr_lr"]) if fit_set == "without_lr_lr" else np.ones(len(x), dtype=bool)
        if fit.sum() >= 2 and np.ptp(x[fit]) > 0:
            slope, intercept = np.polyfit(x[fit], y[fit], 1)
            xs = np.linspace(x[fit].min(), x[fit].max(), 10)
            name = "HR-HR + HR-LR" if fit_set == "without_lr_lr" else "all pairs"
            ax.plot(xs, slope * xs + intercept, "r-",
                    label=f"fit over {name}, r = {r_of.get(fit_set, float('nan')):.2f} (n = {int(fit.sum())})")
        if fit_set == "without_lr_lr" and "all" in r_of:
            ax.plot([], [], " ", label=f"all pairs: r = {r_of['all']:.2f} (n = {n_of['all']})")
        ax.legend(fontsize=7)
        ax.set_title(f"Routing JSD vs token overlap, layer {layer}, step {step}")
    ax.set_xlabel(f"token overlap ({measure})")
    ax.set_ylabel("routing JSD (nats)")
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def run_metrics(profile_paths: list[str | Path], overlap_path: str | Path, options: RoutingMetricsOptions | dict, out_dir: str | Path,
                selected_path: str | Path) -> dict:
    """Compute every metric table, the expert selection and the plots."""
    options = RoutingMetricsOptions.coerce(options)
    out_dir = Path(out_dir)
    profiles = read_profiles(profile_paths)
    languages = options.languages
    base = options.base_language
    high_resource = options.high_resource
    tables = metric_tables(profiles, languages, base, high_resource)
    overlap = pl.read_parquet(overlap_path)
    tables["jsd_overlap"] = jsd_overlap_table(tables["jsd"], overlap, options.jsd_overlap_layer,
                                              high_resource, list(options.targets))
    model, step = options.selection_model or _last_checkpoint(profiles)
    profiled = set(profiles["lang"].unique())
    # a target without a profile was dropped by the corpus stage: nothing to adapt it on
    targets = {t: p for t, p in options.targets.items() if t in profiled}
    experts, selected = expert_selection(profiles, model, step, options.high_resource, targets, options,
                                         options.seed)
    tables["experts"] = experts
    for name, table in tables.items():
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            table.write_parquet(tmp, compression="zstd")
    write_json(selected, selected_path)
    notice = empty_set_notice(selected, options)
    if notice:  # before any adaptation job: the sets are known from here on
        log.warning("%s", notice)
    plot_entropy(tables["entropy"], out_dir / "entropy.png", base)
    plot_jsd_dynamics(tables["jsd_mean"], out_dir / "jsd_dynamics.png", base)
    plot_jsd_heatmap(tables["jsd"], out_dir / "jsd_heatmap.png", languages)
    plot_per_checkpoint(tables["specialization"], "score", out_dir / "specialization.png", "I(L; E) / H(L)",
                        "Language specialisation of routing per layer")
    plot_jsd_overlap(tables["jsd"], overlap, tables["jsd_overlap"], out_dir / "jsd_overlap.png",
                     high_resource=high_resource, targets=list(options.targets))
    spec = tables["specialization"].filter(pl.col("checkpoint_step") == step).sort("layer")
    log.info("routing metrics: specialisation by layer at step %d: %s", step,
             ", ".join(f"{l}: {s:.3f}" for l, s in spec.select("layer", "score").iter_rows()))
    return {"selection_model": [model, step], "targets": sorted(selected)}


def _last_checkpoint(profiles: pl.DataFrame) -> tuple[str, int]:
    row = profiles.select("model", "checkpoint_step").unique().sort("checkpoint_step").row(-1)
    return row[0], int(row[1])

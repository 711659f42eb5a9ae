"""Stage: routing metrics (section A of the project's science notes), from the routing profiles.

With ``c_l(e)`` the number of language-``l`` tokens that had expert ``e`` among their top-k at a layer
and ``q_l = c_l / sum_e c_l(e)`` its normalised distribution:

* **entropy** ``H(l) = -sum_e q_l(e) ln q_l(e)`` (nats), per (model, checkpoint, language, layer);
* **Jensen-Shannon divergence** ``JSD(a, b) = 1/2 KL(q_a || m) + 1/2 KL(q_b || m)``, ``m = (q_a + q_b)/2``,
  natural log (equal to ``scipy.spatial.distance.jensenshannon(q_a, q_b) ** 2``), per pair ``a < b``
  in config order, and its mean over pairs per layer, over all languages and without English;
* **language-specialisation score** ``I(L; E) / H(L)`` in bits from the language x expert count table
  (``P(l, e) = c_l(e) / sum c``): 0 when experts say nothing about the language, 1 when they identify it;
* **JSD vs vocabulary overlap**: at one layer (default: the last MoE layer), Pearson and Spearman r
  between pairwise JSD and pairwise overlap (each overlap measure), with the number of pairs;
* **expert selection** in the final ``K`` MoE layers of the selection model: activation shares
  ``a_l(e) = c_l(e) / sum_e' c_l(e')`` over the high-resource languages; an expert is *specific* to its
  top language when the share gap to the second language is at least ``alpha``; *shared* experts are
  the top ``k`` by mean share; a target language takes its parent's experts.

Outputs (``results/routing/metrics/``)
--------------------------------------
``entropy.parquet``: model, checkpoint_step, lang, layer, entropy.
``jsd.parquet``: model, checkpoint_step, layer, lang_a, lang_b, jsd.
``jsd_mean.parquet``: model, checkpoint_step, layer, languages (``all`` | ``without_en``), mean_jsd, n_pairs.
``specialization.parquet``: model, checkpoint_step, layer, score.
``jsd_overlap.parquet``: model, checkpoint_step, layer, measure, pearson_r, pearson_p, spearman_r,
spearman_p, n_pairs.
``experts.parquet``: model, checkpoint_step, layer, expert, top_lang, top_share, second_share, gap,
specific_lang (null unless gap >= alpha), mean_share, shared_rank, shared.
``results/routing/selected_experts.json``: ``{target_lang: {method: {layer: [expert ids]}}}`` with
methods ``ssft`` (parent-specific + shared), ``seft`` (parent-specific), ``seft_top{N}`` (the N experts
with the largest parent share gap), ``random`` (as many random experts per layer as ``ssft``, seeded).
Plots: ``entropy.png``, ``jsd_dynamics.png``, ``jsd_heatmap.png``, ``specialization.png``,
``jsd_overlap.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, save_figure, write_json

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
    return {"specific": specific, "shared": sorted(int(e) for e in shared_order[:shared_k]), "per_expert": per_expert}


def top_by_gap(shares: dict[str, np.ndarray], lang: str, n: int) -> list[int]:
    """The ``n`` experts with the largest share gap of ``lang`` over the best other language."""
    others = np.stack([v for l, v in shares.items() if l != lang]) if len(shares) > 1 else np.zeros((1, len(shares[lang])))
    gap = shares[lang] - others.max(axis=0)
    return sorted(int(e) for e in np.argsort(-gap, kind="stable")[:n])


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


def metric_tables(profiles: pl.DataFrame, languages: list[str], base_language: str = "en") -> dict[str, pl.DataFrame]:
    """Entropy, pairwise JSD, mean JSD and specialisation for every (model, checkpoint, layer)."""
    order = {lang: i for i, lang in enumerate(languages)}
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
        for subset, keep in (("all", lambda a, b: True), (f"without_{base_language}",
                                                           lambda a, b: base_language not in (a, b))):
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


def jsd_overlap_table(jsd_table: pl.DataFrame, overlap: pl.DataFrame, layer: int | None) -> pl.DataFrame:
    """Pearson and Spearman r between pairwise JSD at ``layer`` (default: the last profiled layer) and
    each symmetric overlap measure."""
    from scipy import stats

    rows = []
    symmetric = overlap.filter(pl.col("measure").is_in(["jaccard", "weighted"]))
    for (model, step), frame in jsd_table.group_by(["model", "checkpoint_step"], maintain_order=True):
        at = layer if layer is not None else int(frame["layer"].max())
        pairs = frame.filter(pl.col("layer") == at)
        joined = pairs.join(symmetric, on=["lang_a", "lang_b"], how="inner")
        for measure, part in joined.group_by("measure", maintain_order=True):
            n = part.height
            x, y = part["value"].to_numpy(), part["jsd"].to_numpy()
            if n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                pr, pp = stats.pearsonr(x, y)
                sr, sp = stats.spearmanr(x, y)
            else:
                pr = pp = sr = sp = float("nan")
            rows.append((model, step, at, measure[0] if isinstance(measure, tuple) else measure,
                         float(pr), float(pp), float(sr), float(sp), n))
    return pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                      "measure": pl.String, "pearson_r": pl.Float64, "pearson_p": pl.Float64,
                                      "spearman_r": pl.Float64, "spearman_p": pl.Float64, "n_pairs": pl.Int64},
                        orient="row").sort("model", "checkpoint_step", "measure")


def expert_selection(profiles: pl.DataFrame, model: str, step: int, high_resource: list[str],
                     targets: dict[str, str], options: dict, seed: int) -> tuple[pl.DataFrame, dict]:
    """experts.parquet rows and selected_experts.json for the final K MoE layers of one model."""
    groups = {k: v for k, v in _groups(profiles).items() if k[0] == model and k[1] == step}
    if not groups:
        raise MoelangError(f"routing metrics: no profile of model '{model}' step {step} to select experts from")
    layers = sorted(k[2] for k in groups)[-options["final_layers"]:]
    rows, chosen = [], {}
    for layer in layers:
        by_lang = groups[(model, step, layer)]
        hr = [l for l in high_resource if l in by_lang and by_lang[l].sum() > 0]
        if len(hr) < 2:
            raise MoelangError(f"routing metrics: expert selection needs at least two high-resource languages with "
                               f"profiles; have {hr}")
        shares = {l: normalise(by_lang[l]) for l in hr}
        selection = select_experts(shares, options["alpha"], options["shared_k"])
        for record in selection["per_expert"]:
            rows.append({"model": model, "checkpoint_step": step, "layer": layer, **record})
        chosen[layer] = (shares, selection)
    rng = np.random.default_rng(seed)
    selected: dict = {}
    top_n = options["top_n"]
    for target, parent in targets.items():
        methods: dict[str, dict[str, list[int]]] = {"ssft": {}, "seft": {}, f"seft_top{top_n}": {}, "random": {}}
        for layer, (shares, selection) in chosen.items():
            if parent not in shares:
                break
            specific = selection["specific"][parent]
            ssft = sorted(set(specific) | set(selection["shared"]))
            n_experts = len(shares[parent])
            methods["seft"][str(layer)] = specific
            methods["ssft"][str(layer)] = ssft
            methods[f"seft_top{top_n}"][str(layer)] = top_by_gap(shares, parent, min(top_n, n_experts))
            methods["random"][str(layer)] = sorted(int(e) for e in rng.choice(n_experts, size=len(ssft), replace=False))
        else:
            selected[target] = methods
    table = pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                       "expert": pl.Int32, "top_lang": pl.String, "top_share": pl.Float64,
                                       "second_share": pl.Float64, "gap": pl.Float64, "specific_lang": pl.String,
                                       "mean_share": pl.Float64, "shared_rank": pl.Int64, "shared": pl.Boolean})
    return table, selected


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_layers(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _steps_cmap(steps):
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(1, len(steps) - 1)) for i, s in enumerate(steps)}


def plot_entropy(ent: pl.DataFrame, path, base_language: str) -> None:
    plt = _plt()
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
    plt = _plt()
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


def plot_jsd_heatmap(jsd_table: pl.DataFrame, path, languages: list[str]) -> None:
    plt = _plt()
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
                     measure: str = "jaccard") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if summary.height:
        last = summary.filter(pl.col("checkpoint_step") == summary["checkpoint_step"].max())
        row = last.filter(pl.col("measure") == measure)
        layer = int(row["layer"][0]) if row.height else int(jsd_table["layer"].max())
        frame = jsd_table.filter((pl.col("checkpoint_step") == last["checkpoint_step"][0]) & (pl.col("layer") == layer))
        joined = frame.join(overlap.filter(pl.col("measure") == measure), on=["lang_a", "lang_b"])
        x, y = joined["value"].to_numpy(), joined["jsd"].to_numpy()
        ax.scatter(x, y, s=18)
        for a, b, xi, yi in zip(joined["lang_a"], joined["lang_b"], x, y):
            ax.annotate(f"{a}-{b}", (xi, yi), fontsize=6, alpha=0.7)
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 10)
            r = row["pearson_r"][0] if row.height else float("nan")
            ax.plot(xs, slope * xs + intercept, "r-", label=f"fit, Pearson r = {r:.2f} (n = {len(x)})")
            ax.legend(fontsize=8)
        ax.set_title(f"Routing JSD vs token overlap, layer {layer}")
    ax.set_xlabel(f"token overlap ({measure})")
    ax.set_ylabel("routing JSD (nats)")
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def run_metrics(profile_paths: list[str | Path], overlap_path: str | Path, options: dict, out_dir: str | Path,
                selected_path: str | Path) -> dict:
    """Compute every metric table, the expert selection and the plots."""
    out_dir = Path(out_dir)
    profiles = read_profiles(profile_paths)
    languages = options["languages"]
    base = options["base_language"]
    tables = metric_tables(profiles, languages, base)
    overlap = pl.read_parquet(overlap_path)
    tables["jsd_overlap"] = jsd_overlap_table(tables["jsd"], overlap, options.get("jsd_overlap_layer"))
    model, step = options.get("selection_model") or _last_checkpoint(profiles)
    profiled = set(profiles["lang"].unique())
    # a target without a profile was dropped by the corpus stage: nothing to adapt it on
    targets = {t: p for t, p in options["targets"].items() if t in profiled}
    experts, selected = expert_selection(profiles, model, step, options["high_resource"], targets, options,
                                         options["seed"])
    tables["experts"] = experts
    for name, table in tables.items():
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            table.write_parquet(tmp, compression="zstd")
    write_json(selected, selected_path)
    plot_entropy(tables["entropy"], out_dir / "entropy.png", base)
    plot_per_checkpoint(tables["jsd_mean"].filter(pl.col("languages") == "all"), "mean_jsd", out_dir / "jsd_dynamics.png",
                        "mean pairwise JSD (nats)", "Routing divergence between languages across checkpoints")
    plot_jsd_heatmap(tables["jsd"], out_dir / "jsd_heatmap.png", languages)
    plot_per_checkpoint(tables["specialization"], "score", out_dir / "specialization.png", "I(L; E) / H(L)",
                        "Language specialisation of routing per layer")
    plot_jsd_overlap(tables["jsd"], overlap, tables["jsd_overlap"], out_dir / "jsd_overlap.png")
    spec = tables["specialization"].filter(pl.col("checkpoint_step") == step).sort("layer")
    log.info("routing metrics: specialisation by layer at step %d: %s", step,
             ", ".join(f"{l}: {s:.3f}" for l, s in spec.select("layer", "score").iter_rows()))
    return {"selection_model": [model, step], "targets": sorted(selected)}


def _last_checkpoint(profiles: pl.DataFrame) -> tuple[str, int]:
    row = profiles.select("model", "checkpoint_step").unique().sort("checkpoint_step").row(-1)
    return row[0], int(row[1])

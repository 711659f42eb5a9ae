"""Stage 3, overlap: token-vocabulary overlap between every pair of languages.

From each language's token frequencies (``results/tokens/{lang}.freq.parquet``), with counts
``c_a(t)`` and relative frequencies ``p_a(t) = c_a(t) / sum_t c_a(t)``:

``jaccard``
    ``|T_a & T_b| / |T_a | T_b|`` over the token-type sets ``T_a = {t : c_a(t) >= min_count}``.
``weighted``
    ``sum_t min(p_a(t), p_b(t))``: the probability mass the two unigram distributions share
    (1 - total variation distance). Symmetric, in [0, 1].
``coverage``
    directed: ``sum_{t : c_b(t) > 0} p_a(t)``, the share of language a's token occurrences whose type
    also occurs in b.

Output ``results/overlap/overlap.parquet``: ``lang_a`` string, ``lang_b`` string, ``measure`` string,
``value`` float64, one row per ordered pair (the diagonal included, where every measure is 1) and
measure; and ``results/overlap/overlap.png``, one heatmap per measure.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from moelang.config import check_lang
from moelang.errors import MoelangError
from moelang.io import atomic_path, log, pyplot, save_figure

MEASURES = ("jaccard", "weighted", "coverage")
OVERLAP_SCHEMA = {"lang_a": pl.String, "lang_b": pl.String, "measure": pl.String, "value": pl.Float64}


def read_frequencies(paths: dict[str, str | Path]) -> pl.DataFrame:
    """Stack the per-language frequency files into one (lang, token_id, count) frame."""
    frames = []
    for lang, path in paths.items():
        check_lang(lang)
        frame = pl.read_parquet(path, columns=["token_id", "count"])
        if frame.height == 0 or frame["count"].sum() == 0:
            raise MoelangError(f"overlap: language '{lang}' has no tokens in '{path}'; drop it from the languages or "
                               f"fix its corpus")
        frames.append(frame.with_columns(pl.lit(lang).alias("lang")))
    return pl.concat(frames).select("lang", "token_id", "count")


def overlap(freqs: pl.DataFrame, min_count: int = 1, languages: list[str] | None = None) -> pl.DataFrame:
    """All measures for every ordered language pair of ``freqs`` (lang, token_id, count)."""
    langs = languages or freqs["lang"].unique(maintain_order=True).to_list()
    freqs = freqs.filter(pl.col("count") > 0).with_columns(
        (pl.col("count") / pl.col("count").sum().over("lang")).alias("p"),
        (pl.col("count") >= min_count).alias("in_set"),
    )
    n_types = freqs.group_by("lang").agg(pl.col("in_set").sum().alias("n_types"))
    # One row per (lang_a, lang_b, shared type): at most (#languages)^2 x vocabulary rows.
    shared = (
        freqs.join(freqs, on="token_id", suffix="_b")
        .group_by("lang", "lang_b")
        .agg(
            (pl.col("in_set") & pl.col("in_set_b")).sum().alias("n_shared"),
            pl.min_horizontal("p", "p_b").sum().alias("weighted"),
            pl.col("p").sum().alias("coverage"),
        )
        .rename({"lang": "lang_a"})
    )
    pairs = pl.DataFrame({"lang_a": langs}).join(pl.DataFrame({"lang_b": langs}), how="cross")
    table = (
        pairs.join(shared, on=["lang_a", "lang_b"], how="left")
        .join(n_types.rename({"lang": "lang_a", "n_types": "n_a"}), on="lang_a", how="left")
        .join(n_types.rename({"lang": "lang_b", "n_types": "n_b"}), on="lang_b", how="left")
        .with_columns(pl.col("n_shared", "weighted", "coverage").fill_null(0))
        .with_columns(
            pl.when(pl.col("n_a") + pl.col("n_b") - pl.col("n_shared") > 0)
            .then(pl.col("n_shared") / (pl.col("n_a") + pl.col("n_b") - pl.col("n_shared")))
            .otherwise(0.0)
            .alias("jaccard")
        )
    )
    order = {lang: i for i, lang in enumerate(langs)}
    return (
        table.unpivot(index=["lang_a", "lang_b"], on=list(MEASURES), variable_name="measure", value_name="value")
        .with_columns(pl.col("value").cast(pl.Float64))
        .with_columns(
            pl.col("measure").replace_strict({m: i for i, m in enumerate(MEASURES)}).alias("_m"),
            pl.col("lang_a").replace_strict(order).alias("_a"),
            pl.col("lang_b").replace_strict(order).alias("_b"),
        )
        .sort("_m", "_a", "_b")
        .select(list(OVERLAP_SCHEMA))
        .cast(OVERLAP_SCHEMA)
    )


def plot_overlap(table: pl.DataFrame, path: str | Path, languages: list[str]) -> None:
    plt = pyplot()
    import numpy as np

    n = len(languages)
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5.2 * len(MEASURES), 4.6), constrained_layout=True)
    index = {lang: i for i, lang in enumerate(languages)}
    titles = {"jaccard": "Jaccard of token types", "weighted": "shared probability mass",
              "coverage": "coverage of row language by column"}
    for ax, measure in zip(axes, MEASURES):
        grid = np.full((n, n), np.nan)
        for a, b, v in table.filter(pl.col("measure") == measure).select("lang_a", "lang_b", "value").iter_rows():
            grid[index[a], index[b]] = v
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), languages, rotation=90)
        ax.set_yticks(range(n), languages)
        ax.set_title(titles[measure])
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < 0.6 else "black")
        fig.colorbar(image, ax=ax, shrink=0.8, label="overlap (0: none, 1: identical)")
        ax.set_xlabel("language")
        ax.set_ylabel("language")
    fig.suptitle("Token-vocabulary overlap between languages")
    save_figure(fig, path)


def run_overlap(freq_paths: dict[str, str | Path], out_table: str | Path, out_plot: str | Path | None,
                min_count: int = 1) -> pl.DataFrame:
    languages = list(freq_paths)
    table = overlap(read_frequencies(freq_paths), min_count=min_count, languages=languages)
    with atomic_path(out_table) as tmp:
        table.write_parquet(tmp, compression="zstd")
    if out_plot:
        plot_overlap(table, out_plot, languages)
    log.info("overlap: %d languages, %d rows", len(languages), table.height)
    return table

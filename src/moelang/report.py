"""Stage report: one readable account of a run, with both papers' findings checked by its numbers.

``moelang report`` (rule ``report``, part of ``rule all``) reads the tables the stages wrote and writes

* ``results/report.md``: the run in words, tables and figures (links to ``report/*.png``), findings first;
* ``results/report/*.png``: its figures (:data:`FIGURES`: name, section, what it shows), each with a
  title, labelled axes with units, a legend and the languages named;
* ``results/report/summary.html``: the findings and tables of ``report.md`` as one HTML page (the
  Snakemake HTML report, ``snakemake --report results/report.html``, shows it beside the figures);
* ``results/report/findings.parquet``: one row per finding (:data:`FINDINGS_SCHEMA`).

Findings
--------
Each finding is computed from the run, never written by hand: a sentence with the numbers behind it
and a status, ``pass``, ``fail`` or ``not computed`` (the stage it needs did not run, e.g. adaptation
off). A tiny CPU run may fail some; the report says so plainly and shows the numbers either way.

1. *After continual pre-training the final layers are more language-specialised than the early and
   middle ones* (routing paper): at the last CPT checkpoint, the mean specialisation score
   I(L;E)/H(L) of the final ``routing.final_layers`` MoE layers is above the mean of the other MoE
   layers, and that lead is larger than at the first checkpoint (the base model), so that it is
   CPT's doing.
2. *Routing divergence correlates negatively with vocabulary overlap*: at the last checkpoint and the
   layer of ``jsd_overlap.parquet``, the Pearson r between pairwise routing JSD and Jaccard token
   overlap over the authors' pairs (HR-HR and HR-LR; all pairs when there are no targets) is negative
   with p < 0.05 (pairs share languages, so the p-value is optimistic; the report says so).
3. *SSFT, training under 2 % of OLMoE-1B-7B's parameters, is competitive with AEFT (the whole final
   layers) on MultiBLiMP and Belebele: it recovers at least 90 % of AEFT's target-language gain*:
   (a) SSFT's trainable fraction on ``report.reference_model`` (OLMoE-1B-7B, built on the meta device: no
   weights), in its final layers with their routers, counted by the adaptation stage's own method
   (:class:`~moelang.models.methods.ExpertSubset`); the largest over the targets is below
   ``report.ssft_max_fraction``. When the run's model has the reference's experts per layer (64) the
   run's SSFT sets are counted as they are (*computed directly*); otherwise (*extrapolated*, and the
   report says so) the run's language-specific (SEFT) experts as a share of its layer's experts are
   scaled to the reference's layer (steps of 1/8 with 8 experts a layer), plus ``report.reference_shared_k``
   shared experts (the paper's k = 5; the run's own ``shared_k`` is sized for its small model). Beside it,
   the authors' own SSFT (11 + 11 experts in layers 14 and 15 of OLMoE-1B-7B, :data:`AUTHORS_SSFT_EXPERTS`)
   by the same count (2.004 %). (b) For each task family evaluated (``synthetic_blimp`` and
   ``synthetic_belebele`` in the default, ``multiblimp`` and ``belebele`` on a cluster) and for test-split
   perplexity: SSFT's mean gain over the adapted targets as a share of AEFT's (:func:`gain_recovery`;
   accuracy gain ``value - start``, perplexity gain ``log(start / value)``; undefined when AEFT's mean
   gain is not positive), at least ``report.ssft_min_gain_share``. The claim is on task scores: every
   evaluated task family must pass; perplexity decides only when no task family was evaluated, and is
   shown beside the tasks either way. The statement names which quantities passed.
4. *LayerMoE's allocation uses fewer new experts than the uniform one for equal or better new-language
   perplexity, and the classifier reduces forgetting on the old languages*: the variant with the
   ``layermoe`` plan and a classifier has fewer new experts than the ``uniform`` plan's variant and a
   new-language perplexity (geometric mean) at most ``1 + report.ppl_tolerance`` times it; and its
   old-language perplexity change is below that of the ``layermoe`` plan without a classifier. Not
   computed when the uniform plan has LayerMoE's budget (``allocation.uniform_per_layer`` null). The
   classifier clause is computed only when the classifier learned: its held-out accuracy
   (``expand/runs.parquet``, test split) beats the majority-class baseline by at least
   ``report.classifier_min_margin`` in every classifier layer; otherwise the finding says it did not
   learn, with the numbers, and is not computed (fail when its other clauses fail). The sentence names
   the classifier's decision (causal or whole-sequence) and pooling.

``findings.parquet``

| column | type | meaning |
|---|---|---|
| ``finding`` | int64 | 1 to 4, as above |
| ``claim`` | string | the papers' claim |
| ``status`` | string | ``pass``, ``fail`` or ``not computed`` |
| ``statement`` | string | the sentence of the report, with its numbers |
| ``evidence`` | string | the numbers as a JSON object |
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, progress, pyplot, save_figure
from moelang.options import ReportOptions

FINDINGS_SCHEMA = {"finding": pl.Int64, "claim": pl.String, "status": pl.String, "statement": pl.String,
                   "evidence": pl.String}
PASS, FAIL, NOT_COMPUTED = "pass", "fail", "not computed"
MARK = {PASS: "PASS", FAIL: "FAIL", NOT_COMPUTED: "not computed"}
CLAIMS = {
    1: "After continual pre-training the final layers are more language-specialised than the early and middle ones.",
    2: "Routing divergence correlates negatively with vocabulary overlap.",
    3: "SSFT, training under 2% of OLMoE-1B-7B's parameters, is competitive with fine-tuning the whole final "
       "layers (AEFT) on MultiBLiMP and Belebele: it recovers at least 90% of AEFT's target-language gain.",
    4: "LayerMoE's allocation uses fewer new experts than the uniform one for equal or better new-language "
       "perplexity, and the router classifier reduces forgetting on the old languages.",
}


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its file (``results/report/<name>.png``), the report section it
    belongs to (the Snakemake report's category) and which stage must have run."""

    name: str
    section: str
    needs: str  # "always", "routing", "adapt" or "expand"
    caption: str  # report.md's (the HTML report's longer one is workflow/report/<name>.rst)


FIGURES = (
    Figure("corpus", "1. Data", "always",
           "Documents and tokens per language and split (grey: dropped by the corpus stage)."),
    Figure("overlap", "1. Data", "always",
           "Token-vocabulary overlap between every pair of languages."),
    Figure("routing_entropy", "2. Routing dynamics", "routing",
           "Routing entropy per layer and checkpoint: the base language against the mean of the others."),
    Figure("routing_jsd", "2. Routing dynamics", "routing",
           "Mean pairwise routing Jensen-Shannon divergence per layer and checkpoint."),
    Figure("routing_specialization", "2. Routing dynamics", "routing",
           "Language specialisation score I(L;E)/H(L) per layer and checkpoint."),
    Figure("routing_jsd_heatmap", "2. Routing dynamics", "routing",
           "Pairwise routing JSD at the last layer of the last checkpoint."),
    Figure("routing_jsd_overlap", "2. Routing dynamics", "routing",
           "Routing JSD against token overlap per language pair, with Pearson r per pair type."),
    Figure("experts", "3. Experts chosen", "routing",
           "The experts each adaptation method trains, per target and final layer."),
    Figure("similarity", "4. Similarity and allocation", "always",
           "Cross-lingual similarity per layer: old-old, new-old and new-new pairs and the layer score S."),
    Figure("allocation", "4. Similarity and allocation", "always",
           "New experts per layer of every allocation method, with the layer score S."),
    Figure("evaluation", "5. Results", "always",
           "Every evaluated model: test perplexity and task scores on high-resource and target languages."),
    Figure("adaptation", "5. Results", "adapt",
           "Target-language gain against the trainable fraction, per adaptation method and target."),
    Figure("expansion", "5. Results", "expand",
           "Per expansion variant: new-language gain, old-language forgetting and new experts added."),
)
"""Every figure the report can have, in report order."""


def report_figures(routing: bool, adapt: bool, expand: bool) -> list[Figure]:
    """The figures of a run with these stages (the rule's outputs)."""
    on = {"always": True, "routing": routing, "adapt": adapt, "expand": expand}
    return [figure for figure in FIGURES if on[figure.needs]]


@dataclass
class ReportInputs:
    """The stage outputs the report reads; None where the stage did not run."""

    corpus_summary: Path
    token_files: list[Path]
    overlap: Path
    similarity: Path
    plan: Path
    plan_json: Path
    results: Path
    tasks: Path
    routing_metrics: Path | None = None
    selected_experts: Path | None = None
    adaptation: Path | None = None
    adapt_runs: Path | None = None
    expansion: Path | None = None
    expand_runs: Path | None = None

    def check(self) -> None:
        """Every given input exists (one line naming the first that does not, before any work)."""
        for name, value in vars(self).items():
            paths = value if isinstance(value, list) else [value]
            for path in paths:
                if path is not None and not Path(path).exists():
                    raise MoelangError(f"report: the {name.replace('_', ' ')} input '{path}' does not exist; run the "
                                       f"stage that writes it first (snakemake {path})")


# --------------------------------------------------------------------------------------------------
# Document blocks: one structure rendered as Markdown (report.md) and HTML (summary.html)
# --------------------------------------------------------------------------------------------------

@dataclass
class Document:
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def items(self, lines: list[str]) -> None:
        if lines:
            self.blocks.append(("items", list(lines)))

    def table(self, header: list[str], rows: list[list]) -> None:
        if rows:
            self.blocks.append(("table", list(header), [[_cell(v) for v in row] for row in rows]))

    def figure(self, name: str, caption: str) -> None:
        self.blocks.append(("figure", name, caption))

    def markdown(self, figure_dir: str) -> str:
        out: list[str] = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "text":
                out.append(block[1])
            elif kind == "items":
                out.append("\n".join(f"- {line}" for line in block[1]))
            elif kind == "table":
                header, rows = block[1], block[2]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "figure":
                out.append(f"![{block[2]}]({figure_dir}/{block[1]}.png)\n\n*{block[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        """The page without its figures (the Snakemake report shows those as its own items)."""
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:70em;margin:1em auto;line-height:1.4}"
               "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
               "text-align:left;font-size:90%}th{background:#eee}.pass{color:#060;font-weight:bold}"
               ".fail{color:#a00;font-weight:bold}</style></head><body>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "text":
                out.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "items":
                out.append("<ul>" + "".join(f"<li>{_inline_html(line)}</li>" for line in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>"
                               for row in block[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "figure":
                out.append(f"<p><em>Figure {html.escape(block[1])}: {html.escape(block[2])}</em></p>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Markdown's **bold** and `code` as HTML; everything else escaped."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", lambda m: f"<strong class='{m.group(1).lower()}'>{m.group(1)}</strong>"
                     if m.group(1) in ("PASS", "FAIL") else f"<strong>{m.group(1)}</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return str(value)


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"x{value:.3f}"


# --------------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------------

@dataclass
class Finding:
    number: int
    status: str
    statement: str
    evidence: dict

    def row(self) -> dict:
        return {"finding": self.number, "claim": CLAIMS[self.number], "status": self.status,
                "statement": self.statement, "evidence": json.dumps(self.evidence, sort_keys=True)}


def _checkpoint_series(table: pl.DataFrame) -> pl.DataFrame:
    """The rows of the CPT series (model ``cpt``; without one, the table's first model): the routing
    metrics may also hold other profiled models."""
    models = table["model"].unique(maintain_order=True).to_list()
    return table.filter(pl.col("model") == ("cpt" if "cpt" in models else models[0]))


def _fmt_layers(scores: dict[int, float]) -> str:
    return ", ".join(f"layer {layer} {value:.3f}" for layer, value in sorted(scores.items()))


def finding_specialisation(specialization: pl.DataFrame | None, final_layers: int) -> Finding:
    """Finding 1 (see the module docstring)."""
    if specialization is None or specialization.height == 0:
        return Finding(1, NOT_COMPUTED, "Not computed: the routing stage did not run (routing.enabled is false).", {})
    specialization = _checkpoint_series(specialization)
    if specialization["checkpoint_step"].n_unique() < 2:
        return Finding(1, NOT_COMPUTED, "Not computed: the run profiled no checkpoint after continual pre-training "
                                        "(model.cpt).", {})
    last = int(specialization["checkpoint_step"].max())
    first = int(specialization["checkpoint_step"].min())
    at = {step: {int(layer): float(score) for layer, score in
                 specialization.filter(pl.col("checkpoint_step") == step).select("layer", "score").iter_rows()}
          for step in (first, last)}
    layers = sorted(at[last])
    k = min(final_layers, len(layers) - 1)
    if k < 1:
        return Finding(1, NOT_COMPUTED, f"Not computed: the model has {len(layers)} MoE layer(s); the claim compares "
                                        f"final layers with earlier ones.", {})
    final, earlier = layers[-k:], layers[:-k]
    final_mean = float(np.mean([at[last][layer] for layer in final]))
    earlier_mean = float(np.mean([at[last][layer] for layer in earlier]))
    first_gap = float(np.mean([at[first][layer] for layer in final]) - np.mean([at[first][layer] for layer in earlier]))
    grew = final_mean - earlier_mean > first_gap  # "after CPT": the final layers' lead is CPT's doing
    passed = final_mean > earlier_mean and grew
    evidence = {"checkpoint_step": last, "final_layers": final, "final_mean": final_mean, "earlier_layers": earlier,
                "first_step_gap": first_gap,
                "earlier_mean": earlier_mean, "scores": {str(k_): v for k_, v in at[last].items()},
                "first_step_scores": {str(k_): v for k_, v in at[first].items()}}
    final_words = f"layer {final[0]}" if k == 1 else f"layers {', '.join(map(str, final))}"
    earlier_words = f"layer {earlier[0]}" if len(earlier) == 1 else f"layers {', '.join(map(str, earlier))}"
    statement = (f"At CPT step {last} the final MoE {final_words} {'has' if k == 1 else 'have'} a "
                 f"{'' if k == 1 else 'mean '}specialisation score I(L;E)/H(L) of {final_mean:.3f}, "
                 f"{'above' if passed else 'not above'} the {earlier_mean:.3f} of {earlier_words} "
                 f"({_fmt_layers(at[last])}); the lead {'grew' if grew else 'did not grow'} over CPT "
                 f"({first_gap:+.3f} at step {first}: {_fmt_layers(at[first])}).")
    return Finding(1, PASS if passed else FAIL, statement, evidence)


def finding_divergence_overlap(jsd_overlap: pl.DataFrame | None, measure: str = "jaccard",
                               alpha: float = 0.05) -> Finding:
    """Finding 2 (see the module docstring)."""
    if jsd_overlap is None or jsd_overlap.height == 0:
        return Finding(2, NOT_COMPUTED, "Not computed: the routing stage did not run (routing.enabled is false).", {})
    last = _checkpoint_series(jsd_overlap).filter((pl.col("checkpoint_step") == pl.col("checkpoint_step").max())
                              & (pl.col("measure") == measure))
    by_pairs = {row["pairs"]: row for row in last.iter_rows(named=True)}
    pairs = "without_lr_lr" if "without_lr_lr" in by_pairs else "all"  # "all" only for a run without targets
    if pairs not in by_pairs or by_pairs[pairs]["pearson_r"] is None or math.isnan(by_pairs[pairs]["pearson_r"]):
        return Finding(2, NOT_COMPUTED, "Not computed: fewer than 3 language pairs have both a routing divergence and "
                                        "an overlap value.", {})
    row = by_pairs[pairs]
    r, p, n = float(row["pearson_r"]), float(row["pearson_p"]), int(row["n_pairs"])
    passed = r < 0 and p < alpha
    what = "HR-HR and HR-LR pairs (the authors' set)" if pairs == "without_lr_lr" else "all language pairs"
    others = "; ".join(f"{name.replace('_', '-').upper() if name in ('hr_hr', 'hr_lr') else name}: "
                       f"r = {float(other['pearson_r']):.2f} (n = {other['n_pairs']})"
                       for name, other in by_pairs.items() if name != pairs and other["pearson_r"] is not None
                       and not math.isnan(other["pearson_r"]))
    statement = (f"At CPT step {row['checkpoint_step']}, layer {row['layer']}, routing JSD against {measure} token "
                 f"overlap over {n} {what}: Pearson r = {r:.2f} (p = {p:.2g}), Spearman r = "
                 f"{float(row['spearman_r']):.2f}; {'negative and' if r < 0 else 'not negative,'} "
                 f"{'significant' if p < alpha else 'not significant'} at p < {alpha:g} (pairs share languages, "
                 f"so the p-value is optimistic" + (f"; {others})." if others else ")."))
    evidence = {"checkpoint_step": int(row["checkpoint_step"]), "layer": int(row["layer"]), "pairs": pairs,
                "measure": measure, "pearson_r": r, "pearson_p": p, "spearman_r": float(row["spearman_r"]),
                "n_pairs": n}
    return Finding(2, PASS if passed else FAIL, statement, evidence)


PAPER_MODEL = "allenai/OLMoE-1B-7B-0924"
AUTHORS_SSFT_EXPERTS = (11, 11)
"""The authors' own SSFT run: 11 experts in each of OLMoE-1B-7B's final two MoE layers (14 and 15;
authors-code.md: their run lists add k = 5 shared experts to the specific ones)."""


def count_on_reference(reference_model: str, n_layers: int, size_of) -> dict:
    """Trainable parameters when ``size_of(i, experts)`` experts (its first ones: the experts of a
    layer are the same size; never more than the layer has) train in the i-th of the last ``n_layers``
    MoE layers of ``reference_model``'s architecture (``experts``: that layer's expert count), with those
    layers' routers, counted as the adaptation stage's :class:`~moelang.models.methods.ExpertSubset`
    trains them (meta device, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moelang.models import ModelAdapter, count_parameters, load_config
    from moelang.models.methods import ExpertSubset

    config = load_config(reference_model, known_first=True)  # the architecture is all a count needs
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = ModelAdapter(model)
    layers = sorted(adapter.experts_per_layer)[-n_layers:]
    available = {layer: adapter.experts_per_layer[layer] for layer in layers}
    experts = {layer: list(range(min(available[layer], size_of(i, available[layer])))) for i, layer in enumerate(layers)}
    ExpertSubset(experts=experts, routers=layers).prepare(model)
    counts = count_parameters(model)
    return {"layers": layers, "experts_per_layer": {str(layer): len(ids) for layer, ids in experts.items()},
            "reference_experts": {str(layer): n for layer, n in available.items()},
            "trainable": int(counts["trainable"]), "total": int(counts["total"]),
            "fraction": float(counts["trainable_fraction"])}


def ssft_fraction_at_scale(shares: dict[int, float], reference_model: str, shared_k: int = 0) -> dict:
    """SSFT extrapolated to ``reference_model``'s architecture (meta device, no weights): in its last
    ``len(shares)`` MoE layers, ``ceil(share * experts)`` language-specific experts (the shares in the
    order of the run's final layers) plus ``shared_k`` shared ones, and those layers' routers
    (:func:`count_on_reference`)."""
    ordered = [shares[k] for k in sorted(shares)]
    return count_on_reference(reference_model, len(ordered),
                              lambda i, experts: math.ceil(ordered[i] * experts - 1e-9) + shared_k)


def ssft_fraction_direct(sizes: dict[int, int], reference_model: str) -> dict:
    """SSFT as the run chose it (``sizes``: experts of the run's SSFT set per final layer) counted on
    ``reference_model``'s architecture: for a run whose model has the reference's experts per layer."""
    ordered = [sizes[k] for k in sorted(sizes)]
    return count_on_reference(reference_model, len(ordered), lambda i, experts: ordered[i])


def authors_ssft_fraction() -> dict:
    """The authors' own SSFT (:data:`AUTHORS_SSFT_EXPERTS` on :data:`PAPER_MODEL`), by the same count."""
    return count_on_reference(PAPER_MODEL, len(AUTHORS_SSFT_EXPERTS), lambda i, experts: AUTHORS_SSFT_EXPERTS[i])


def gain_recovery(adaptation: pl.DataFrame, family: str, targets: list[str]) -> dict | None:
    """How much of AEFT's target gain SSFT recovers on one quantity of ``adaptation.parquet``
    (``family``: a task family, its headline accuracy, or ``perplexity``): per target the gain over the
    start model (accuracy: ``value - start``; perplexity: ``log(start / value)``, so higher is better
    for both), then SSFT's mean gain over the targets divided by AEFT's; None (the recovery) when AEFT's
    mean gain is not positive: no gain to recover. None when no target has both methods scored against
    an evaluated start model."""
    rows = adaptation.filter(pl.col("family") == family)
    per_target = {}
    for target in targets:
        by = {r["method"]: r for r in rows.filter(pl.col("target") == target).iter_rows(named=True)}
        if not {"ssft", "aeft"} <= set(by):
            continue
        start, ssft, aeft = by["ssft"]["start_value"], by["ssft"]["value"], by["aeft"]["value"]
        if start is None or ssft is None or aeft is None:
            continue
        gain = (lambda v: math.log(start / v)) if family == "perplexity" else (lambda v: v - start)
        per_target[target] = {"start": start, "ssft": ssft, "aeft": aeft, "ssft_gain": gain(ssft),
                              "aeft_gain": gain(aeft)}
    if not per_target:
        return None
    ssft_gain = float(np.mean([v["ssft_gain"] for v in per_target.values()]))
    aeft_gain = float(np.mean([v["aeft_gain"] for v in per_target.values()]))
    return {"metric": rows["metric"][0], "targets": per_target, "ssft_gain": ssft_gain, "aeft_gain": aeft_gain,
            "recovery": ssft_gain / aeft_gain if aeft_gain > 0 else None}


def finding_ssft(selected: dict | None, experts_per_layer: dict[int, int] | None, adaptation: pl.DataFrame | None,
                 options: ReportOptions, scale: dict[str, dict] | None = None, authors: dict | None = None) -> Finding:
    """Finding 3 (see the module docstring). ``scale``: target -> the count at the reference scale
    (:func:`ssft_fraction_at_scale` or :func:`ssft_fraction_direct`; computed here when None);
    ``authors``: :func:`authors_ssft_fraction` (computed here when None)."""
    if selected is None or adaptation is None:
        return Finding(3, NOT_COMPUTED, "Not computed: the run has no routing selection or no adaptation stage "
                                        "(routing.enabled or adapt.targets).", {})
    if adaptation.height == 0:
        return Finding(3, NOT_COMPUTED, "Not computed: no adapted model (the corpus stage dropped every adapt target).",
                       {})
    methods = set(adaptation["method"])
    if not {"ssft", "aeft"} <= methods:
        return Finding(3, NOT_COMPUTED, f"Not computed: adapt.methods needs both ssft and aeft (the run adapted with "
                                        f"{', '.join(sorted(methods))}).", {})
    targets = [t for t in adaptation["target"].unique(maintain_order=True).to_list()
               if t in selected and {"ssft", "seft"} <= set(selected[t])]
    if not targets:
        return Finding(3, NOT_COMPUTED, "Not computed: no adapted target has SSFT and SEFT expert sets in "
                                        "selected_experts.json.", {})
    families = [f for f in adaptation["family"].unique(maintain_order=True).to_list() if f != "perplexity"]
    recovery = {quantity: r for quantity in families + ["perplexity"]
                if (r := gain_recovery(adaptation, quantity, targets)) is not None}
    if not recovery:
        return Finding(3, NOT_COMPUTED, "Not computed: the adapted models' start model was not evaluated.", {})
    # the run's model against the reference's experts per layer: equal, SSFT's own sets are counted; else
    # the run's specific experts are extrapolated by their share of the layer, plus the paper's shared k
    run_layers = {t: sorted(int(layer) for layer in selected[t]["ssft"]) for t in targets}
    try:
        if scale is None:
            scale, counted = {}, {}  # targets whose sets have the same sizes share one meta-device count
            reference = count_on_reference(options.reference_model, len(next(iter(run_layers.values()))),
                                           lambda i, experts: 0)["reference_experts"]
            for target in targets:
                own = [experts_per_layer[layer] for layer in run_layers[target]]
                if own == list(reference.values()):
                    sizes = {layer: len(selected[target]["ssft"][str(layer)]) for layer in run_layers[target]}
                    key = ("direct", tuple(sorted(sizes.items())))
                    if key not in counted:
                        counted[key] = ssft_fraction_direct(sizes, options.reference_model) | {"extrapolated": False}
                else:
                    shares = {layer: len(selected[target]["seft"].get(str(layer), [])) / experts_per_layer[layer]
                              for layer in run_layers[target]}
                    key = ("extrapolated", tuple(sorted(shares.items())))
                    if key not in counted:
                        counted[key] = ssft_fraction_at_scale(shares, options.reference_model,
                                                              options.reference_shared_k) | {"extrapolated": True}
                scale[target] = counted[key]
        if authors is None:
            authors = authors_ssft_fraction()
    except MoelangError as exc:  # a reference that cannot be reached: the rest of the report stands
        return Finding(3, NOT_COMPUTED, f"Not computed: report.reference_model: {exc}.", {})
    per_target = {t: {"ssft_fraction_run": _run_fraction(adaptation, t),
                      "ssft_fraction_at_scale": scale[t]["fraction"], "experts_at_scale": scale[t]["experts_per_layer"],
                      "extrapolated": bool(scale[t]["extrapolated"]),
                      "run_experts_per_layer": {str(layer): experts_per_layer[layer] for layer in run_layers[t]}
                      if experts_per_layer else {}}
                  for t in targets}
    worst_fraction = max(v["ssft_fraction_at_scale"] for v in per_target.values())
    extrapolated = any(v["extrapolated"] for v in per_target.values())
    fraction_ok = worst_fraction < options.ssft_max_fraction
    for quantity in recovery.values():
        quantity["passed"] = quantity["recovery"] is not None and quantity["recovery"] >= options.ssft_min_gain_share
    # the paper's claim is on task scores (MultiBLiMP, Belebele); perplexity decides only without them
    decided_by = [f for f in families if f in recovery] or ["perplexity"]
    recovered = all(recovery[q]["passed"] for q in decided_by)
    layers = next(iter(scale.values()))["layers"]
    sizes = "; ".join(f"{t}: {', '.join(f'{n}' for n in v['experts_at_scale'].values())} experts per layer "
                      f"-> {_pct(v['ssft_fraction_at_scale'], 3)}" for t, v in per_target.items())
    authors_words = (f"the authors' own SSFT, {' + '.join(map(str, AUTHORS_SSFT_EXPERTS))} experts in layers "
                     f"{', '.join(map(str, authors['layers']))} of {PAPER_MODEL} with their routers, counts "
                     f"{_pct(authors['fraction'], 3)}")
    if extrapolated:
        run_experts = sorted({n for v in per_target.values() for n in v["run_experts_per_layer"].values()})
        reference_experts = sorted(set(next(iter(scale.values()))["reference_experts"].values()))
        how = (f"EXTRAPOLATED: this run's model has {', '.join(map(str, run_experts))} experts a layer, the reference "
               f"{', '.join(map(str, reference_experts))}, so the run's language-specific experts are scaled by their "
               f"share of the layer (steps of 1/{min(run_experts) if run_experts else '?'}) plus "
               f"{options.reference_shared_k} shared ones as the paper takes")
    else:
        how = "computed directly: this run's model has the reference's experts per layer, its SSFT sets are counted"
    fraction_words = (f"On {options.reference_model} (layers {', '.join(map(str, layers))}; {how}) SSFT trains at most "
                      f"{_pct(worst_fraction, 3)} of the parameters ({'under' if fraction_ok else 'not under'} "
                      f"{_pct(options.ssft_max_fraction, 0)}: {sizes}; {authors_words}; in this run's own model "
                      f"{_pct(max(v['ssft_fraction_run'] or 0 for v in per_target.values()))}).")

    def recovery_words(quantity: str, r: dict) -> str:
        what = "test perplexity (log)" if quantity == "perplexity" else f"{quantity} ({r['metric']})"
        gains = ", ".join(f"{t} SSFT {v['ssft_gain']:+.3f} / AEFT {v['aeft_gain']:+.3f}" for t, v in r["targets"].items())
        share = ("undefined (AEFT did not improve it)" if r["recovery"] is None
                 else f"{100 * r['recovery']:.0f}% ({'passed' if r['passed'] else 'failed'})")
        return f"{what}: {share}, gains {gains}"

    statement = (f"{fraction_words} SSFT's share of AEFT's target gain (mean gain over {len(targets)} target(s), "
                 f"at least {100 * options.ssft_min_gain_share:.0f}% to pass): "
                 + "; ".join(recovery_words(q, r) for q, r in recovery.items())
                 + f". The status is decided by {' and '.join(decided_by)}"
                 + (" (the paper's claim is on task scores; perplexity is shown beside them)" if families else
                    " (no task family was evaluated; the paper's claim is on task scores)")
                 + "; each method's learning rate was chosen on the dev split (other documents than the test "
                   "split every gain here is measured on).")
    evidence = {"reference_model": options.reference_model, "max_fraction_at_scale": worst_fraction,
                "fraction_extrapolated": extrapolated, "fraction_passed": fraction_ok,
                "authors_fraction": authors["fraction"], "authors_experts_per_layer": authors["experts_per_layer"],
                "recovery": recovery, "decided_by": decided_by, "recovery_passed": recovered, "targets": per_target}
    return Finding(3, PASS if fraction_ok and recovered else FAIL, statement, evidence)


def _run_fraction(adaptation: pl.DataFrame, target: str) -> float | None:
    """SSFT's trainable fraction in this run's own model (its adaptation rows)."""
    rows = adaptation.filter((pl.col("target") == target) & (pl.col("method") == "ssft"))
    return float(rows["trainable_fraction"][0]) if rows.height and rows["trainable_fraction"][0] is not None else None


def classifier_learning(run: dict, margin: float) -> tuple[bool, str]:
    """Whether a variant's router classifiers learned (held-out accuracy above the majority-class
    baseline by ``margin`` in every classifier layer) and a sentence with the numbers."""
    accuracy = run.get("classifier_heldout_accuracy")
    majority = run.get("classifier_majority_baseline")
    if not accuracy or majority is None or (isinstance(majority, float) and math.isnan(majority)):
        return False, "its classifier's held-out accuracy was not measured"
    layers = run.get("classifier_layers") or list(range(len(accuracy)))
    per_layer = ", ".join(f"layer {layer} {acc:.3f}" for layer, acc in zip(layers, accuracy))
    learned = min(accuracy) - majority >= margin
    how = (f"{run.get('classifier_decision', '?')} decisions on {run.get('classifier_pooling', '?')}-pooled "
           f"MLP inputs")
    return learned, (f"held-out classifier accuracy {per_layer} against {majority:.3f} for always answering the "
                     f"larger class, on {run.get('classifier_heldout_sequences')} test-split sequences ({how}; "
                     f"learned means at least {margin:g} above it in every layer)")


def finding_expansion(expansion: pl.DataFrame | None, runs: pl.DataFrame | None, tolerance: float,
                      classifier_margin: float = 0.15) -> Finding:
    """Finding 4 (see the module docstring)."""
    if expansion is None or runs is None or expansion.height == 0:
        return Finding(4, NOT_COMPUTED, "Not computed: the expansion stage did not run (expand.enabled).", {})

    def variant(plan: str, classifier: bool | None) -> str | None:
        pick = runs.filter(pl.col("plan") == plan)
        if classifier is not None:
            pick = pick.filter(pl.col("classifier") == classifier)
        return pick["variant"][0] if pick.height else None

    layermoe, uniform, ablation = variant("layermoe", True), variant("uniform", None), variant("layermoe", False)
    missing = [name for name, v in (("layermoe with a classifier", layermoe), ("uniform", uniform),
                                    ("layermoe without a classifier", ablation)) if v is None]
    if missing:
        return Finding(4, NOT_COMPUTED, f"Not computed: expand.variants has no {' and no '.join(missing)} variant.", {})
    ppl = {r["variant"]: r for r in expansion.filter(pl.col("family") == "perplexity").iter_rows(named=True)}
    if any(ppl.get(v) is None or ppl[v]["value_new"] is None for v in (layermoe, uniform, ablation)):
        return Finding(4, NOT_COMPUTED, "Not computed: the expanded models' perplexity or their start model's is "
                                        "missing (evaluation.perplexity).", {})
    lm, un, ab = ppl[layermoe], ppl[uniform], ppl[ablation]
    if lm["new_experts"] is not None and lm["new_experts"] == un["new_experts"]:
        return Finding(4, NOT_COMPUTED, f"Not computed: '{uniform}' has LayerMoE's budget ({un['new_experts']} new "
                                        f"experts; allocation.uniform_per_layer is null), so 'fewer experts' cannot "
                                        f"hold; set it to MoE-LPR's count per layer.", {})
    fewer = lm["new_experts"] < un["new_experts"]
    as_good = lm["value_new"] <= un["value_new"] * (1 + tolerance)
    less_forgetting = lm["old_change"] < ab["old_change"]
    learned, learning = classifier_learning(runs.filter(pl.col("variant") == layermoe).row(0, named=True),
                                            classifier_margin)
    statement = (f"'{layermoe}' adds {lm['new_experts']} new experts, {'fewer' if fewer else 'not fewer'} than the "
                 f"{un['new_experts']} of '{uniform}', for a new-language perplexity of {lm['value_new']:.2f} against "
                 f"{un['value_new']:.2f} ({'equal or better' if as_good else 'worse'}, tolerance "
                 f"{100 * tolerance:g}%; x{lm['new_gain']:.3f} and x{un['new_gain']:.3f} of the start model). "
                 f"Old-language perplexity changes x{lm['old_change']:.3f} with the router classifier and "
                 f"x{ab['old_change']:.3f} without ('{ablation}'); {learning}: ")
    if learned:
        statement += f"the classifier learned, and {'reduces' if less_forgetting else 'does not reduce'} forgetting."
        status = PASS if fewer and as_good and less_forgetting else FAIL
    else:
        statement += ("the classifier did not learn, so the difference in forgetting is not the classifier's "
                      "doing and its clause is not computed.")
        status = FAIL if not (fewer and as_good) else NOT_COMPUTED
    evidence = {"layermoe": layermoe, "uniform": uniform, "no_classifier": ablation,
                "new_experts": {"layermoe": lm["new_experts"], "uniform": un["new_experts"]},
                "new_perplexity": {"layermoe": lm["value_new"], "uniform": un["value_new"]},
                "old_change": {"layermoe": lm["old_change"], "no_classifier": ab["old_change"]},
                "classifier_learned": learned, "classifier_min_margin": classifier_margin,
                "tolerance": tolerance}
    return Finding(4, status, statement, evidence)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def plot_corpus(corpus: pl.DataFrame, tokens: pl.DataFrame, path, high_resource: list[str]) -> None:
    """Documents and tokens per language and split; dropped languages greyed and labelled with why."""
    plt = pyplot()
    langs = corpus["lang"].to_list()
    x = np.arange(len(langs))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.75 * len(langs) * 2), 4.4))
    kept = dict(zip(corpus["lang"], corpus["kept"]))
    for ax, (column, label) in zip(axes, (("docs", "documents"), ("tokens", "tokens"))):
        for offset, split, color in ((-0.27, "train", "tab:blue"), (0, "dev", "tab:green"),
                                     (0.27, "test", "tab:orange")):
            values = []
            for lang in langs:
                if column == "docs":
                    row = corpus.filter(pl.col("lang") == lang)
                    values.append(int(row[f"n_{split}"][0]))
                else:
                    row = tokens.filter((pl.col("lang") == lang) & (pl.col("split") == split))
                    values.append(int(row["n_tokens"][0]) if row.height else 0)
            colors = [color if kept[lang] else "lightgrey" for lang in langs]
            ax.bar(x + offset, values, 0.27, color=colors, label=f"{split} split")
        ax.set_xticks(x, [f"{lang}{'*' if lang in high_resource else ''}{'' if kept[lang] else chr(10) + '(dropped)'}"
                          for lang in langs])
        ax.set_xlabel("language (* high-resource; grey: dropped)")
        ax.set_ylabel(f"{label} (log scale)")
        ax.set_yscale("log")
        ax.set_title(f"{label.capitalize()} per language and split")
        ax.legend(fontsize=8)
    dropped = [f"{lang}: {reason}" for lang, reason in zip(corpus["lang"], corpus["reason"]) if not kept[lang]]
    if dropped:
        fig.text(0.01, -0.04, "Dropped: " + "; ".join(dropped), fontsize=8, ha="left", va="top", wrap=True)
    save_figure(fig, path)


def plot_experts(selected: dict, experts_per_layer: dict[int, int], path) -> None:
    """For each target (a panel) the experts each method trains in each final layer, a filled cell
    per chosen (layer, expert)."""
    plt = pyplot()
    targets = list(selected)
    if not targets:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "No expert selection: no kept target has a parent with a routing profile", ha="center",
                va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    methods = sorted({m for sets in selected.values() for m in sets}, key=_method_order)
    layers = sorted({int(layer) for sets in selected.values() for s in sets.values() for layer in s})
    columns = [(layer, e) for layer in layers for e in range(experts_per_layer[layer])]
    fig, axes = plt.subplots(len(targets), 1, figsize=(max(6, 0.32 * len(columns) + 2), 0.35 * len(methods) * len(targets)
                                                        + 1.2 * len(targets)), squeeze=False)
    for ax, target in zip(axes[:, 0], targets):
        grid = np.zeros((len(methods), len(columns)))
        for i, method in enumerate(methods):
            for layer, ids in selected[target].get(method, {}).items():
                for e in ids:
                    grid[i, columns.index((int(layer), int(e)))] = 1
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=1.3, aspect="auto")
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xticks(range(len(columns)), [str(e) for _, e in columns], fontsize=7)
        for k, layer in enumerate(layers[1:], start=1):
            ax.axvline(sum(experts_per_layer[lay] for lay in layers[:k]) - 0.5, color="k", linewidth=1)
        ax.set_xlabel("expert id, by layer (" + ", ".join(f"layer {layer}" for layer in layers) + ", left to right)")
        ax.set_title(f"Experts trained for target '{target}' (filled: chosen)")
    fig.tight_layout()
    save_figure(fig, path)


def _method_order(name: str) -> tuple:
    order = ["ssft", "seft", "random", "random_hr", "aeft", "full-ft", "lora"]
    return (order.index(name) if name in order else len(order) - 0.5 if name.startswith("seft_top") else len(order), name)


def plot_similarity_groups(similarity: pl.DataFrame, old: list[str], new: list[str], path) -> None:
    """Cross-lingual similarity per layer: the mean over old-old, new-old and new-new pairs (named) and
    LayerMoE's layer score S = (new-old + new-new) / 2, every single pair thin and grey behind them."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    pairs = similarity.filter(pl.col("lang_a") != pl.col("lang_b"))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for _, part in pairs.group_by(["lang_a", "lang_b"], maintain_order=True):
        part = part.sort("layer")
        ax.plot(part["layer"], part["similarity"], color="lightgrey", linewidth=0.7, zorder=1)
    ax.plot([], [], color="lightgrey", label="a single language pair")
    old_set, new_set = set(old), set(new)

    def group(a_in, b_in):
        return pairs.filter((pl.col("lang_a").is_in(a_in) & pl.col("lang_b").is_in(b_in))
                            | (pl.col("lang_a").is_in(b_in) & pl.col("lang_b").is_in(a_in)))

    means = {}
    for name, a_in, b_in, style in (("old-old", old_set, old_set, "tab:blue"), ("new-old", new_set, old_set, "tab:orange"),
                                    ("new-new", new_set, new_set, "tab:green")):
        rows = group(list(a_in), list(b_in))
        if name == "new-old":  # not both old nor both new
            rows = rows.filter(~(pl.col("lang_a").is_in(list(old_set)) & pl.col("lang_b").is_in(list(old_set))))
            rows = rows.filter(~(pl.col("lang_a").is_in(list(new_set)) & pl.col("lang_b").is_in(list(new_set))))
        if rows.height:
            mean = rows.group_by("layer").agg(pl.col("similarity").mean()).sort("layer")
            means[name] = mean
            ax.plot(mean["layer"], mean["similarity"], "-o", color=style, markersize=4, label=f"mean {name} pairs")
    if "new-old" in means:
        score = means["new-old"]
        if "new-new" in means:
            score = score.join(means["new-new"], on="layer", suffix="_nn").with_columns(
                ((pl.col("similarity") + pl.col("similarity_nn")) / 2).alias("similarity"))
        ax.plot(score["layer"], score["similarity"], "k--", linewidth=2, label="layer score S (LayerMoE)")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-lingual similarity (mean cosine)")
    ax.set_title(f"Similarity per layer ({similarity['model'][0]}): old {', '.join(old)}; new {', '.join(new)}",
                 fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_evaluation(results: pl.DataFrame, models: list[str], high_resource: list[str], targets: list[str],
                    path) -> None:
    """Every evaluated model's test perplexity (geometric mean) and headline task scores (mean)
    over the high-resource and the target languages."""
    from moelang.evaluate import HEADLINE

    plt = pyplot()
    families = [f for f in list(HEADLINE) + ["perplexity"] if results.filter(pl.col("family") == f).height]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), max(4.0, 0.28 * len(models) + 1.5)),
                             squeeze=False, sharey=True)
    y = np.arange(len(models))
    for ax, family in zip(axes[0], families):
        for offset, langs, color, name in ((-0.2, high_resource, "tab:blue", "high-resource"),
                                           (0.2, targets, "tab:orange", "targets")):
            values = [_family_mean(results, model, family, langs) for model in models]
            ax.barh(y + offset, [np.nan if v is None else v for v in values], 0.4, color=color, label=name)
        ax.set_yticks(y, models, fontsize=7)
        if family == "perplexity":
            ax.set_xscale("log")
            ax.set_xlabel("test perplexity\n(geometric mean, log scale; lower is better)")
        else:
            from moelang.evaluate import CHANCE

            ax.axvline(CHANCE[family], color="grey", linestyle=":", label="chance")
            ax.set_xlabel(f"{HEADLINE[family]}\n(mean over languages)")
        ax.set_title(family.replace("_", " "))
    axes[0][0].invert_yaxis()  # shared: the first model on top
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Every evaluated model on the high-resource ({', '.join(high_resource)}) and target "
                 f"({', '.join(targets)}) languages")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)


def _family_mean(results: pl.DataFrame, model: str, family: str, langs: list[str]) -> float | None:
    """The summary's aggregate of one model's headline metric over ``langs`` (geometric mean for
    perplexity)."""
    from moelang.evaluate import HEADLINE, _aggregate

    metric = "perplexity" if family == "perplexity" else HEADLINE[family]
    rows = results.filter((pl.col("model") == model) & pl.col("lang").is_in(langs) & (pl.col("family") == family)
                          & (pl.col("metric") == metric))
    return _aggregate(rows["value"], metric)


def plot_adaptation(adaptation: pl.DataFrame, path) -> None:
    """Target gain against trainable fraction (log scale), a point per (target, method): test
    perplexity (ratio to the start model) and each task family (accuracy change)."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    if adaptation.height == 0:  # every adapt target was dropped by the corpus stage
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "No adapted model: the corpus stage dropped every adapt target", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    present = adaptation["family"].unique(maintain_order=True).to_list()
    families = sorted(present, key=lambda f: f != "perplexity")  # perplexity first when it was measured
    fig, axes = plt.subplots(1, len(families), figsize=(5.6 * len(families), 4.6), squeeze=False)
    methods = sorted(adaptation["method"].unique().to_list(), key=_method_order)
    targets = adaptation["target"].unique(maintain_order=True).to_list()
    markers = dict(zip(targets, "os^DvP*X"))
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for ax, family in zip(axes[0], families):
        part = adaptation.filter((pl.col("family") == family) & pl.col("target_gain").is_not_null())
        for row in part.iter_rows(named=True):
            ax.scatter(row["trainable_fraction"], row["target_gain"], color=colors[row["method"]],
                       marker=markers[row["target"]], s=40)
            ax.annotate(row["method"], (row["trainable_fraction"], row["target_gain"]), fontsize=6, alpha=0.8,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:g}%"))
        ax.set_xlabel("trainable fraction of the parameters (log scale)")
        if family == "perplexity":
            ax.set_ylabel("target test perplexity / start model's (lower is better)")
            ax.axhline(1.0, color="grey", linestyle=":")
        else:
            ax.set_ylabel(f"target {part['metric'][0] if part.height else 'accuracy'} change (higher is better)")
            ax.axhline(0.0, color="grey", linestyle=":")
        ax.set_title(f"Target gain vs trainable fraction: {family.replace('_', ' ')}")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="k", marker=markers[t], linestyle="", label=f"target {t}") for t in targets]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    save_figure(fig, path)


def shared_model_lines(runs: dict[str, dict]) -> list[str]:
    """One line per group of expansion variants that share one trained model (``runs``: variant -> its
    row of ``results/expand/runs.parquet``, whose ``trained_as`` names the variant the model was
    trained as): their plans and classifier setting coincide, so their rows are not a comparison."""
    groups: dict[str, list[str]] = {}
    for name, run in runs.items():
        groups.setdefault(run.get("trained_as") or name, []).append(name)
    return [f"{', '.join(names)}: their plans give the same new experts per layer and they have the same classifier "
            f"setting, so they are one trained model ({owner}'s), evaluated once: their rows are that model's "
            f"numbers, not a comparison." for owner, names in groups.items() if len(names) > 1]


def plot_expansion(expansion: pl.DataFrame, path) -> None:
    """Per expansion variant: the new-language perplexity ratio, the old-language one (forgetting)
    and the new experts it added."""
    plt = pyplot()
    families = expansion["family"].unique(maintain_order=True).to_list()
    family = "perplexity" if "perplexity" in families else families[0]  # evaluation.perplexity may be off
    ppl = expansion.filter(pl.col("family") == family)
    owners = dict(ppl.select("model", "variant").unique("model", keep="first", maintain_order=True).rows())
    variants = [v if owners[m] == v else f"{v}\n(= {owners[m]}'s model)"
                for v, m in ppl.select("variant", "model").rows()]
    y = np.arange(len(variants))
    fig, axes = plt.subplots(1, 3, figsize=(14, max(3.2, 0.45 * len(variants) + 1.6)))
    if family == "perplexity":
        panels = (("new_gain", "new languages: perplexity / start model's\n(lower is better)", "tab:green"),
                  ("old_change", "old languages: perplexity / start model's\n(above 1: forgetting)", "tab:red"))
    else:
        metric = ppl["metric"][0]
        panels = (("new_gain", f"new languages: {family} {metric} change\n(higher is better)", "tab:green"),
                  ("old_change", f"old languages: {family} {metric} change\n(below 0: forgetting)", "tab:red"))
    panels += (("new_experts", "new experts added (all layers)", "tab:blue"),)
    reference = 1.0 if family == "perplexity" else 0.0
    for ax, (column, label, color) in zip(axes, panels):
        values = [np.nan if v is None else v for v in ppl[column].to_list()]
        ax.barh(y, values, color=color)
        for yi, v in zip(y, values):
            if not np.isnan(v):
                ax.annotate(f"{v:.3f}" if column != "new_experts" else f"{int(v)}", (v, yi), fontsize=7,
                            va="center", xytext=(2, 0), textcoords="offset points")
        if column != "new_experts":
            ax.axvline(reference, color="grey", linestyle=":")
        ax.set_yticks(y, variants)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[0].set_ylabel("expansion variant")
    fig.suptitle("LayerMoE expansion variants against the model they were expanded from")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def _read(path: Path | None) -> pl.DataFrame | None:
    return None if path is None else pl.read_parquet(path)


def with_families(results: pl.DataFrame, task_dir: Path) -> pl.DataFrame:
    """The results table with each row's task family (``tasks.json`` of the evaluation's tasks;
    ``perplexity`` for perplexity)."""
    tasks = json.loads((task_dir / "tasks.json").read_text(encoding="utf-8"))
    family = {task: spec["family"] for task, spec in tasks.items()} | {"perplexity": "perplexity"}
    return results.with_columns(pl.col("task").replace_strict(family, default=None).alias("family"))


def token_counts(token_files: list[Path]) -> pl.DataFrame:
    """Tokens per (language, split) from the token tables (two columns read)."""
    frames = [pl.read_parquet(path, columns=["split", "n_tokens"]).group_by("split").agg(pl.col("n_tokens").sum())
              .with_columns(pl.lit(Path(path).name.split(".")[0]).alias("lang")) for path in token_files]
    if not frames:
        return pl.DataFrame(schema={"split": pl.String, "n_tokens": pl.Int64, "lang": pl.String})
    return pl.concat(frames).with_columns(pl.col("n_tokens").cast(pl.Int64))


def experts_per_layer_of(experts: pl.DataFrame) -> dict[int, int]:
    """Experts of each MoE layer of the selection model (the routing metrics' expert table, its last
    checkpoint)."""
    last = experts.filter(pl.col("checkpoint_step") == experts["checkpoint_step"].max())
    return {int(layer): int(n) for layer, n in last.group_by("layer").agg(pl.len()).iter_rows()}


def build_report(inputs: ReportInputs, options: ReportOptions | dict, out_md: str | Path, figure_dir: str | Path,
                 scale: dict | None = None) -> list[Finding]:
    """Read the stage outputs, compute the findings, draw the figures, write the report (see the
    module docstring). ``scale``: precomputed SSFT counts at the reference scale (tests)."""
    options = ReportOptions.coerce(options)
    inputs.check()
    out_md, figure_dir = Path(out_md), Path(figure_dir)
    figure_dir.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(figure_dir, out_md.parent))  # report.md links its figures relative to itself
    figures = report_figures(inputs.routing_metrics is not None, inputs.adaptation is not None,
                             inputs.expansion is not None)
    log.info("report: reading the stage outputs")
    corpus = pl.read_parquet(inputs.corpus_summary)
    tokens = token_counts(inputs.token_files)
    overlap = pl.read_parquet(inputs.overlap)
    similarity = pl.read_parquet(inputs.similarity)
    plan = pl.read_parquet(inputs.plan)
    plan_meta = json.loads(Path(inputs.plan_json).read_text(encoding="utf-8")).get("_meta", {})
    results = with_families(pl.read_parquet(inputs.results), Path(inputs.tasks))
    metrics = {}
    if inputs.routing_metrics is not None:
        for name in ("entropy", "jsd", "jsd_mean", "specialization", "jsd_overlap", "experts"):
            metrics[name] = pl.read_parquet(Path(inputs.routing_metrics) / f"{name}.parquet")
    selected = json.loads(Path(inputs.selected_experts).read_text()) if inputs.selected_experts else None
    experts_per_layer = experts_per_layer_of(metrics["experts"]) if metrics else None
    adaptation, adapt_runs = _read(inputs.adaptation), _read(inputs.adapt_runs)
    expansion, expand_runs = _read(inputs.expansion), _read(inputs.expand_runs)
    kept = corpus.filter(pl.col("kept"))["lang"].to_list()
    hr = [lang for lang in options.high_resource if lang in kept]
    targets = [lang for lang in options.targets if lang in kept]

    log.info("report: computing the findings")
    findings = [
        finding_specialisation(metrics.get("specialization"), options.final_layers),
        finding_divergence_overlap(metrics.get("jsd_overlap")),
        finding_ssft(selected, experts_per_layer, adaptation, options, scale),
        finding_expansion(expansion, expand_runs, options.ppl_tolerance, options.classifier_min_margin),
    ]

    from moelang.allocation import plot_plan
    from moelang.overlap import plot_overlap
    from moelang.routing_metrics import (plot_entropy, plot_jsd_dynamics, plot_jsd_heatmap, plot_jsd_overlap,
                                         plot_per_checkpoint)

    models = results["model"].unique(maintain_order=True).to_list()
    languages = [lang for lang in options.languages if lang in kept]
    draw = {
        "corpus": lambda p: plot_corpus(corpus, tokens, p, options.high_resource),
        "overlap": lambda p: plot_overlap(overlap, p, languages),
        "routing_entropy": lambda p: plot_entropy(metrics["entropy"], p, options.base_language),
        "routing_jsd": lambda p: plot_jsd_dynamics(metrics["jsd_mean"], p, options.base_language),
        "routing_specialization": lambda p: plot_per_checkpoint(
            metrics["specialization"], "score", p, "specialisation score I(L;E)/H(L) (bits/bits)",
            "Language specialisation of the routing per layer"),
        "routing_jsd_heatmap": lambda p: plot_jsd_heatmap(metrics["jsd"], p, languages),
        "routing_jsd_overlap": lambda p: plot_jsd_overlap(metrics["jsd"], overlap, metrics["jsd_overlap"], p,
                                                          high_resource=hr, targets=targets),
        "experts": lambda p: plot_experts(selected, experts_per_layer, p),
        "similarity": lambda p: plot_similarity_groups(similarity, plan_meta.get("old", hr), plan_meta.get("new", targets),
                                                       p),
        "allocation": lambda p: plot_plan(plan, p, plan_meta.get("failed", {})),
        "evaluation": lambda p: plot_evaluation(results, models, hr, targets, p),
        "adaptation": lambda p: plot_adaptation(adaptation, p),
        "expansion": lambda p: plot_expansion(expansion, p),
    }
    for figure in progress(figures, desc="report figures", unit=" figures"):
        draw[figure.name](figure_dir / f"{figure.name}.png")

    doc = _document(findings, corpus, tokens, metrics, selected, similarity, plan, results, models, adaptation,
                    adapt_runs, expansion, expand_runs, options, hr, targets, {f.name for f in figures})
    with atomic_path(figure_dir / "findings.parquet") as tmp:
        pl.DataFrame([f.row() for f in findings], schema=FINDINGS_SCHEMA, orient="row").write_parquet(
            tmp, compression="zstd")
    with atomic_path(figure_dir / "summary.html") as tmp:
        Path(tmp).write_text(doc.html("moelang report"), encoding="utf-8")
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(doc.markdown(rel.as_posix()), encoding="utf-8")
    for finding in findings:
        log.info("report: finding %d %s: %s", finding.number, MARK[finding.status], finding.statement)
    return findings


def _document(findings, corpus, tokens, metrics, selected, similarity, plan, results, models, adaptation, adapt_runs,
              expansion, expand_runs, options: ReportOptions, hr, targets, figures: set[str]) -> Document:
    doc = Document()
    doc.heading(1, "moelang report")
    passed = sum(f.status == PASS for f in findings)
    computed = sum(f.status != NOT_COMPUTED for f in findings)
    dropped = [lang for lang in options.languages if lang not in set(corpus.filter(pl.col("kept"))["lang"])]
    doc.text(f"Languages: high-resource {', '.join(hr)}; targets "
             f"{', '.join(f'{t} (parent {options.targets[t]})' for t in targets)}"
             + (f"; dropped by the corpus stage: {', '.join(dropped)} (section 1 says why)" if dropped else "")
             + f". Evaluated models: {len(models)}. Findings: {passed} of {computed} computed pass.")
    doc.heading(2, "Findings")
    doc.text("Each finding is computed from this run's tables (module `moelang.report`); a small CPU run may fail "
             "some, and the numbers are shown either way.")
    doc.table(["#", "claim", "result", "numbers"],
              [[f.number, CLAIMS[f.number], f"**{MARK[f.status]}**", f.statement] for f in findings])

    captions = {figure.name: figure.caption for figure in FIGURES}

    def fig(name: str) -> None:
        if name in figures:
            doc.figure(name, captions[name])

    doc.heading(2, "1. Data")
    tok = {(lang, split): n for split, n, lang in tokens.iter_rows()}
    doc.table(["language", "source", "documents (train / dev / test)", "characters", "tokens (train / dev / test)",
               "kept", "why dropped"],
              [[r["lang"] + (" (HR)" if r["lang"] in options.high_resource else ""), r["source"],
                f"{r['n_train']:,} / {r['n_dev']:,} / {r['n_test']:,}", r["n_chars"],
                " / ".join(f"{tok.get((r['lang'], s), 0):,}" for s in ("train", "dev", "test")) if r["kept"] else "-",
                "yes" if r["kept"] else "no", r["reason"] or ""] for r in corpus.iter_rows(named=True)])
    fig("corpus")
    fig("overlap")

    if metrics:
        doc.heading(2, "2. Routing dynamics")
        spec = metrics["specialization"]
        steps = sorted(spec["checkpoint_step"].unique().to_list())
        layers = sorted(spec["layer"].unique().to_list())
        doc.text("Specialisation score I(L;E)/H(L) per layer (rows: CPT checkpoints; 0 = the routing says nothing "
                 "about the language, 1 = it identifies it):")
        doc.table(["CPT step"] + [f"layer {layer}" for layer in layers],
                  [[step] + [float(spec.filter((pl.col("checkpoint_step") == step) & (pl.col("layer") == layer))
                                   ["score"][0]) for layer in layers] for step in steps])
        for name in ("routing_entropy", "routing_jsd", "routing_specialization", "routing_jsd_heatmap"):
            fig(name)
        last = metrics["jsd_overlap"].filter(pl.col("checkpoint_step") == pl.col("checkpoint_step").max())
        doc.text("Routing JSD against token overlap at the last checkpoint, per pair type:")
        doc.table(["overlap measure", "pairs", "n", "Pearson r", "p", "Spearman r"],
                  [[r["measure"], r["pairs"], r["n_pairs"], r["pearson_r"], r["pearson_p"], r["spearman_r"]]
                   for r in last.iter_rows(named=True)])
        fig("routing_jsd_overlap")

        doc.heading(2, "3. Experts chosen")
        step = int(metrics["experts"]["checkpoint_step"].max())
        doc.text(f"Per target and method, the experts trained in each final layer (selection: the routing of "
                 f"routing.selection_model, by default the last checkpoint, step {step}; a target inherits its "
                 f"parent's language-specific experts).")
        rows = []
        for target, sets in selected.items():
            for method in sorted(sets, key=_method_order):
                rows.append([target, options.targets.get(target, "-"), method,
                             "; ".join(f"layer {layer}: {', '.join(map(str, ids)) or '-'}"
                                       for layer, ids in sorted(sets[method].items(), key=lambda kv: int(kv[0])))])
        doc.table(["target", "parent", "method", "experts"], rows)
        fig("experts")

    doc.heading(2, "4. Similarity and allocation")
    mean = similarity.filter(pl.col("lang_a") != pl.col("lang_b")).group_by("layer").agg(
        pl.col("similarity").mean()).sort("layer")
    doc.text(f"Mean cross-lingual similarity per layer ({similarity['model'][0]}): "
             + ", ".join(f"layer {layer} {value:.3f}" for layer, value in mean.iter_rows()) + ".")
    fig("similarity")
    methods = plan["method"].unique(maintain_order=True).to_list()
    doc.table(["method", "new experts per layer", "total new",
               "router-classifier layers (used by variants with a classifier)"],
              [[m, ", ".join(map(str, plan.filter(pl.col("method") == m).sort("layer")["new_experts"])),
                int(plan.filter(pl.col("method") == m)["new_experts"].sum()),
                ", ".join(map(str, plan.filter((pl.col("method") == m) & pl.col("classifier")).sort("layer")["layer"]))
                or "-"] for m in methods])
    fig("allocation")

    doc.heading(2, "5. Results")
    from moelang.evaluate import HEADLINE

    families = [f for f in HEADLINE if results.filter(pl.col("family") == f).height]
    header = ["model"]
    for family in families:
        header += [f"{family} ({HEADLINE[family]}) HR", f"{family} targets"]
    header += ["perplexity HR", "perplexity targets"]
    doc.text("Every evaluated model: the headline task metric (mean) and test perplexity (geometric mean) over "
             "the high-resource (HR) and target languages (results/eval/summary.md has every language and the "
             "chance tests).")
    doc.table(header, [[model] + [_family_mean(results, model, family, langs) for family in families + ["perplexity"]
                                  for langs in (hr, targets)] for model in models])
    fig("evaluation")
    if adaptation is not None and adaptation.height:
        doc.heading(3, "Final-layer expert fine-tuning")
        doc.text("Per target and method (the selected learning rate): the trainable fraction, the target's test "
                 "perplexity and task scores with their change against the start model, and the change on the other "
                 "high-resource languages (perplexity above x1, accuracy below 0: forgetting).")
        fams = [f for f in adaptation["family"].unique(maintain_order=True).to_list() if f != "perplexity"]
        rows = []
        for (target, method), part in adaptation.group_by(["target", "method"], maintain_order=True):
            by = {r["family"]: r for r in part.iter_rows(named=True)}
            ppl = by.get("perplexity", {})
            lr, experts = None, "-"
            if adapt_runs is not None:
                pick = adapt_runs.filter((pl.col("lang") == target) & (pl.col("method") == method) & pl.col("selected"))
                lr = float(pick["lr"][0]) if pick.height else None
                experts = ", ".join(map(str, pick["experts_per_layer"][0])) if pick.height else "-"
            row = [target, method, "-" if lr is None else f"{lr:g}", experts, _pct(part["trainable_fraction"][0], 3),
                   f"{_cell(ppl.get('value'))} ({_ratio(ppl.get('target_gain'))})", _ratio(ppl.get("hr_change"))]
            for family in fams:
                r = by.get(family, {})
                row.append(f"{_cell(r.get('value'))} ({_signed(r.get('target_gain'))})")
                row.append(_signed(r.get("hr_change")))
            rows.append(row)
        head = ["target", "method", "lr", "experts per adapted layer", "trainable", "target perplexity (x start)",
                "HR perplexity change"]
        for family in fams:
            head += [f"target {family} (change)", f"HR {family} change"]
        doc.table(head, rows)
        fig("adaptation")
    not_run = not_run_methods(adapt_runs)
    if not_run:
        doc.text("Not trained, so neither evaluated nor compared above (an expert set empty in every adapted layer "
                 "would train the routers alone): "
                 + "; ".join(f"{target} {method} ({reason})" for target, method, reason in not_run) + ".")
    if expansion is not None and expansion.height:
        doc.heading(3, "LayerMoE expansion")
        doc.text("Per variant against the model it was expanded from: new-language gain and old-language change "
                 "(perplexity: geometric mean ratio; tasks: mean accuracy change), new experts, trainable fractions.")
        fams = [f for f in expansion["family"].unique(maintain_order=True).to_list() if f != "perplexity"]
        runs = {r["variant"]: r for r in expand_runs.iter_rows(named=True)} if expand_runs is not None else {}
        rows = []
        for (variant,), part in expansion.group_by(["variant"], maintain_order=True):
            by = {r["family"]: r for r in part.iter_rows(named=True)}
            run = runs.get(variant, {})
            ppl = by.get("perplexity", {})
            if run.get("trained_as") not in (None, variant):  # its plan and classifier coincide with another's
                variant += f" (shares {run['trained_as']}'s model)"
            classifier = "no"
            if run.get("classifier"):
                accuracy = run.get("classifier_heldout_accuracy") or []
                classifier = (f"{run.get('classifier_decision')}: " + "/".join(f"{a:.2f}" for a in accuracy) +
                              f" (majority {run.get('classifier_majority_baseline', math.nan):.2f})")
            row = [variant, run.get("plan", "-"), classifier, part["new_experts"][0],
                   _pct(part["stage1_trainable_fraction"][0]), _pct(part["stage2_trainable_fraction"][0], 3),
                   _ratio(ppl.get("new_gain")), _ratio(ppl.get("old_change"))]
            for family in fams:
                row += [_signed(by.get(family, {}).get("new_gain")), _signed(by.get(family, {}).get("old_change"))]
            rows.append(row)
        head = ["variant", "plan", "classifier: held-out accuracy", "new experts", "stage 1 trains", "stage 2 trains",
                "new-language perplexity", "old-language perplexity"]
        for family in fams:
            head += [f"new {family}", f"old {family}"]
        doc.table(head, rows)
        for line in shared_model_lines(runs):
            doc.text(line)
        fig("expansion")
    return doc


def not_run_methods(adapt_runs: pl.DataFrame | None) -> list[tuple[str, str, str]]:
    """(target, method, why) of every adaptation method the runs table records as not trained."""
    if adapt_runs is None or "trained" not in adapt_runs.columns:
        return []
    rows = adapt_runs.filter(~pl.col("trained")).unique(["lang", "method"], maintain_order=True)
    return [(r["lang"], r["method"], r["not_run_reason"]) for r in rows.iter_rows(named=True)]


def _signed(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.3f}"


def export_figures(figure_dir: str | Path, dest_dir: str | Path, max_width: int = 1000) -> list[Path]:
    """Small copies of a run's report figures (``make figures``: the README's, under ``docs/figures/``):
    at most ``max_width`` pixels wide, 256 colours, optimised PNG. A figure the report does not have is
    left out; the copies are replaced whole."""
    from PIL import Image

    figure_dir, dest_dir = Path(figure_dir), Path(dest_dir)
    sources = [figure_dir / f"{figure.name}.png" for figure in FIGURES if (figure_dir / f"{figure.name}.png").is_file()]
    if not sources:
        raise MoelangError(f"report: no figures in '{figure_dir}'; run the pipeline first (make run)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        with Image.open(source) as image:
            image = image.convert("RGB")
            if image.width > max_width:
                image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
            small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            with atomic_path(dest_dir / source.name) as tmp:
                small.save(tmp, format="PNG", optimize=True)
        written.append(dest_dir / source.name)
    log.info("report: %d figures -> %s (%d KiB)", len(written), dest_dir,
             sum(path.stat().st_size for path in written) // 1024)
    return written

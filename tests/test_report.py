"""The report's findings against hand-computed numbers, its documents, and the meta-device count."""

import json
import math

import numpy as np
import polars as pl
import pytest

from moelang import config as cfg
from moelang.options import ReportOptions
from moelang.report import (FAIL, FIGURES, NOT_COMPUTED, PASS, Document, finding_divergence_overlap,
                            finding_expansion, finding_specialisation, finding_ssft, report_figures,
                            ssft_fraction_at_scale)


def specialization(scores: dict[int, list[float]]) -> pl.DataFrame:
    rows = [("cpt", step, layer, score) for step, per_layer in scores.items() for layer, score in enumerate(per_layer)]
    return pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                      "score": pl.Float64}, orient="row")


def test_specialisation_compares_the_final_layers_with_the_others_at_the_last_checkpoint():
    table = specialization({0: [0.5, 0.5, 0.1, 0.1], 800: [0.2, 0.3, 0.4, 0.6]})
    finding = finding_specialisation(table, final_layers=2)
    assert finding.status == PASS
    assert finding.evidence["final_mean"] == pytest.approx(0.5)
    assert finding.evidence["earlier_mean"] == pytest.approx(0.25)
    assert finding.evidence["first_step_gap"] == pytest.approx(-0.4)  # the lead grew from -0.4 to +0.25
    # ahead at the end, but already as far ahead in the base model: not CPT's doing
    assert finding_specialisation(specialization({0: [0.1, 0.1, 0.5, 0.5], 800: [0.2, 0.2, 0.5, 0.5]}), 2).status == FAIL
    assert finding.evidence["final_layers"] == [2, 3] and finding.evidence["checkpoint_step"] == 800
    assert "0.500" in finding.statement and "0.250" in finding.statement
    # the base model's scores (step 0) would pass the other way round: only the last checkpoint counts
    assert finding_specialisation(specialization({0: [0.1, 0.1, 0.5, 0.5], 800: [0.4, 0.4, 0.3, 0.3]}), 2).status == FAIL
    # one final layer against three
    assert finding_specialisation(table, final_layers=1).evidence["earlier_mean"] == pytest.approx(0.3)
    assert finding_specialisation(None, 2).status == NOT_COMPUTED
    assert finding_specialisation(specialization({0: [0.3], 800: [0.3]}), 2).status == NOT_COMPUTED  # one MoE layer
    assert finding_specialisation(specialization({0: [0.1, 0.1, 0.5, 0.5]}), 2).status == NOT_COMPUTED  # no CPT
    # another profiled model's rows do not mix into the CPT series
    other = specialization({900: [0.9, 0.9, 0.0, 0.0]}).with_columns(pl.lit("listed").alias("model"))
    assert finding_specialisation(pl.concat([table, other]), 2).evidence["checkpoint_step"] == 800


def jsd_overlap(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame([("cpt", step, 3, "jaccard", pairs, r, p, r, p, n) for step, pairs, r, p, n in rows],
                        schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32,
                                "measure": pl.String, "pairs": pl.String, "pearson_r": pl.Float64,
                                "pearson_p": pl.Float64, "spearman_r": pl.Float64, "spearman_p": pl.Float64,
                                "n_pairs": pl.Int64}, orient="row")


def test_divergence_overlap_takes_the_authors_pairs_at_the_last_checkpoint_and_needs_significance():
    table = jsd_overlap([(0, "without_lr_lr", 0.4, 0.01, 70), (800, "all", 0.1, 0.5, 91),
                         (800, "without_lr_lr", -0.45, 0.001, 70), (800, "hr_hr", -0.2, 0.3, 21)])
    finding = finding_divergence_overlap(table)
    assert finding.status == PASS
    assert finding.evidence == {"checkpoint_step": 800, "layer": 3, "pairs": "without_lr_lr", "measure": "jaccard",
                                "pearson_r": -0.45, "pearson_p": 0.001, "spearman_r": -0.45, "n_pairs": 70}
    assert "HR-HR: r = -0.20 (n = 21)" in finding.statement
    weak = jsd_overlap([(800, "without_lr_lr", -0.3, 0.2, 20)])
    assert finding_divergence_overlap(weak).status == FAIL  # negative but not significant
    # no targets (no authors' set): all pairs; an authors' set with NaN r (under 3 pairs) is not computed,
    # never silently replaced by all pairs (which would bring the LR-LR pairs back)
    assert finding_divergence_overlap(jsd_overlap([(800, "all", -0.9, 0.01, 10)])).evidence["pairs"] == "all"
    assert finding_divergence_overlap(jsd_overlap([(800, "without_lr_lr", math.nan, math.nan, 2),
                                                   (800, "all", -0.9, 0.01, 10)])).status == NOT_COMPUTED
    assert finding_divergence_overlap(jsd_overlap([(800, "all", math.nan, math.nan, 1)])).status == NOT_COMPUTED
    assert "optimistic" in finding.statement


def test_ssft_fraction_at_olmoe_scale_counts_experts_and_routers():
    """11 of 64 experts in layers 14 and 15: the test_adapt count of the paper's SSFT (2.0%)."""
    result = ssft_fraction_at_scale({0: 11 / 64, 1: 11 / 64}, "allenai/OLMoE-1B-7B-0924")
    expert = 3 * 2048 * 1024
    assert result["layers"] == [14, 15]
    assert result["experts_per_layer"] == {"14": 11, "15": 11}
    assert result["trainable"] == 22 * expert + 2 * 64 * 2048
    assert result["total"] == 6_919_161_856
    # a tiny model's 3 of 8 specific experts are 24 of 64 (rounded up), plus 5 shared, in the last layer only
    one = ssft_fraction_at_scale({3: 3 / 8}, "allenai/OLMoE-1B-7B-0924", shared_k=5)
    assert one["layers"] == [15] and one["trainable"] == 29 * expert + 64 * 2048
    # no specific expert: the shared ones alone; never more than the layer has
    assert ssft_fraction_at_scale({3: 0.0}, "allenai/OLMoE-1B-7B-0924", shared_k=5)["experts_per_layer"] == {"15": 5}
    assert ssft_fraction_at_scale({3: 1.0}, "allenai/OLMoE-1B-7B-0924", shared_k=5)["experts_per_layer"] == {"15": 64}


def adaptation_scores(rows: list[tuple]) -> pl.DataFrame:
    """adaptation.parquet rows: (target, method, family, metric, start_value, value)."""
    return pl.DataFrame([(t, m, f"adapt-{t}-{m}", "cpt-step800", 0.1 if m == "ssft" else 0.3, family, metric, start,
                          value, value / start if family == "perplexity" else value - start, 1.01, 6)
                         for t, m, family, metric, start, value in rows],
                        schema={"target": pl.String, "method": pl.String, "model": pl.String, "start": pl.String,
                                "trainable_fraction": pl.Float64, "family": pl.String, "metric": pl.String,
                                "start_value": pl.Float64, "value": pl.Float64, "target_gain": pl.Float64,
                                "hr_change": pl.Float64, "n_hr": pl.Int64}, orient="row")


# target -> family -> (metric, start, SSFT, AEFT); SEFT rows are in the table too and must not count
SCORES = {"ca": {"synthetic_blimp": ("acc_norm", 0.50, 0.58, 0.60),
                 "synthetic_belebele": ("acc_mutual_info", 0.30, 0.36, 0.35),
                 "perplexity": ("perplexity", 100.0, 42.0, 40.0)},
          "uk": {"synthetic_blimp": ("acc_norm", 0.40, 0.47, 0.50),
                 "synthetic_belebele": ("acc_mutual_info", 0.25, 0.27, 0.29),
                 "perplexity": ("perplexity", 200.0, 60.0, 50.0)}}


def scores_table(scores=SCORES) -> pl.DataFrame:
    rows = []
    for target, families in scores.items():
        for family, (metric, start, ssft, aeft) in families.items():
            rows += [(target, "ssft", family, metric, start, ssft), (target, "aeft", family, metric, start, aeft),
                     (target, "seft", family, metric, start, start)]
    return adaptation_scores(rows)


def expected_recovery(family: str, scores=SCORES) -> float:
    """SSFT's mean gain over the targets / AEFT's, by hand: accuracy gains, log perplexity gains."""
    def gain(start, value):
        return math.log(start / value) if family == "perplexity" else value - start
    ssft = [gain(by[family][1], by[family][2]) for by in scores.values()]
    aeft = [gain(by[family][1], by[family][3]) for by in scores.values()]
    return (sum(ssft) / len(ssft)) / (sum(aeft) / len(aeft))


SCALE = {t: {"layers": [14, 15], "experts_per_layer": {"14": 13, "15": 5}, "reference_experts": {"14": 64, "15": 64},
             "fraction": f, "extrapolated": True} for t, f in (("ca", 0.015), ("uk", 0.012))}
AUTHORS = {"layers": [14, 15], "experts_per_layer": {"14": 11, "15": 11}, "fraction": 0.020042}
SELECTED = {"ca": {"ssft": {"2": [0, 1], "3": [4]}, "seft": {"2": [0], "3": []}},
            "uk": {"ssft": {"2": [5], "3": [6]}, "seft": {"2": [], "3": []}}}


def test_ssft_recovery_is_computed_on_each_task_family_and_perplexity_and_the_tasks_decide():
    options = ReportOptions()
    table = scores_table()
    finding = finding_ssft(SELECTED, {2: 8, 3: 8}, table, options, SCALE, AUTHORS)
    recovery = finding.evidence["recovery"]
    assert set(recovery) == {"synthetic_blimp", "synthetic_belebele", "perplexity"}
    for family in recovery:
        assert recovery[family]["recovery"] == pytest.approx(expected_recovery(family), rel=1e-12)
    # the numbers by hand: blimp 0.075 / 0.10, belebele 0.04 / 0.045, perplexity log(7.94) / log(10)
    assert expected_recovery("synthetic_blimp") == pytest.approx(0.75)
    assert expected_recovery("synthetic_belebele") == pytest.approx(0.8889, abs=1e-4)
    assert expected_recovery("perplexity") == pytest.approx(0.8997, abs=1e-4)
    assert recovery["synthetic_blimp"]["targets"]["uk"]["aeft_gain"] == pytest.approx(0.10)
    assert finding.evidence["decided_by"] == ["synthetic_blimp", "synthetic_belebele"]
    assert finding.status == FAIL and "synthetic_blimp (acc_norm): 75% (failed)" in finding.statement
    assert "test perplexity (log): 90% (failed)" in finding.statement
    # at 0.85 perplexity and belebele pass, blimp does not: the tasks decide, so it fails
    lower = finding_ssft(SELECTED, {2: 8, 3: 8}, table, options.replace(ssft_min_gain_share=0.85), SCALE, AUTHORS)
    assert lower.status == FAIL and lower.evidence["recovery"]["perplexity"]["passed"]
    assert "test perplexity (log): 90% (passed)" in lower.statement
    assert "synthetic_belebele (acc_mutual_info): 89% (passed)" in lower.statement
    assert finding_ssft(SELECTED, {2: 8, 3: 8}, table, options.replace(ssft_min_gain_share=0.7), SCALE,
                        AUTHORS).status == PASS
    # without task families, perplexity decides (and the statement says the claim is on task scores)
    ppl_only = finding_ssft(SELECTED, {2: 8, 3: 8}, table.filter(pl.col("family") == "perplexity"),
                            options.replace(ssft_min_gain_share=0.85), SCALE, AUTHORS)
    assert ppl_only.evidence["decided_by"] == ["perplexity"] and ppl_only.status == PASS
    assert "no task family was evaluated" in ppl_only.statement
    # over 2% at scale fails whatever the gain
    over = {**SCALE, "uk": {**SCALE["uk"], "fraction": 0.021}}
    assert finding_ssft(SELECTED, {2: 8, 3: 8}, table, options.replace(ssft_min_gain_share=0.7), over,
                        AUTHORS).status == FAIL
    # AEFT that made a family worse leaves no gain to recover: undefined, and the finding fails
    worse = {t: {**f, "synthetic_belebele": ("acc_mutual_info", 0.30, 0.31, 0.28)} for t, f in SCORES.items()}
    failed = finding_ssft(SELECTED, {2: 8, 3: 8}, scores_table(worse), options.replace(ssft_min_gain_share=0.7),
                          SCALE, AUTHORS)
    assert failed.status == FAIL and failed.evidence["recovery"]["synthetic_belebele"]["recovery"] is None
    assert "synthetic_belebele (acc_mutual_info): undefined (AEFT did not improve it)" in failed.statement
    assert finding_ssft(SELECTED, {2: 8, 3: 8}, table.filter(pl.col("method") == "ssft"), options, SCALE,
                        AUTHORS).status == NOT_COMPUTED
    assert finding_ssft(None, None, None, options).status == NOT_COMPUTED


def test_ssft_fraction_is_extrapolated_on_an_8_expert_model_and_direct_on_a_64_expert_one(tmp_path):
    """The meta-device counts on OLMoE-1B-7B (2048 hidden, 1024 per expert, 64 experts a layer)."""
    options = ReportOptions()
    expert, routers, total = 3 * 2048 * 1024, 2 * 64 * 2048, 6_919_161_856
    authors = (22 * expert + routers) / total  # 11 + 11 experts in layers 14 and 15: 2.004%
    selected = {"ca": {"ssft": {"2": [0, 3], "3": [6]}, "seft": {"2": [0], "3": []}}}
    table = adaptation_scores([("ca", m, "perplexity", "perplexity", 100.0, v) for m, v in (("ssft", 42.0),
                                                                                          ("aeft", 40.0))])
    small = finding_ssft(selected, {2: 8, 3: 8}, table, options)
    # layer 14: 1 of 8 specific -> 8 of 64, + 5 shared; layer 15: no specific, the 5 shared
    assert small.evidence["targets"]["ca"]["experts_at_scale"] == {"14": 13, "15": 5}
    assert small.evidence["max_fraction_at_scale"] == pytest.approx((18 * expert + routers) / total, rel=1e-12)
    assert small.evidence["fraction_extrapolated"] is True
    assert small.evidence["authors_fraction"] == pytest.approx(authors, rel=1e-12)
    assert authors == pytest.approx(0.020042, abs=1e-6)
    assert "EXTRAPOLATED: this run's model has 8 experts a layer, the reference 64" in small.statement
    assert "the authors' own SSFT, 11 + 11 experts in layers 14, 15" in small.statement and "2.004%" in small.statement
    # a model with the paper's 64 experts a layer: the run's own SSFT sets (11 and 13) are counted as they are
    paper = {"ca": {"ssft": {"2": list(range(11)), "3": list(range(20, 33))}, "seft": {"2": [0], "3": [20]}}}
    direct = finding_ssft(paper, {2: 64, 3: 64}, table, options)
    assert direct.evidence["fraction_extrapolated"] is False
    assert direct.evidence["targets"]["ca"]["experts_at_scale"] == {"14": 11, "15": 13}
    assert direct.evidence["max_fraction_at_scale"] == pytest.approx((24 * expert + routers) / total, rel=1e-12)
    assert "computed directly" in direct.statement and "EXTRAPOLATED" not in direct.statement
    dropped = finding_ssft(selected, {2: 8, 3: 8}, table.clear(), options)
    assert dropped.status == NOT_COMPUTED and "dropped every adapt target" in dropped.statement
    # a reference model that cannot be loaded leaves this finding uncomputed, not the report failed
    missing = finding_ssft(selected, {2: 8, 3: 8}, table, options.replace(reference_model=str(tmp_path / "none")))
    assert missing.status == NOT_COMPUTED and "report.reference_model" in missing.statement


def expansion_tables(new: dict[str, float], old: dict[str, float], experts: dict[str, int],
                     classifier_accuracy: tuple[float, ...] = (0.9, 0.8), majority: float = 0.55):
    plans = {"layermoe": ("layermoe", True), "uniform": ("uniform", False), "ablation": ("layermoe", False)}
    runs = pl.DataFrame([(v, *plans[v], [1, 3] if plans[v][1] else None,
                          list(classifier_accuracy) if plans[v][1] else None, majority if plans[v][1] else None,
                          "causal" if plans[v][1] else None, "mean" if plans[v][1] else None) for v in new],
                        schema={"variant": pl.String, "plan": pl.String, "classifier": pl.Boolean,
                                "classifier_layers": pl.List(pl.Int32),
                                "classifier_heldout_accuracy": pl.List(pl.Float64),
                                "classifier_majority_baseline": pl.Float64, "classifier_decision": pl.String,
                                "classifier_pooling": pl.String}, orient="row")
    rows = [(v, f"expand-{v}", "cpt-step800", experts[v], 0.1, 0.001, "perplexity", "perplexity", 4, 100.0,
             new[v], new[v] / 100.0, 7, 10.0, old[v] * 10.0, old[v]) for v in new]
    expansion = pl.DataFrame(rows, schema={
        "variant": pl.String, "model": pl.String, "start": pl.String, "new_experts": pl.Int64,
        "stage1_trainable_fraction": pl.Float64, "stage2_trainable_fraction": pl.Float64, "family": pl.String,
        "metric": pl.String, "n_new": pl.Int64, "start_new": pl.Float64, "value_new": pl.Float64,
        "new_gain": pl.Float64, "n_old": pl.Int64, "start_old": pl.Float64, "value_old": pl.Float64,
        "old_change": pl.Float64}, orient="row")
    return expansion, runs


def test_the_report_lists_the_adaptation_methods_that_were_not_trained():
    from moelang.adapt import RUNS_SCHEMA
    from moelang.report import not_run_methods

    rows = [{"lang": lang, "method": method, "lr": lr, "layers": [2, 3], "experts_per_layer": [0, 0] if reason else [1, 2],
             "selected": reason is None and lr == 1e-3, "trained": reason is None, "not_run_reason": reason}
            for lang, method, reason in [("ca", "ssft", None), ("et", "seft", "empty: routing.alpha"),
                                         ("et", "random", "empty: routing.alpha (as many as seft)")]
            for lr in (1e-3, 4e-3)]
    runs = pl.from_arrow(__import__("pyarrow").Table.from_pylist(rows, schema=RUNS_SCHEMA))
    assert not_run_methods(runs) == [("et", "seft", "empty: routing.alpha"),
                                     ("et", "random", "empty: routing.alpha (as many as seft)")]
    assert not_run_methods(runs.filter(pl.col("trained"))) == [] and not_run_methods(None) == []


def test_expansion_finding_needs_fewer_experts_equal_perplexity_and_less_forgetting():
    expansion, runs = expansion_tables({"layermoe": 60.0, "uniform": 59.5, "ablation": 58.0},
                                       {"layermoe": 1.10, "uniform": 1.15, "ablation": 1.20},
                                       {"layermoe": 8, "uniform": 12, "ablation": 8})
    finding = finding_expansion(expansion, runs, tolerance=0.02)
    assert finding.status == PASS  # 60.0 <= 59.5 * 1.02
    assert finding.evidence["new_experts"] == {"layermoe": 8, "uniform": 12}
    assert finding_expansion(expansion, runs, tolerance=0.0).status == FAIL  # 60.0 > 59.5
    same_budget, runs = expansion_tables({"layermoe": 50.0, "uniform": 59.5, "ablation": 58.0},
                                         {"layermoe": 1.10, "uniform": 1.15, "ablation": 1.20},
                                         {"layermoe": 8, "uniform": 8, "ablation": 8})
    equal = finding_expansion(same_budget, runs, 0.02)  # uniform_per_layer null: "fewer" cannot hold
    assert equal.status == NOT_COMPUTED and "uniform_per_layer" in equal.statement
    more, runs = expansion_tables({"layermoe": 50.0, "uniform": 59.5, "ablation": 58.0},
                                  {"layermoe": 1.10, "uniform": 1.15, "ablation": 1.20},
                                  {"layermoe": 12, "uniform": 8, "ablation": 12})
    assert finding_expansion(more, runs, 0.02).status == FAIL  # more experts than uniform
    forgets, runs = expansion_tables({"layermoe": 50.0, "uniform": 59.5, "ablation": 58.0},
                                     {"layermoe": 1.30, "uniform": 1.15, "ablation": 1.20},
                                     {"layermoe": 8, "uniform": 12, "ablation": 8})
    assert finding_expansion(forgets, runs, 0.02).status == FAIL  # the classifier did not reduce forgetting
    partial, runs = expansion_tables({"layermoe": 50.0, "uniform": 59.5}, {"layermoe": 1.1, "uniform": 1.1},
                                     {"layermoe": 8, "uniform": 12})
    assert finding_expansion(partial, runs, 0.02).status == NOT_COMPUTED
    assert finding_expansion(None, None, 0.02).status == NOT_COMPUTED


def test_expansion_finding_leaves_out_the_classifier_clause_when_the_classifier_did_not_learn():
    tables = ({"layermoe": 50.0, "uniform": 59.5, "ablation": 58.0}, {"layermoe": 1.10, "uniform": 1.15,
                                                                     "ablation": 1.20},
              {"layermoe": 8, "uniform": 12, "ablation": 8})
    # layer 3 is only 0.10 above the majority class: below the 0.15 margin
    expansion, runs = expansion_tables(*tables, classifier_accuracy=(0.90, 0.65), majority=0.55)
    finding = finding_expansion(expansion, runs, 0.02, classifier_margin=0.15)
    assert finding.status == NOT_COMPUTED and finding.evidence["classifier_learned"] is False
    assert "did not learn" in finding.statement and "layer 3 0.650" in finding.statement
    assert "0.550" in finding.statement and "causal decisions" in finding.statement
    assert finding_expansion(expansion, runs, 0.02, classifier_margin=0.09).status == PASS  # 0.65 - 0.55 >= 0.09
    # the clauses that do not rest on the classifier still fail on their own
    more, runs = expansion_tables(tables[0], tables[1], {"layermoe": 12, "uniform": 8, "ablation": 12},
                                  classifier_accuracy=(0.5,), majority=0.55)
    assert finding_expansion(more, runs, 0.02).status == FAIL


def test_documents_render_tables_marks_and_figures():
    doc = Document()
    doc.heading(2, "Findings")
    doc.table(["a", "b"], [[1, 0.123456], [None, "x|y"], ["**PASS**", 1234567.0]])
    doc.figure("corpus", "Documents <per> language")
    md = doc.markdown("report")
    assert "| 1 | 0.123 |" in md and "| - | x\\|y |" in md and "1,234,567" in md
    assert "![Documents <per> language](report/corpus.png)" in md
    page = doc.html("t")
    assert "<strong class='pass'>PASS</strong>" in page
    assert "Documents &lt;per&gt; language" in page and "<h2>Findings</h2>" in page


def test_figures_follow_the_stages_a_config_runs_and_each_has_a_caption(repo):
    names = [f.name for f in report_figures(routing=True, adapt=True, expand=True)]
    assert names == [f.name for f in FIGURES]
    dense = [f.name for f in report_figures(routing=False, adapt=False, expand=True)]
    assert "experts" not in dense and "routing_jsd" not in dense and "expansion" in dense
    for figure in FIGURES:
        assert (repo / "workflow" / "report" / f"{figure.name}.rst").is_file()


def test_report_options_come_from_the_config(repo):
    config = cfg.load(repo / "config" / "config.yaml")
    options = cfg.report_options(config)
    assert options.targets["ca"] == "es" and options.final_layers == config["routing"]["final_layers"]
    assert ReportOptions.from_json(options.to_json()) == options
    assert json.loads(options.to_json())["reference_model"] == "allenai/OLMoE-1B-7B-0924"


def test_the_tiny_run_writes_the_report_with_every_figure_and_the_findings(tiny_run):
    """Rule report (part of rule all) on the tiny DAG: report.md links every figure of the run's stages,
    each a PNG; findings.parquet has its schema and a row per finding; summary.html has the findings."""
    from moelang.report import FINDINGS_SCHEMA

    work, _ = tiny_run
    figures = report_figures(routing=True, adapt=True, expand=False)  # .test/config-tiny.yaml: no expansion
    out = work / "results" / "report"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{f.name}.png" for f in figures)
    for figure in figures:
        assert (out / f"{figure.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (work / "results" / "report.md").read_text()
    linked = {line.split("](report/")[1].split(".png)")[0] for line in md.splitlines() if "](report/" in line}
    assert linked == {f.name for f in figures}
    for heading in ("## Findings", "## 1. Data", "## 2. Routing dynamics", "## 3. Experts chosen",
                    "## 4. Similarity and allocation", "## 5. Results", "### Final-layer expert fine-tuning"):
        assert heading in md
    assert "| gl | local data/gl.txt |" in md and "too little text" in md  # the dropped language, with why
    findings = pl.read_parquet(out / "findings.parquet")
    assert dict(findings.schema) == FINDINGS_SCHEMA and findings["finding"].to_list() == [1, 2, 3, 4]
    assert set(findings["status"]) <= {PASS, FAIL, NOT_COMPUTED}
    # the tiny config adapts without aeft and does not expand: findings 3 and 4 cannot be computed
    assert findings["status"].to_list()[2:] == [NOT_COMPUTED, NOT_COMPUTED]
    # finding 1 restated from the run's own specialisation table
    spec = pl.read_parquet(work / "results" / "routing" / "metrics" / "specialization.parquet")
    last = spec.filter(pl.col("checkpoint_step") == spec["checkpoint_step"].max()).sort("layer")["score"].to_list()
    assert findings["status"][0] == (PASS if last[-1] > np.mean(last[:-1]) else FAIL)
    assert "<h2>Findings</h2>" in (out / "summary.html").read_text()


def test_figures_draw_without_perplexity_and_without_a_selection(tmp_path):
    from moelang.report import plot_evaluation, plot_expansion, plot_experts

    plot_experts({}, {}, tmp_path / "experts.png")
    expansion, _ = expansion_tables({"layermoe": 60.0, "uniform": 59.5}, {"layermoe": 1.1, "uniform": 1.2},
                                    {"layermoe": 8, "uniform": 12})
    accuracy = expansion.with_columns(pl.lit("synthetic_blimp").alias("family"), pl.lit("acc_norm").alias("metric"))
    plot_expansion(accuracy, tmp_path / "expansion.png")
    results = pl.DataFrame({"model": ["m", "m"], "lang": ["en", "ca"], "task": ["t_en", "t_ca"],
                            "metric": ["acc_norm", "acc_norm"], "value": [0.6, 0.5], "family": ["synthetic_blimp"] * 2})
    plot_evaluation(results, ["m"], ["en"], ["ca"], tmp_path / "evaluation.png")  # no perplexity rows
    for name in ("experts", "expansion", "evaluation"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_names_the_variants_that_share_one_model(tmp_path):
    from moelang.report import plot_expansion, shared_model_lines

    runs = {"layermoe": {"trained_as": "layermoe"}, "uniform": {"trained_as": "uniform"},
            "mola": {"trained_as": "uniform"}, "routing-informed": {"trained_as": "layermoe"},
            "layermoe-no-classifier": {"trained_as": "uniform"}}
    lines = shared_model_lines(runs)
    assert len(lines) == 2
    assert lines[0].startswith("layermoe, routing-informed: their plans give the same new experts per layer")
    assert "one trained model (layermoe's)" in lines[0]
    assert lines[1].startswith("uniform, mola, layermoe-no-classifier: ") and "(uniform's)" in lines[1]
    # a runs table without sharing (or from before trained_as existed) has nothing to say
    assert shared_model_lines({"layermoe": {"trained_as": "layermoe"}, "uniform": {}}) == []
    # the figure draws the shared rows (same model under two variant names)
    expansion, _ = expansion_tables({"layermoe": 60.0, "uniform": 59.5}, {"layermoe": 1.1, "uniform": 1.2},
                                    {"layermoe": 4, "uniform": 4})
    shared = pl.concat([expansion, expansion.filter(pl.col("variant") == "uniform").with_columns(
        pl.lit("mola").alias("variant"))])
    plot_expansion(shared, tmp_path / "expansion.png")
    assert (tmp_path / "expansion.png").read_bytes()[:4] == b"\x89PNG"

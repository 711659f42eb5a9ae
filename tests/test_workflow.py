"""The Snakemake DAG of the data stages, end to end, on a tiny config."""

import json

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

# snakemake() and the tiny run (the session fixture tiny_run, shared with test_report_html.py) are in
# conftest.py; test_workflow_dense imports snakemake from here
from conftest import copy_test_config, snakemake
from moelang import corpus, overlap, tokenize


def test_every_output_exists_with_its_schema(tiny_run):
    work, _ = tiny_run
    res = work / "results"
    manifest = json.loads((res / "corpus" / "languages.json").read_text())
    assert manifest["kept"] == ["en", "es", "ca"]
    assert "too little text" in manifest["dropped"]["gl"]
    for lang in ["en", "es", "ca", "gl"]:
        assert pq.read_schema(res / "corpus" / f"{lang}.parquet").equals(corpus.CORPUS_SCHEMA)
    summary = pq.read_table(res / "corpus" / "summary.parquet")
    assert summary.schema.equals(corpus.STATS_SCHEMA)
    assert summary.column("lang").to_pylist() == ["en", "es", "ca", "gl"]
    assert summary.column("kept").to_pylist() == [True, True, True, False]
    for lang in ["en", "es", "ca"]:
        assert pq.read_schema(res / "tokens" / f"{lang}.parquet").equals(tokenize.TOKENS_SCHEMA)
        assert pq.read_schema(res / "tokens" / f"{lang}.freq.parquet").equals(tokenize.FREQ_SCHEMA)
    assert not (res / "tokens" / "gl.parquet").exists()  # dropped languages go no further
    table = pl.read_parquet(res / "overlap" / "overlap.parquet")
    assert table.schema == pl.Schema(overlap.OVERLAP_SCHEMA)
    assert table.height == 3 * 3 * len(overlap.MEASURES)
    parallel = pq.read_table(res / "corpus" / "parallel.parquet")
    assert parallel.column_names == ["item_id", "origin", "en", "es", "ca", "gl"] and parallel.num_rows > 300
    assert (res / "overlap" / "overlap.png").stat().st_size > 1000
    assert (res / "tokenizer" / "tokenizer.json").is_file()


def test_base_model_and_cpt_checkpoints_load_with_transformers(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelang.train import LOG_SCHEMA

    work, _ = tiny_run
    models = work / "results" / "models"
    base = AutoModelForCausalLM.from_pretrained(models / "base")
    assert base.config.model_type == "olmoe" and base.config.num_experts == 4
    assert AutoTokenizer.from_pretrained(models / "base").eos_token == "<|endoftext|>"
    assert pq.read_table(models / "base" / "train_log.parquet").schema.equals(LOG_SCHEMA)
    assert sorted(p.name for p in (models / "cpt").iterdir()) == ["step-0", "step-3", "step-6", "train_log.parquet"]
    step0 = AutoModelForCausalLM.from_pretrained(models / "cpt" / "step-0").state_dict()
    step6 = AutoModelForCausalLM.from_pretrained(models / "cpt" / "step-6").state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(step0[name], value), name  # step 0 is the English base model itself
    assert any(not torch.equal(step6[n], v) for n, v in base.state_dict().items())
    log = pq.read_table(models / "cpt" / "train_log.parquet")
    assert log.column("step").to_pylist() == [1, 2, 3, 4, 5, 6]
    assert not (work / "results" / "state" / "cpt").exists()  # resumable state is cleaned up on success


def test_routing_profiles_metrics_and_selection(tiny_run):
    from moelang.routing import PROFILE_SCHEMA

    work, _ = tiny_run
    res = work / "results" / "routing"
    assert sorted(p.name for p in res.iterdir() if p.name.startswith("cpt")) == ["cpt-step0", "cpt-step3", "cpt-step6"]
    profile = pq.read_table(res / "cpt-step6" / "es.parquet")
    assert profile.schema.equals(PROFILE_SCHEMA)
    assert set(profile.column("checkpoint_step").to_pylist()) == {6} and profile.num_rows == 2 * 4  # layers x experts
    # the profile reads the dev split, all of it (under routing.tokens_per_language), and nothing else
    tokens = pl.read_parquet(work / "results" / "tokens" / "es.parquet")
    assert set(profile.column("n_tokens").to_pylist()) == {tokens.filter(pl.col("split") == "dev")["n_tokens"].sum()}
    assert not (res / "cpt-step6" / "gl.parquet").exists()  # dropped language
    spec = pl.read_parquet(res / "metrics" / "specialization.parquet")
    assert spec.height == 3 * 2 and spec["score"].is_between(0, 1).all()
    assert pl.read_parquet(res / "metrics" / "jsd.parquet").height == 3 * 2 * 3  # 3 checkpoints x 2 layers x 3 pairs
    selected = json.loads((res / "selected_experts.json").read_text())
    assert set(selected) == {"ca"}  # gl was dropped
    assert set(selected["ca"]) == {"ssft", "seft", "seft_top20", "random"}
    assert set(selected["ca"]["ssft"]) == {"0", "1"}  # the final 2 MoE layers
    for name in ("entropy", "jsd_dynamics", "jsd_heatmap", "specialization", "jsd_overlap"):
        assert (res / "metrics" / f"{name}.png").stat().st_size > 1000


def test_similarity_and_allocation_plan(tiny_run):
    from moelang.similarity import SIMILARITY_SCHEMA

    work, _ = tiny_run
    sim = pl.read_parquet(work / "results" / "similarity" / "cpt-step6.tokens.parquet")
    assert sim.schema == pl.Schema(SIMILARITY_SCHEMA)
    assert sim.height == 2 * 6  # 2 layers x (3 languages: 3 pairs + 3 diagonal)
    assert sim.filter(pl.col("lang_a") == pl.col("lang_b"))["similarity"].is_between(0, 1.0000001).all()
    plan = json.loads((work / "results" / "allocation" / "plan.json").read_text())
    assert set(plan) == {"layermoe", "uniform", "mola", "increasing", "routing", "_meta"}
    for method in ("layermoe", "uniform", "increasing", "routing"):
        assert sum(plan[method]["new_experts_per_layer"]) == 3, method
        assert min(plan[method]["new_experts_per_layer"]) >= 1
    # the authors' MoLA keeps its own budget: layers 0 and 1 of 2 in quarters 0 and 2 (2 and 6 experts
    # counting an FFN: 1 and 5 new)
    assert plan["mola"]["new_experts_per_layer"] == [1, 5]
    assert plan["_meta"]["old"] == ["en", "es"] and plan["_meta"]["new"] == ["ca"]
    assert plan["_meta"]["counts_existing"] is False  # an MoE base: N_i counts new experts only
    table = pl.read_parquet(work / "results" / "allocation" / "plan.parquet")
    assert table.columns == ["method", "layer", "score", "score_used", "experts", "new_experts", "classifier"]


def test_every_model_is_evaluated_into_one_table(tiny_run):
    from moelang.evaluate import RESULTS_SCHEMA

    work, _ = tiny_run
    table = pl.read_parquet(work / "results" / "eval" / "results.parquet")
    assert table.schema == pl.Schema(RESULTS_SCHEMA)
    adapted = ["adapt-ca-ssft", "adapt-ca-full-ft", "adapt-ca-lora"]
    assert table["model"].unique(maintain_order=True).to_list() == ["cpt-step0", "cpt-step3", "cpt-step6"] + adapted
    assert set(table["method"]) == {"base", "cpt", "ssft", "full-ft", "lora"}
    ppl = table.filter(pl.col("metric") == "perplexity")
    assert sorted(ppl["lang"].unique()) == ["ca", "en", "es"] and (ppl["value"] > 1).all()
    blimp = table.filter(pl.col("task").str.starts_with("moelang_synthetic_blimp") & (pl.col("metric") == "acc"))
    assert blimp.height >= 3 and blimp["value"].is_between(0, 1).all() and (blimp["n_items"] > 0).all()
    raw = json.loads((work / "results" / "eval" / "cpt-step6" / "synthetic_blimp.json").read_text())
    assert "results" in raw and all(name.startswith("moelang_synthetic_blimp_") for name in raw["results"])
    assert "| cpt-step6 | cpt |" in (work / "results" / "eval" / "summary.md").read_text()


def test_adaptation_runs_and_selection(tiny_run):
    from moelang.adapt import RUNS_SCHEMA

    work, _ = tiny_run
    assert pq.read_schema(work / "results" / "adapt" / "runs.parquet").equals(RUNS_SCHEMA)
    runs = pl.read_parquet(work / "results" / "adapt" / "runs.parquet")
    assert runs.height == 3 * 2 and set(runs["lang"]) == {"ca"}  # gl was dropped: not adapted
    assert runs.group_by("method").agg(pl.col("selected").sum())["selected"].to_list() == [1, 1, 1]
    for row in runs.filter(pl.col("selected")).iter_rows(named=True):
        run = work / "results" / "adapt" / "ca" / row["method"]
        lr = f"lr-{row['lr']:g}"
        assert (run / "selected" / "model.safetensors").samefile(run / lr / "model.safetensors")
        record = json.loads((run / "selected" / "moelang_run.json").read_text())
        assert record["method"] == row["method"] and record["trainable_parameters"] == row["trainable_params"]
        # the reported test perplexity is the evaluation stage's own number for the selected model on the
        # target (the same split and settings); the dev perplexity that chose it comes from other documents
        evaluated = pl.read_parquet(work / "results" / "eval" / f"adapt-ca-{row['method']}" / "perplexity.parquet")
        assert row["test_perplexity"] == pytest.approx(evaluated.filter(pl.col("lang") == "ca")["perplexity"][0],
                                                       rel=1e-5)
        assert row["dev_perplexity"] != row["test_perplexity"]
    best = runs.sort("dev_perplexity", "lr").group_by("method", maintain_order=True).first()
    chosen = runs.filter(pl.col("selected"))
    assert set(zip(best["method"], best["lr"])) == set(zip(chosen["method"], chosen["lr"]))
    tokens = pl.read_parquet(work / "results" / "tokens" / "ca.parquet")
    dev = set(tokens.filter(pl.col("split") == "dev")["doc_id"])
    assert dev and not dev & set(tokens.filter(pl.col("split") == "test")["doc_id"])
    selected = json.loads((work / "results" / "routing" / "selected_experts.json").read_text())
    ssft = runs.filter(pl.col("method") == "ssft").row(0, named=True)
    assert ssft["experts_per_layer"] == [len(selected["ca"]["ssft"][str(l)]) for l in ssft["layers"]]


def test_sharded_jobs_give_what_one_job_gives(tiny_run, tmp_path, monkeypatch):
    from moelang import config as cfg
    from moelang.routing import profile_model

    work, proc = tiny_run
    monkeypatch.chdir(work)  # the config's local corpus paths are relative to the work directory
    res = work / "results"
    config = cfg.load(work / "config.yaml")
    log = proc.stdout + proc.stderr
    for rule in ("corpus_shard", "corpus_gather", "tokenize_shard", "tokenize_gather", "profile_routing_shard",
                 "merge_routing"):
        assert f"rule {rule}:" in log, rule
    # ca's corpus came from 2 shards; es's tokens from 2 row ranges; every profile from 2 chunk shards
    corpus.build_corpus("ca", cfg.corpus_options(config, "ca"), tmp_path / "ca.parquet", tmp_path / "ca.json")
    assert pq.read_table(res / "corpus" / "ca.parquet").equals(pq.read_table(tmp_path / "ca.parquet"))
    assert json.loads((res / "corpus" / "ca.stats.json").read_text()) == json.loads((tmp_path / "ca.json").read_text())
    tokenize.tokenize_corpus(res / "corpus" / "es.parquet", res / "tokenizer", tmp_path / "es.parquet",
                             tmp_path / "es.freq.parquet")
    assert pq.read_table(res / "tokens" / "es.parquet").equals(pq.read_table(tmp_path / "es.parquet"))
    assert pq.read_table(res / "tokens" / "es.freq.parquet").equals(pq.read_table(tmp_path / "es.freq.parquet"))
    options = cfg.routing_options(config, "cpt-step6")
    profile_model(res / "models" / "cpt" / "step-6", {"es": res / "tokens" / "es.parquet"}, options,
                  tmp_path / "routing", "cpt", 6)
    whole = pq.read_table(tmp_path / "routing" / "es.parquet")
    merged = pq.read_table(res / "routing" / "cpt-step6" / "es.parquet")
    assert merged.column("count").to_pylist() == whole.column("count").to_pylist()
    assert merged.column("n_tokens").to_pylist() == whole.column("n_tokens").to_pylist()
    # the parts were temporary
    assert not any(p.is_file() for stage in ("corpus", "tokens", "routing") for p in (res / stage / "shards").rglob("*"))


def test_rerun_has_nothing_to_do(tiny_run):
    """A finished run is a fixed point (test_workflow_dense.py checks it with the expansion stage too)."""
    work, _ = tiny_run
    proc = snakemake(work, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_bad_config_stops_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"languages": {"high_resource": ["en", "es"]}, "corpus": {"sources": {"es": {"type": "web"}}}}))
    proc = snakemake(tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "moelang: error: config key 'corpus.sources.es.type'" in proc.stderr
    assert not (tmp_path / "results").exists()


def _dry_run_jobs(log: str) -> list[dict]:
    """Each job of a dry run's listing: its rule and its input/output/wildcards lines."""
    jobs = []
    for block in log.split("\nrule ")[1:]:
        rule, _, body = block.partition(":\n")
        fields = dict(line.strip().split(": ", 1) for line in body.splitlines()
                      if line.startswith("    ") and ": " in line)
        jobs.append({"rule": rule.strip(), **fields})
    return jobs


EXPAND_DAG_RULES = ["corpus_summary", "allocate_experts", "expand", "expand_stage1", "expand_stage2", "gather_expand",
                    "evaluate", "eval_summary"]


def expand_dag(work, plan: dict) -> dict[str, list[dict]]:
    """The dry run's jobs by rule from the allocation on, of .test/config-expand-dag.yaml with the
    allocation plan ``plan``. The allocation is a checkpoint (the plans decide which variants share a
    model), so the stages before it are laid down as files and only the rules from the corpus and
    allocation checkpoints on are allowed; no job runs."""
    import os

    from moelang import config as cfg
    from moelang import registry

    copy_test_config("expand-dag", work)
    config = cfg.validate(yaml.safe_load((work / "config.yaml").read_text()))
    res = work / "results"
    for path in ("corpus", "tokens", "similarity", "routing/metrics", "allocation", "eval/tasks"):
        (res / path).mkdir(parents=True, exist_ok=True)
    for lang in ("en", "es", "ca"):
        (res / "corpus" / f"{lang}.stats.json").write_text("{}")
        (res / "tokens" / f"{lang}.parquet").write_bytes(b"")
    (res / "corpus" / "languages.json").write_text(json.dumps({"kept": ["en", "es", "ca"], "dropped": {}}))
    (res / "corpus" / "summary.parquet").write_bytes(b"")
    models = [e.ref for e in registry.evaluated(config).values() if e.variant is None and e.ref.startswith("results/")]
    start = cfg.expand_start(config)
    for ref in models + [start.ref, f"results/routing/{start.name}"]:
        (work / ref).mkdir(parents=True, exist_ok=True)
    (res / "similarity" / f"{start.name}.tokens.parquet").write_bytes(b"")
    (res / "routing" / "metrics" / "specialization.parquet").write_bytes(b"")
    later = os.stat(res / "corpus" / "summary.parquet").st_mtime + 10  # the plan is newer than its inputs
    for name, text in (("plan.json", json.dumps(plan)), ("plan.parquet", ""), ("plan.png", "")):
        (res / "allocation" / name).write_text(text)
        os.utime(res / "allocation" / name, (later, later))
    proc = snakemake(work, "--dry-run", "--allowed-rules", *EXPAND_DAG_RULES, "--", "results/eval/results.parquet",
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_rule = {}
    for job in _dry_run_jobs(proc.stdout):
        by_rule.setdefault(job["rule"], []).append(job)
    assert "allocate_experts" not in by_rule, "the laid-down plan must be up to date"
    return by_rule, proc


def test_a_budget_that_forces_identical_plans_is_named_at_start_up(tmp_path):
    """Before the allocation has run, a budget of one new expert per layer (4 on the default's 4 layers)
    already makes every plan [1, 1, 1, 1]: one line says which variants will share a model."""
    copy_test_config("expand-dag", tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["allocation"] = {"new_experts": 4, "uniform_per_layer": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("moelang: note: allocation.new_experts")]
    assert notes == ["moelang: note: allocation.new_experts 4 on 4 layers: expansion variants with identical plans "
                     "share one trained and evaluated model: layermoe, routing-informed (new experts per layer "
                     "[1, 1, 1, 1], classifier yes: trained once as layermoe); uniform, mola, layermoe-no-classifier "
                     "(new experts per layer [1, 1, 1, 1], classifier no: trained once as uniform); they are one model "
                     "in the results, not a comparison (change allocation.new_experts or expand.variants to compare "
                     "different plans)"]


def plan_entry(new: list[int], classifier_layers: list[int]) -> dict:
    return {"experts_per_layer": [8 + n for n in new], "new_experts_per_layer": new,
            "classifier_layers": classifier_layers}


def test_the_dag_expands_every_variant_and_trains_stage1_once_per_plan(tmp_path):
    plan = {"layermoe": plan_entry([1, 1, 0, 1], [2]), "uniform": plan_entry([1, 1, 1, 0], []),
            "mola": plan_entry([0, 1, 1, 1], []), "routing": plan_entry([1, 0, 1, 1], [1]), "_meta": {}}
    by_rule, _ = expand_dag(tmp_path, plan)
    variants = ["layermoe", "uniform", "mola", "routing-informed", "layermoe-no-classifier"]
    # stage 0 and stage 1 once per distinct plan, under the first variant with that plan
    owners = ["layermoe", "uniform", "mola", "routing-informed"]
    assert sorted(j["wildcards"] for j in by_rule["expand"]) == sorted(f"variant={v}" for v in owners)
    assert sorted(j["output"] for j in by_rule["expand_stage1"]) == sorted(f"results/expand/{v}/stage1" for v in owners)
    stage2 = {j["wildcards"].removeprefix("variant="): j for j in by_rule["expand_stage2"]}
    assert sorted(stage2) == sorted(variants)
    assert stage2["layermoe-no-classifier"]["input"].startswith("results/expand/layermoe/stage1, ")
    assert stage2["mola"]["input"].startswith("results/expand/mola/stage1, ")
    # stage 1 reads the new languages, stage 2 the new and the old; stage 0 the plan and the profile
    assert by_rule["expand_stage1"][0]["input"].endswith(", results/tokens/ca.parquet")
    assert stage2["uniform"]["input"].endswith("results/tokens/ca.parquet, results/tokens/en.parquet, "
                                               "results/tokens/es.parquet")
    assert all("results/allocation/plan.json" in j["input"] and "results/routing/cpt-step800" in j["input"]
               for j in by_rule["expand"])
    (gather,) = by_rule["gather_expand"]
    assert gather["output"] == "results/expand/runs.parquet"
    assert gather["input"] == ", ".join([f"results/expand/{v}/stage2" for v in variants]
                                        + ["results/allocation/plan.json"])
    # every stage-2 model is evaluated and summarised, with the runs table as an input of the summary
    evaluated = {j["wildcards"].removeprefix("model=") for j in by_rule["evaluate"]}
    assert {f"expand-{v}" for v in variants} <= evaluated
    (summary,) = by_rule["eval_summary"]
    assert "results/expand/runs.parquet" in summary["input"] and "results/eval/expansion.parquet" in summary["output"]
    assert "log" in by_rule["expand_stage2"][0] and by_rule["expand_stage2"][0]["log"].startswith("results/logs/expand/")


def test_variants_whose_plans_coincide_are_trained_and_evaluated_once_per_plan_and_classifier(tmp_path):
    """A budget of one new expert per layer: every plan is [1, 1, 1, 1] (the classifier layers too are
    the same), so the five default variants are two models: with a classifier and without."""
    ones = plan_entry([1, 1, 1, 1], [0, 1, 2, 3])
    by_rule, proc = expand_dag(tmp_path, {m: ones for m in ("layermoe", "uniform", "mola", "routing")} | {"_meta": {}})
    assert [j["output"] for j in by_rule["expand"]] == ["results/expand/layermoe/stage0"]
    assert [j["output"] for j in by_rule["expand_stage1"]] == ["results/expand/layermoe/stage1"]
    stage2 = {j["wildcards"].removeprefix("variant="): j for j in by_rule["expand_stage2"]}
    assert sorted(stage2) == ["layermoe", "uniform"]
    assert all(j["input"].startswith("results/expand/layermoe/stage1, ") for j in stage2.values())
    evaluated = {j["wildcards"].removeprefix("model=") for j in by_rule["evaluate"]}
    assert {m for m in evaluated if m.startswith("expand-")} == {"expand-layermoe", "expand-uniform"}
    (summary,) = by_rule["eval_summary"]
    assert "results/eval/expand-mola/" not in summary["input"] and "results/eval/expand-uniform/" in summary["input"]
    (gather,) = by_rule["gather_expand"]
    assert gather["input"] == "results/expand/layermoe/stage2, results/expand/uniform/stage2, " \
                              "results/allocation/plan.json"
    # one line says so, naming the variants that coincide
    notes = [line for line in proc.stderr.splitlines() if "expansion variants with identical plans" in line]
    assert len(notes) == 1, proc.stderr[-3000:]
    assert "layermoe, routing-informed (new experts per layer [1, 1, 1, 1], classifier yes" in notes[0]
    assert "uniform, mola, layermoe-no-classifier (new experts per layer [1, 1, 1, 1], classifier no" in notes[0]

"""The model registry: every model of the DAG once, and the training run's record that the evaluation
summary reads the trainable fraction from."""

import json

import polars as pl
import pytest

from moelang import config as cfg
from moelang import registry
from moelang.errors import ConfigError


def minimal(**extra):
    return {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4},
            **extra}


def save_pretrained_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return str(path)


def test_default_config_registry(repo):
    config = cfg.load(repo / "config" / "config.yaml")
    models = registry.model_registry(config)
    steps = [0, 200, 400, 600, 800]
    adapted = [f"adapt-{lang}-{m}" for lang in ("ca", "uk") for m in config["adapt"]["methods"]]
    variants = ["layermoe", "uniform", "mola", "routing-informed", "layermoe-no-classifier"]
    expanded = [f"expand-{v}" for v in variants]
    assert list(models) == ["base"] + [f"cpt-step{s}" for s in steps] + adapted + expanded
    for variant in variants:  # each variant's stage-2 model, evaluated against the model it expanded
        entry = models[f"expand-{variant}"]
        assert (entry.ref, entry.rule, entry.method, entry.variant, entry.start) == (
            f"results/expand/{variant}/stage2", "expand_stage2", variant, variant, "cpt-step800")
        assert entry.evaluated and not entry.profiled and entry.target is None
    for name in adapted:  # the selected run of each (target, method), evaluated against its start
        entry = models[name]
        assert entry.ref == f"results/adapt/{entry.target}/{entry.method}/selected" and entry.rule == "select_adapt"
        assert entry.evaluated and not entry.profiled and entry.start == "cpt-step800"
    base = models["base"]
    assert (base.ref, base.rule, base.method, base.profiled, base.evaluated) == (
        "results/models/base", "pretrain_base", "base", False, False)
    for step in steps:
        entry = models[f"cpt-step{step}"]
        assert entry.ref == f"results/models/cpt/step-{step}" and entry.rule == "cpt" and entry.revision is None
        assert entry.method == ("base" if step == 0 else "cpt")
        assert entry.profiled and entry.evaluated
        assert (entry.series, entry.checkpoint_step) == ("cpt", step)
        assert registry.workflow_inputs(entry) == [entry.ref]
    assert list(registry.profiled(config)) == [f"cpt-step{s}" for s in steps]
    assert list(registry.evaluated(config)) == [f"cpt-step{s}" for s in steps] + adapted + expanded
    assert registry.workflow_outputs(config) == {"results/models/base"} | {f"results/models/cpt/step-{s}" for s in steps} | {
        models[name].ref for name in adapted + expanded}
    assert registry.summary_models(config)["expand-mola"]["variant"] == "mola"
    # what the routing jobs get is what they got from the former name building
    options = cfg.routing_options(config, "cpt-step400")
    assert (options.ref, options.model, options.checkpoint_step, options.revision) == (
        "results/models/cpt/step-400", "cpt", 400, None)


def test_paper_config_step_zero_is_the_hub_base_with_its_revision(repo, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # with hub access the hub id is taken as it is
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = cfg.load(repo / "config" / "olmoe-m7.yaml")
    hub_id = config["model"]["base"]["name_or_path"]
    revision = config["model"]["base"].get("revision")
    models = registry.model_registry(config)
    steps = cfg.cpt_options(config).steps
    assert 0 not in steps  # a 7B base is not copied into results/
    adapted = [f"adapt-{lang}-{m}" for lang in config["languages"]["targets"] for m in config["adapt"]["methods"]]
    expanded = [f"expand-{v}" for v in config["expand"]["variants"]]
    assert list(models) == ["cpt-step0"] + [f"cpt-step{s}" for s in steps] + adapted + expanded
    step0 = models["cpt-step0"]
    assert (step0.ref, step0.revision, step0.rule, step0.method) == (hub_id, revision, None, "base")
    assert step0.profiled and step0.evaluated and (step0.series, step0.checkpoint_step) == ("cpt", 0)
    assert registry.workflow_inputs(step0) == []  # read from the hub, not a job's output
    assert all(models[f"cpt-step{s}"].revision is None and models[f"cpt-step{s}"].rule == "cpt" for s in steps)
    assert cfg.routing_options(config, "cpt-step0").revision == revision
    assert cfg.evaluation_options(config, "cpt-step0").revision == revision
    assert cfg.evaluation_options(config, f"cpt-step{steps[-1]}").revision is None


def test_cpt_off_with_listed_models(tmp_path):
    outside = save_pretrained_dir(tmp_path / "lora-merged")
    config = cfg.validate(minimal(model={"cpt": {"enabled": False}}, adapt={"enabled": False}, evaluation={"models": {
        "again": {"ref": "results/models/base", "method": "base-copy"},
        "lora": {"ref": outside, "method": "lora", "trainable_fraction": 0.03}}}))
    models = registry.model_registry(config)
    assert list(models) == ["base", "again", "lora"]
    base = models["base"]
    assert base.profiled and base.evaluated and base.rule == "pretrain_base" and base.series == "base"
    # a listed model that is a workflow output is made by that output's rule: its jobs wait for it
    assert models["again"].rule == "pretrain_base" and registry.workflow_inputs(models["again"]) == ["results/models/base"]
    lora = models["lora"]
    assert (lora.rule, lora.profiled, lora.evaluated, lora.method, lora.trainable_fraction) == (
        None, False, True, "lora", 0.03)
    assert registry.workflow_inputs(lora) == []
    assert list(registry.profiled(config)) == ["base"]
    assert list(registry.evaluated(config)) == ["base", "again", "lora"]
    assert registry.summary_models(config)["lora"] == {"ref": outside, "method": "lora", "trainable_fraction": 0.03,
                                                   "target": None, "start": None, "variant": None}


def test_a_listed_model_cannot_take_a_workflow_models_name(tmp_path):
    outside = save_pretrained_dir(tmp_path / "m")
    with pytest.raises(ConfigError, match="config key 'evaluation.models.cpt-step0': the model name 'cpt-step0' is "
                                          "taken"):
        cfg.validate(minimal(evaluation={"models": {"cpt-step0": {"ref": outside, "method": "x"}}}))


def test_a_producer_adds_models_before_the_listed_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "MODEL_PRODUCERS", list(registry.MODEL_PRODUCERS))
    outside = save_pretrained_dir(tmp_path / "m")

    @registry.model_producer
    def adapted(config):
        return [registry.ModelEntry(name="ssft", ref="results/models/ssft", revision=None, method="ssft",
                                    rule="adapt_ssft", profiled=True, evaluated=True, series="ssft",
                                    checkpoint_step=0)]

    registry.model_producer(adapted)  # registering twice adds it once
    # the start-up check knows the new output: a listed model may point at it
    config = cfg.validate(minimal(evaluation={"models": {"mine": {"ref": "results/models/ssft", "method": "x"},
                                                         "other": {"ref": outside, "method": "y"}}}))
    models = registry.model_registry(config)
    assert list(models)[-3:] == ["ssft", "mine", "other"]
    assert models["mine"].rule == "adapt_ssft"
    assert "ssft" in registry.profiled(config) and "results/models/ssft" in registry.workflow_outputs(config)


# --------------------------------------------------------------------------------------------------
# The run's record
# --------------------------------------------------------------------------------------------------

def test_cpt_exports_carry_the_runs_record(tmp_path):
    from test_resume_cli import make_base
    from test_train import patterned_docs, write_tokens
    from transformers import AutoModelForCausalLM

    from moelang.basemodel import continual_pretrain

    make_base(tmp_path / "base")
    tokens = {"en": write_tokens(tmp_path / "en.parquet", patterned_docs(200, 0)),
              "es": write_tokens(tmp_path / "es.parquet", patterned_docs(200, 1))}
    seq_len, batch, steps = 16, 4, 4
    options = {"base": {"type": "train"}, "dtype": "float32", "device": "cpu", "experts_implementation": None,
               "seed": 0, "steps": [0, 2, steps],
               "train": {"steps": steps, "seq_len": seq_len, "micro_batch_size": batch, "lr": 0.005}}
    continual_pretrain(tmp_path / "base", tokens, options, tmp_path / "cpt", tmp_path / "state")
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "base").parameters())
    for step in (0, 2, steps):
        record = json.loads((tmp_path / "cpt" / f"step-{step}" / registry.RUN_RECORD).read_text())
        assert record == {"method": "cpt", "total_parameters": total, "trainable_parameters": total,
                          "trainable_fraction": 1.0, "steps": step, "tokens": step * batch * seq_len}
        assert registry.read_run_record(tmp_path / "cpt" / f"step-{step}") == record


def test_the_pretrained_base_carries_the_runs_record(tmp_path):
    from families import COMMON, FAMILY_CONFIGS
    from test_resume_cli import make_base
    from test_train import patterned_docs, write_tokens
    from transformers import AutoModelForCausalLM

    from moelang.basemodel import pretrain_base

    make_base(tmp_path / "tokenizer")  # its tokenizer
    tokens = write_tokens(tmp_path / "en.parquet", patterned_docs(200, 0))
    architecture = {"model_type": "olmoe", **{k: v for k, v in COMMON.items() if not k.endswith("_token_id")},
                    **FAMILY_CONFIGS["olmoe"]}
    options = {"base": {"type": "train", "architecture": architecture}, "seed": 0, "language": "en",
               "experts_implementation": None,
               "train": {"steps": 3, "seq_len": 16, "micro_batch_size": 2, "lr": 0.005}}
    pretrain_base(tokens, tmp_path / "tokenizer", options, tmp_path / "base", tmp_path / "state")
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "base").parameters())
    assert registry.read_run_record(tmp_path / "base") == {
        "method": "pretrain", "total_parameters": total, "trainable_parameters": total, "trainable_fraction": 1.0,
        "steps": 3, "tokens": 3 * 2 * 16}


def test_eval_summary_reads_the_trainable_fraction_from_the_record(tmp_path, monkeypatch):
    from test_evaluate import _fake_eval

    from moelang import evaluate as ev

    monkeypatch.chdir(tmp_path)
    counts = {"total": 1000, "trainable": 125, "trainable_fraction": 0.125}
    recorded = tmp_path / "results" / "models" / "ssft"
    recorded.mkdir(parents=True)
    registry.write_run_record(recorded, "ssft", counts, 10, 640)
    (tmp_path / "results" / "models" / "cpt" / "step-5").mkdir(parents=True)
    registry.write_run_record(tmp_path / "results" / "models" / "cpt" / "step-5", "cpt",
                              {"total": 1000, "trainable": 1000, "trainable_fraction": 1.0}, 5, 320)
    models = {"cpt-step0": {"ref": "results/models/cpt/step-0", "method": "base", "trainable_fraction": None},
              "cpt-step5": {"ref": "results/models/cpt/step-5", "method": "cpt", "trainable_fraction": None},
              # the record wins over a configured value
              "ssft": {"ref": str(recorded), "method": "ssft", "trainable_fraction": 0.9},
              # an external model without a record: the configured value, or nothing
              "lora": {"ref": "someone/lora-model", "method": "lora", "trainable_fraction": 0.03},
              "other": {"ref": "someone/other-model", "method": "other", "trainable_fraction": None}}
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    _fake_eval(eval_dir, models, {name: 0.5 for name in models}, {name: [25, 25, 25, 25] for name in models})
    ev.summarize(eval_dir, models, eval_dir / "tasks", ["synthetic_belebele"], ["es"], ["ca"], "cpt-step0")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2]
            for line in (eval_dir / "summary.md").read_text().splitlines() if line.startswith("| ") and " | " in line
            and not line.startswith("| model")}
    assert rows == {"cpt-step0": "-", "cpt-step5": "1.000", "ssft": "0.125", "lora": "0.030", "other": "-"}
    assert pl.read_parquet(eval_dir / "results.parquet")["model"].unique().len() == len(models)


def test_an_unreadable_record_is_one_line(tmp_path):
    from moelang.errors import MoelangError

    (tmp_path / registry.RUN_RECORD).write_text("{not json")
    with pytest.raises(MoelangError, match="model record .* is not readable.*run the step that makes it again"):
        registry.read_run_record(tmp_path)


def test_the_rule_files_read_the_registry(repo):
    # no rule tells workflow outputs from other models by the look of their path any more
    for rule_file in (repo / "workflow" / "rules").glob("*.smk"):
        assert 'startswith("results/")' not in rule_file.read_text(), rule_file.name


def test_expanded_models_start_from_the_configured_model(tmp_path):
    # off by default: no expanded model
    assert not any(e.variant for e in registry.model_registry(cfg.validate(minimal())).values())
    config = cfg.validate(minimal(expand={"enabled": True, "model": "cpt-step400",
                                          "variants": {"a": {"plan": "layermoe"}, "b": {"plan": "uniform"}}}))
    models = registry.model_registry(config)
    assert [n for n, e in models.items() if e.variant] == ["expand-a", "expand-b"]
    assert {models["expand-a"].start, models["expand-b"].start} == {"cpt-step400"}
    # a directory that a listed model is: that model's name, so the comparison finds its scores
    other = save_pretrained_dir(tmp_path / "other")
    config = cfg.validate(minimal(expand={"enabled": True, "model": other},
                                  evaluation={"models": {"mine": {"ref": other, "method": "external"}}}))
    assert registry.model_registry(config)["expand-layermoe"].start == "mine"
    assert cfg.expand_start(config).name == "mine" and cfg.expand_options(config, "uniform").ref == other
    # a directory nobody lists: named by its path, not profiled (random copies), not evaluated
    config = cfg.validate(minimal(expand={"enabled": True, "model": other}))
    start = cfg.expand_start(config)
    assert (start.name, start.ref, start.evaluated, start.profiled) == (other, other, False, False)
    assert cfg.expand_options(config, "layermoe").profile_model is None

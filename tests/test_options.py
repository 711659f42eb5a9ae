"""Typed stage options: tied to the config schema, built from the shipped configs, parsed by the CLI."""

import dataclasses
import json
import subprocess
import sys

import pytest

from moelang import config as cfg
from moelang import options as opts
from moelang.errors import ConfigError

OPTION_CLASSES = sorted({*opts.STAGE_OPTIONS.values(), opts.TrainSettings, opts.ModelOptions, opts.LoadOptions},
                        key=lambda c: c.__name__)


MINIMAL = {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4}}


def _schema_section(path: str) -> tuple[dict, dict | None]:
    """The schema node of a dotted config section (``$ref`` resolved), and the defaults a user gets in
    it: the section of a validated minimal config (nested defaults filled in), or for a shared
    definition (the training settings) its own property defaults."""
    schema = cfg.load_schema()
    node, values = schema, cfg.validate(MINIMAL)
    for key in path.split("."):
        node, values = node["properties"][key], values[key]
        ref = node.get("$ref") or next((part["$ref"] for part in node.get("allOf", []) if "$ref" in part), None)
        if ref:
            node = schema["definitions"][ref.rsplit("/", 1)[-1]]
            values = {k: v["default"] for k, v in node["properties"].items() if "default" in v}
    return node, values


def _plain(value):
    """JSON form, so that a tuple default compares equal to the schema's list."""
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("cls", [c for c in OPTION_CLASSES if c.SECTION], ids=lambda c: c.__name__)
def test_fields_are_the_schema_section_and_defaults_agree(cls):
    node, defaults = _schema_section(cls.SECTION)
    section = node["properties"]
    given = MINIMAL.get(cls.SECTION, {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = set(fields) - cls.DERIVED
    # every field read from the section is a key the user can set, and every key of the section is an
    # option of this stage or declared as another stage's (no key the code reads that the schema cannot set)
    assert own <= set(section), f"{cls.__name__} reads {sorted(own - set(section))} that {cls.SECTION} cannot set"
    assert set(section) - cls.NOT_OPTIONS <= set(fields), (
        f"{cls.SECTION} keys {sorted(set(section) - cls.NOT_OPTIONS - set(fields))} are no option of {cls.__name__}")
    assert not (cls.NOT_OPTIONS & own), f"{cls.__name__}: declared not-options that are options"
    for name in own:
        f = fields[name]
        if name not in defaults or name in given:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        assert default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default; config: {defaults[name]!r}"
        assert _plain(default) == _plain(defaults[name]), (
            f"{cls.__name__}.{name} defaults to {default!r}, the config to {defaults[name]!r}")


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = opts.field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not undocumented, f"{cls.__name__}: no docstring under {undocumented}"
    assert all(f"  {f.name}:" in opts.describe(cls) for f in dataclasses.fields(cls))


def _every_stage_options(config: dict) -> list[opts.StageOptions]:
    from moelang import registry

    kept = cfg.all_languages(config)
    out = [cfg.corpus_options(config, lang) for lang in kept]
    out += [cfg.parallel_options(config), cfg.tokenizer_options(config), cfg.cpt_options(config),
            cfg.routing_metrics_options(config), cfg.allocation_options(config, kept),
            cfg.evaluation_options(config), cfg.eval_summary_options(config, config["evaluation"]["tasks"])]
    if config["model"]["base"]["type"] == "train":
        out.append(cfg.pretrain_options(config))
    out += [cfg.routing_options(config, name) for name in registry.profiled(config)]
    out += [cfg.similarity_options(config, name) for name in registry.profiled(config)]
    out += [cfg.evaluation_options(config, name) for name in registry.evaluated(config)]
    out += [cfg.expand_options(config, variant, kept) for variant in cfg.expand_variants(config)]
    return out


@pytest.mark.parametrize("name", ["config.yaml", "olmoe-m7.yaml", "layermoe-qwen.yaml"])
def test_every_stage_builds_from_the_shipped_configs_and_survives_json(repo, name, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the paper config names hub models
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = cfg.load(repo / "config" / name)
    built = _every_stage_options(config)
    assert {type(o) for o in built} >= {opts.CorpusOptions, opts.RoutingOptions, opts.SimilarityOptions,
                                        opts.EvaluationOptions, opts.CptOptions, opts.AllocationOptions}
    for options in built:
        again = type(options).from_json(cfg.to_json(options))
        assert again == options, type(options).__name__
    cpt = cfg.cpt_options(config)
    assert isinstance(cpt.train, opts.TrainSettings) and cpt.train.steps == config["model"]["cpt"]["train"]["steps"]
    assert cpt.train.betas == tuple(config["model"]["cpt"]["train"]["betas"])


def test_paper_config_values_reach_the_options(repo, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = cfg.load(repo / "config" / "olmoe-m7.yaml")
    train = cfg.cpt_options(config).train
    assert (train.grad_accum, train.z_loss_coef, train.warmup_start_ratio, train.decay_norms_and_biases) == (
        64, 0.001, 0.1, True)
    routing = cfg.routing_options(config, list(__import__("moelang.registry").registry.profiled(config))[-1])
    assert (routing.windowing, routing.seq_len) == ("stream", 2048)


def test_options_of_one_stage_leave_out_other_stages_keys():
    """Changing an expert-selection option must not make Snakemake redo the routing profiles."""
    base = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                         "allocation": {"new_experts": 4}})
    changed = cfg.validate({**base, "routing": {**base["routing"], "alpha": 0.2, "shared_k": 3}})
    name = "cpt-step800"
    assert cfg.to_json(cfg.routing_options(base, name)) == cfg.to_json(cfg.routing_options(changed, name))
    assert cfg.to_json(cfg.routing_metrics_options(base)) != cfg.to_json(cfg.routing_metrics_options(changed))


def test_selection_model_is_settable_and_checked():
    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4}, "routing": {"selection_model": "cpt-step400"}})
    assert cfg.routing_metrics_options(config).selection_model == ("cpt", 400)
    default = cfg.validate({**config, "routing": {**config["routing"], "selection_model": None}})
    assert cfg.routing_metrics_options(default).selection_model == ("cpt", 800)
    with pytest.raises(ConfigError, match="routing.selection_model.*cpt-step401.*cpt-step400"):
        cfg.validate({**config, "routing": {**config["routing"], "selection_model": "cpt-step401"}})


def test_evaluation_max_length_and_bootstrap_iters_are_config_keys():
    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4},
                           "evaluation": {"max_length": 256, "bootstrap_iters": 0}})
    options = cfg.evaluation_options(config, "cpt-step800")
    assert (options.max_length, options.bootstrap_iters) == (256, 0)
    with pytest.raises(ConfigError, match="evaluation.bootstrap_iters"):
        cfg.validate({**config, "evaluation": {**config["evaluation"], "bootstrap_iters": -1}})


def test_parsing_names_the_bad_key_and_converts_types():
    with pytest.raises(ConfigError, match="unknown option 'seq_lne'; did you mean 'seq_len'"):
        opts.RoutingOptions.from_json('{"seq_lne": 4}')
    with pytest.raises(ConfigError, match="missing option.*steps"):
        opts.TrainSettings.from_dict({"lr": 0.1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        opts.RoutingOptions.from_json("{seq_len: 4}")
    with pytest.raises(ConfigError, match="parallelism"):
        opts.TrainSettings.from_dict({"steps": 2, "parallelism": "zero3"})
    parsed = opts.CptOptions.from_json(json.dumps({"train": {"steps": 3, "betas": [0.8, 0.9]}, "steps": [0, 3]}))
    assert parsed.train == opts.TrainSettings(steps=3, betas=(0.8, 0.9)) and parsed.steps == [0, 3]
    assert opts.RoutingOptions.from_json('{"shard": [1, 4]}').shard == (1, 4)
    assert opts.AllocationOptions.from_dict({"classifier_layers": [5, 6]}).classifier_layers == [5, 6]
    # stage functions take a dict too (checked the same way)
    assert opts.SimilarityOptions.coerce({"seq_len": 64}).seq_len == 64
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        opts.SimilarityOptions.coerce({"seqlen": 64})


def test_cli_stops_in_one_line_on_a_stale_option(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moelang", "routing-metrics", "--options", '{"alpah": 0.1}',
                             "--profiles", "x.parquet", "--overlap", "y.parquet", "--out", str(tmp_path),
                             "--selected", str(tmp_path / "s.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "moelang: error: --options (RoutingMetricsOptions): unknown option 'alpah'; did you mean 'alpha'?")


def test_options_command_describes_a_stage():
    result = subprocess.run([sys.executable, "-m", "moelang", "options", "profile-routing"],
                            capture_output=True, text=True, check=True)
    assert "windowing: str = 'document'" in result.stdout and "across documents" in result.stdout

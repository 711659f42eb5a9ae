import subprocess
import sys

import pytest
import yaml

from moelang import config as cfg
from moelang.errors import ConfigError


def minimal(**extra):
    return {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4},
            **extra}


def test_defaults_are_filled_from_the_schema():
    config = cfg.validate(minimal())
    assert config["seed"] == 0
    assert config["languages"]["base"] == "en"
    assert config["corpus"]["heldout_fraction"] == 0.1
    assert config["corpus"]["default_source"] == {"type": "builtin"}
    assert config["corpus"]["parallel"]["min_languages"] == 2
    assert config["tokenizer"]["type"] == "train"
    assert config["overlap"]["min_count"] == 1


def test_source_defaults_depend_on_the_source_type():
    config = cfg.validate(minimal(corpus={"sources": {"es": {"type": "local", "path": "x.txt"}}}))
    source = cfg.source_for(config, "es")
    assert source == {"type": "local", "path": "x.txt", "format": "auto", "text_column": "text", "txt_mode": "line",
                      "encoding": "utf-8", "max_docs": None, "max_chars": None}
    assert cfg.source_for(config, "en") == {"type": "builtin"}


def test_embedded_default_config_is_valid(repo):
    config = cfg.load(repo / "config" / "config.yaml")
    assert cfg.all_languages(config) == ["en", "ar", "cs", "es", "fi", "hi", "ru", "ca", "et", "mr", "sk", "uk", "ur"]
    assert config["languages"]["targets"] == {"ca": "es", "et": "fi", "mr": "hi", "sk": "cs", "uk": "ru", "ur": "ar"}


@pytest.mark.parametrize(
    "config, key, words",
    [
        (minimal(corpus={"heldout_fraction": 0.9}), "corpus.heldout_fraction", "maximum"),
        (minimal(corpus={"sources": {"es": {"type": "ftp"}}}), "corpus.sources.es.type", "ftp"),
        (minimal(corpus={"sources": {"es": {"type": "local"}}}), "corpus.sources.es", "path"),
        (minimal(corpus={"sources": {"es": {"type": "local", "path": "a", "colum": "t"}}}), "corpus.sources.es", "colum"),
        (minimal(tokenizr={}), "(top level)", "tokenizr"),
        ({"languages": {"high_resource": ["en", "es;rm -rf"]}}, "languages.high_resource.1", "language code"),
        ({"languages": {"high_resource": ["en", "../x"]}}, "languages.high_resource.1", "language code"),
        (minimal(languages={"high_resource": ["en"], "targets": {"ca": "es"}}), "languages.targets.ca", "parent"),
        (minimal(languages={"high_resource": ["en", "es"], "targets": {"es": "en"}}), "languages.targets.es", "both"),
        (minimal(corpus={"sources": {"de": {"type": "builtin"}}}), "corpus.sources.de", "not a configured language"),
        (minimal(tokenizer={"type": "pretrained"}), "tokenizer.name_or_path", "hub id"),
        (minimal(allocation={}), "allocation", "exactly one budget"),
        (minimal(allocation={"delta": 5, "new_experts": 4}), "allocation", "exactly one budget"),
        (minimal(similarity={"model": "cpt-step7"}), "similarity.model", "not a profiled model"),
        (minimal(model={"base": {"type": "pretrained", "name_or_path": "x/y"}}), "tokenizer.type", "own tokenizer"),
        ({}, "(top level)", "languages"),
    ],
)
def test_bad_config_names_the_key(config, key, words):
    with pytest.raises(ConfigError) as info:
        cfg.validate(config)
    message = str(info.value)
    assert f"'{key}'" in message
    assert words in message
    assert "\n" not in message


def test_stage_options_are_stable_json():
    config = cfg.validate(minimal())
    a = cfg.to_json(cfg.corpus_options(config, "es"))
    b = cfg.to_json(cfg.corpus_options(cfg.validate(minimal()), "es"))
    assert a == b and cfg.from_json(a)["source"] == {"type": "builtin"}


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(corpus={"min_chars": 0})))
    proc = subprocess.run([sys.executable, "-m", "moelang", "corpus", "--lang", "es", "--config", str(bad),
                           "--out", str(tmp_path / "es.parquet"), "--stats", str(tmp_path / "es.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["moelang: error: config key 'corpus.min_chars': 0 is less than the minimum of 1; "
                     "fix the value (see config/README.md)"]
    assert not (tmp_path / "es.parquet").exists()


def test_cli_rejects_a_language_code_that_could_reach_a_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moelang", "corpus", "--lang", "../../etc", "--options", "{}",
                           "--out", str(tmp_path / "x.parquet"), "--stats", str(tmp_path / "x.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is not a language code" in proc.stderr and "Traceback" not in proc.stderr


def test_rule_resources_merge_stage_defaults_and_config():
    config = cfg.validate(minimal(resources={"default": {"slurm_partition": "gpu", "runtime": 30},
                                             "cpt": {"gpu": 4, "slurm_extra": "--gres=gpu:a100:4"}}))
    assert cfg.rule_resources(config, "cpt") == {"runtime": 30, "mem_mb": 256000, "gpu": 4, "slurm_partition": "gpu",
                                                 "slurm_extra": "--gres=gpu:a100:4"}
    assert cfg.rule_resources(config, "overlap") == {"runtime": 30, "mem_mb": 8000, "slurm_partition": "gpu"}
    cpu_only = cfg.validate(minimal(resources={"gpus": False}))
    assert "gpu" not in cfg.rule_resources(cpu_only, "pretrain_base")
    with pytest.raises(ConfigError, match="'resources.tokenise': not a rule"):
        cfg.validate(minimal(resources={"tokenise": {"mem_mb": 10}}))
    with pytest.raises(ConfigError, match="resources.cpt.slurm_extra"):
        cfg.validate(minimal(resources={"cpt": {"slurm_extra": "--gres=gpu:1; rm -rf /"}}))


def test_paper_config_uses_the_pretrained_base_as_step_zero(repo):
    config = cfg.load(repo / "config" / "olmoe-m7.yaml")
    assert 0 not in cfg.cpt_options(config)["steps"]  # a 7B base is not copied into results/
    models = cfg.profiled_models(config)
    assert models["cpt-step0"]["ref"] == "allenai/OLMoE-1B-7B-0924"
    assert list(models)[-1] == "cpt-step16700" and len(models) == 8
    assert cfg.evaluated_models(config)["cpt-step0"]["method"] == "base"
    assert config["tokenizer"]["name_or_path"] == "allenai/OLMoE-1B-7B-0924"
    default = cfg.load(repo / "config" / "config.yaml")
    assert cfg.cpt_options(default)["steps"] == [0, 200, 400, 600, 800]

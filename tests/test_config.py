import json
import re
import subprocess
import sys

import pytest
import yaml

from moelang import config as cfg
from moelang.options import CorpusOptions
from moelang import registry
from moelang.errors import ConfigError


def minimal(**extra):
    return {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4},
            **extra}


def test_defaults_are_filled_from_the_schema():
    config = cfg.validate(minimal())
    assert config["seed"] == 0
    assert config["languages"]["base"] == "en"
    assert config["corpus"]["dev_fraction"] == 0.1 and config["corpus"]["test_fraction"] == 0.1
    assert config["corpus"]["default_source"] == {"type": "builtin"}
    assert config["corpus"]["parallel"]["min_languages"] == 2
    assert config["tokenizer"]["type"] == "train"
    assert config["overlap"]["min_count"] == 1


def test_source_defaults_depend_on_the_source_type(tmp_path):
    (tmp_path / "x.txt").write_text("hola\n", encoding="utf-8")
    path = str(tmp_path / "x.txt")
    config = cfg.validate(minimal(corpus={"sources": {"es": {"type": "local", "path": path}}}))
    source = cfg.source_for(config, "es")
    assert source == {"type": "local", "path": path, "format": "auto", "text_column": "text", "txt_mode": "line",
                      "encoding": "utf-8", "max_docs": None, "max_chars": None}
    assert cfg.source_for(config, "en") == {"type": "builtin"}


def test_embedded_default_config_is_valid(repo):
    config = cfg.load(repo / "config" / "config.yaml")
    assert cfg.all_languages(config) == ["en", "ar", "cs", "es", "fi", "hi", "ru", "ca", "et", "mr", "sk", "uk", "ur"]
    assert config["languages"]["targets"] == {"ca": "es", "et": "fi", "mr": "hi", "sk": "cs", "uk": "ru", "ur": "ar"}


@pytest.mark.parametrize(
    "config, key, words",
    [
        (minimal(corpus={"test_fraction": 0.9}), "corpus.test_fraction", "maximum"),
        (minimal(corpus={"dev_fraction": 0}), "corpus.dev_fraction", "less than or equal to the minimum"),
        (minimal(corpus={"dev_fraction": 0.3, "test_fraction": 0.3}), "corpus.test_fraction", "at least half"),
        # an old config's single held-out split: one line naming the two keys that replace it
        (minimal(corpus={"heldout_fraction": 0.1}), "corpus.heldout_fraction", "corpus.dev_fraction (model selection) "
         "and corpus.test_fraction (reported results); for the same train split set both so that they add up to it "
         "(e.g. 0.05 each)"),
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
    assert a == b and CorpusOptions.from_json(a).source == {"type": "builtin"}


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
    config = cfg.validate(minimal(resources={"gpus": True, "default": {"slurm_partition": "gpu", "runtime": 30},
                                             "cpt": {"gpu": 4, "slurm_extra": "--gres=gpu:a100:4"}}))
    assert cfg.rule_resources(config, "cpt") == {"runtime": 30, "mem_mb": 256000, "gpu": 4, "slurm_partition": "gpu",
                                                 "slurm_extra": "--gres=gpu:a100:4"}
    assert cfg.rule_resources(config, "overlap") == {"runtime": 30, "mem_mb": 8000, "slurm_partition": "gpu"}
    assert cfg.rule_resources(config, "pretrain_base")["gpu"] == 1
    cpu_only = cfg.validate(minimal(resources={"gpus": False}))
    assert "gpu" not in cfg.rule_resources(cpu_only, "pretrain_base")
    with pytest.raises(ConfigError, match="'resources.tokenise': not a rule"):
        cfg.validate(minimal(resources={"tokenise": {"mem_mb": 10}}))
    with pytest.raises(ConfigError, match="resources.cpt.slurm_extra"):
        cfg.validate(minimal(resources={"cpt": {"slurm_extra": "--gres=gpu:1; rm -rf /"}}))


def test_paper_config_uses_the_pretrained_base_as_step_zero(repo, monkeypatch):
    # with hub access the hub id is taken as it is (offline it would have to be in the local cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = cfg.load(repo / "config" / "olmoe-m7.yaml")
    assert 0 not in cfg.cpt_options(config).steps  # a 7B base is not copied into results/
    models = registry.profiled(config)
    assert models["cpt-step0"].ref == "allenai/OLMoE-1B-7B-0924"
    assert list(models)[-1] == "cpt-step4172" and len(models) == 8
    assert registry.evaluated(config)["cpt-step0"].method == "base"
    assert config["tokenizer"]["name_or_path"] == "allenai/OLMoE-1B-7B-0924"
    default = cfg.load(repo / "config" / "config.yaml")
    assert cfg.cpt_options(default).steps == [0, 200, 400, 600, 800]


# --------------------------------------------------------------------------------------------------
# GPUs only on purpose
# --------------------------------------------------------------------------------------------------

TRAINING_RULES = ("pretrain_base", "cpt")


def test_no_gpu_and_one_process_unless_the_config_asks(repo):
    # before the fix the default asked for the stage defaults' GPUs: cpt ran as torchrun with 8 processes
    for config in (cfg.validate(minimal()), cfg.load(repo / "config" / "config.yaml")):
        for rule in cfg.STAGE_RESOURCES:
            assert "gpu" not in cfg.rule_resources(config, rule), rule
        for rule in TRAINING_RULES:
            assert cfg.launcher(config, rule) == "python -m moelang"
    gpu_cluster = cfg.validate(minimal(resources={"gpus": True}))
    assert cfg.launcher(gpu_cluster, "cpt") == "torchrun --standalone --nproc_per_node 8 -m moelang"
    assert cfg.launcher(gpu_cluster, "pretrain_base") == "python -m moelang"  # one GPU: one process
    assert {r: cfg.rule_resources(gpu_cluster, r).get("gpu") for r in cfg.STAGE_RESOURCES} == \
        {r: res.get("gpu") for r, res in cfg.STAGE_RESOURCES.items()}
    # a count the config gives itself is asked for on purpose
    two = cfg.validate(minimal(resources={"cpt": {"gpu": 2}}))
    assert cfg.launcher(two, "cpt") == "torchrun --standalone --nproc_per_node 2 -m moelang"
    assert "gpu" not in cfg.rule_resources(two, "profile_routing")


def test_the_cluster_config_asks_for_gpus(repo, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = cfg.load(repo / "config" / "olmoe-m7.yaml")
    assert config["resources"]["gpus"] is True
    assert cfg.launcher(config, "cpt") == "torchrun --standalone --nproc_per_node 8 -m moelang"
    assert cfg.rule_resources(config, "profile_routing")["gpu"] == 1


def test_readme_documents_every_stage_default(repo):
    text = (repo / "config" / "README.md").read_text(encoding="utf-8")
    section = text.split("## `resources`", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].isdigit():
            for rule in re.findall(r"`(\w+)`", cells[0]):
                documented[rule] = {"runtime": int(cells[1]), "mem_mb": int(cells[2]),
                                    **({"gpu": int(cells[3])} if cells[3] else {})}
    assert documented == cfg.STAGE_RESOURCES


# --------------------------------------------------------------------------------------------------
# Everything the config decides, checked at start-up
# --------------------------------------------------------------------------------------------------

def tiny_arch(**fields):
    arch = {"model_type": "olmoe", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
            "max_position_embeddings": 256}
    return {k: v for k, v in {**arch, **fields}.items() if v is not None}


def trained(arch, **extra):
    return minimal(model={"base": {"type": "train", "architecture": arch}}, **extra)


@pytest.mark.parametrize(
    "config, key, words",
    [
        # the three architecture mistakes
        (trained(tiny_arch(num_experts_per_tok=None, num_experts_per_token=2)),
         "model.base.architecture.num_experts_per_token", "did you mean 'num_experts_per_tok'"),
        (trained(tiny_arch(num_experts=4, num_experts_per_tok=8)),
         "model.base.architecture.num_experts_per_tok", "8 of 4 experts"),
        (trained(tiny_arch(model_type="qwen3_moe", intermediate_size=256)),
         "model.base.architecture.moe_intermediate_size", "expert width is moe_intermediate_size"),
        (trained(tiny_arch(num_attention_heads=3, num_key_value_heads=3)),
         "model.base.architecture.num_attention_heads", "do not divide hidden_size 64"),
        (trained(tiny_arch(num_key_value_heads=3)), "model.base.architecture.num_key_value_heads", "do not divide"),
        (trained(tiny_arch(vocab_size=500)), "model.base.architecture.vocab_size", "from the tokenizer"),
        (trained({"model_type": "gpt2", "n_layer": 2}), "model.base.architecture.model_type", "not a model family"),
        (trained({"model_type": "olmoee"}), "model.base.architecture.model_type", "did you mean 'olmoe'"),
        (trained({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}),
         "model.base.architecture.model_type", "dense family"),
        (trained({"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 2}),
         "model.base.architecture", "none of the 2 layers"),
        (trained({"model_type": "deepseek_v3", "n_routed_experts": 8, "n_group": 3}),
         "model.base.architecture.n_group", "equal groups"),
        (trained(tiny_arch(), routing={"token_layers": [4]}), "routing.token_layers", "MoE layers are 0..3"),
        (trained(tiny_arch(), routing={"final_layers": 5}), "routing.final_layers", "at most 4"),
        (trained(tiny_arch(), routing={"jsd_overlap_layer": 9}), "routing.jsd_overlap_layer", "not an MoE layer"),
        # languages
        ({"languages": {"high_resource": ["en", "es"]}, "allocation": {"new_experts": 4}},
         "languages.targets", "no target language"),
        (minimal(allocation={"new_experts": 4, "old": ["en", "de"]}), "allocation.old", "'de' is not a configured"),
        (minimal(allocation={"new_experts": 4, "new": ["es"]}), "allocation", "both old and new"),
        (minimal(evaluation={"codes": {"belebele": {"de": "deu_Latn"}}}), "evaluation.codes.belebele.de",
         "not a configured language"),
        (minimal(evaluation={"codes": {"belebele": {"ca": "../x"}}}), "evaluation.codes.belebele.ca", "does not match"),
        # checkpoints
        (minimal(model={"cpt": {"n_checkpoints": 5, "train": {"steps": 3}}}), "model.cpt.n_checkpoints",
         "at most steps + 1"),
        # references that are neither a directory nor a workflow output
        (minimal(evaluation={"models": {"adapted": {"ref": "results/models/adapted", "method": "x"}}}),
         "evaluation.models.adapted.ref", "no stage of this workflow makes it"),
        (minimal(evaluation={"models": {"other": {"ref": "/no/such/model", "method": "x"}}}),
         "evaluation.models.other.ref", "does not exist"),
    ],
)
def test_start_up_check_names_the_key(config, key, words):
    with pytest.raises(ConfigError) as info:
        cfg.validate(config)
    message = str(info.value)
    assert f"'{key}'" in message, message
    assert words in message, message
    assert "\n" not in message


def test_consistent_architectures_and_checkpoints_pass():
    cfg.validate(trained(tiny_arch(), routing={"token_layers": [3], "final_layers": 4, "jsd_overlap_layer": 0}))
    cfg.validate(trained(tiny_arch(model_type="qwen3_moe", intermediate_size=None, moe_intermediate_size=64,
                                   head_dim=16)))
    cfg.validate(minimal(model={"cpt": {"n_checkpoints": 4, "train": {"steps": 3}}}))
    # a workflow output need not exist yet
    cfg.validate(minimal(evaluation={"models": {"step": {"ref": "results/models/cpt/step-800", "method": "cpt"}}}))


def test_local_sources_exist_and_have_a_known_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flores").mkdir()
    for name in ("cat.dev", "spa.dev"):
        (tmp_path / "flores" / name).write_text("Una frase.\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:  # the issue: FLORES .dev files without a format
        cfg.validate(minimal(corpus={"sources": {"ca": {"type": "local", "path": "flores/cat.dev"}}}))
    assert str(info.value) == ("config key 'corpus.sources.ca.format': cannot tell the format of 'flores/cat.dev' "
                               "from its extension (the local source of 'ca'); set corpus.sources.ca.format to txt, "
                               "jsonl or parquet")
    cfg.validate(minimal(corpus={"sources": {"ca": {"type": "local", "path": "flores/cat.dev", "format": "txt"}}}))
    with pytest.raises(ConfigError, match=r"'corpus.sources.ca.path': 'flores/cat.txt' does not exist"):
        cfg.validate(minimal(corpus={"sources": {"ca": {"type": "local", "path": "flores/cat.txt"}}}))
    with pytest.raises(ConfigError, match=r"'corpus.default_source.path': 'data/\*.jsonl' matches no file "
                                          r"\(the local source of 'en', 'es', 'ca'\)"):
        cfg.validate(minimal(corpus={"default_source": {"type": "local", "path": "data/*.jsonl"}}))
    with pytest.raises(ConfigError, match="'corpus.sources.es.format'"):  # a directory: every file is looked at
        cfg.validate(minimal(corpus={"sources": {"es": {"type": "local", "path": "flores"}}}))
    with pytest.raises(ConfigError, match="'corpus.parallel.files.ca': 'flores/cat.devtest' does not exist"):
        cfg.validate(minimal(corpus={"parallel": {"source": "aligned", "files": {"es": "flores/spa.dev",
                                                                                "ca": "flores/cat.devtest"}}}))
    cfg.validate(minimal(corpus={"parallel": {"source": "aligned", "files": {"es": "flores/spa.dev",
                                                                            "ca": "flores/cat.dev"}}}))
    cfg.validate(minimal(corpus={"parallel": {"source": "aligned", "files": {"es": ["flores/spa.dev"],
                                                                            "ca": ["flores/cat.dev"]}}}))
    with pytest.raises(ConfigError, match="'corpus.parallel.files.ca': 'flores/cat.devtest' does not exist"):
        cfg.validate(minimal(corpus={"parallel": {"source": "aligned", "files": {
            "es": "flores/spa.dev", "ca": ["flores/cat.dev", "flores/cat.devtest"]}}}))


def save_config_json(directory, model_type, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, **fields}))
    return str(directory)


def pretrained(ref, **extra):
    return minimal(model={"base": {"type": "pretrained", "name_or_path": ref}}, tokenizer={"type": "pretrained"},
                   **extra)


def test_pretrained_base_is_checked_before_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        cfg.validate(pretrained("allenai/no-such-model-in-the-cache"))
    assert str(info.value).startswith("config key 'model.base.name_or_path': 'allenai/no-such-model-in-the-cache' is "
                                      "not a local directory and not in the local Hugging Face cache")
    with pytest.raises(ConfigError, match="directory '/no/such/dir' does not exist"):
        cfg.validate(pretrained("/no/such/dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="'model.base.name_or_path': directory '.*empty' has no config.json"):
        cfg.validate(pretrained(str(tmp_path / "empty")))
    gpt2 = save_config_json(tmp_path / "gpt2", "gpt2", n_layer=2)
    with pytest.raises(ConfigError, match="is a gpt2 model, a family moelang does not support; use one of"):
        cfg.validate(pretrained(gpt2))
    olmoe = save_config_json(tmp_path / "olmoe", "olmoe", num_hidden_layers=3)
    with pytest.raises(ConfigError, match="'tokenizer.name_or_path': directory '.*olmoe' has no tokenizer.json"):
        cfg.validate(pretrained(olmoe))
    (tmp_path / "olmoe" / "tokenizer.json").write_text("{}")
    cfg.validate(pretrained(olmoe))
    with pytest.raises(ConfigError, match="'routing.token_layers': layer 3 is not an MoE layer of the base model; "
                                          "its MoE layers are 0..2"):
        cfg.validate(pretrained(olmoe, routing={"token_layers": [3]}))
    # online, a hub id not in the cache is fetched by the stages: nothing to check cheaply
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cfg.validate(pretrained("allenai/no-such-model-in-the-cache"))


def test_a_hub_id_in_the_local_cache_is_read_offline(tmp_path, monkeypatch):
    # the layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/<file>}
    import huggingface_hub.constants

    commit = "0" * 40
    repo_dir = tmp_path / "models--lab--tiny-moe"
    save_config_json(repo_dir / "snapshots" / commit, "deepseek_v3", num_hidden_layers=3, first_k_dense_replace=1)
    (repo_dir / "snapshots" / commit / "tokenizer.json").write_text("{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg.validate(pretrained("lab/tiny-moe", routing={"token_layers": [1, 2]}))
    with pytest.raises(ConfigError, match="MoE layers are 1..2"):  # layer 0 is dense (first_k_dense_replace)
        cfg.validate(pretrained("lab/tiny-moe", routing={"token_layers": [0]}))


# --------------------------------------------------------------------------------------------------
# The expansion stage
# --------------------------------------------------------------------------------------------------

def expanding(**section):
    return minimal(expand={"enabled": True, **section})


def test_allocation_methods_are_the_allocation_stages():
    from moelang.allocation import METHODS

    assert cfg.ALLOCATION_METHODS == METHODS


@pytest.mark.parametrize(
    "section, key, words",
    [
        ({"variants": {"big": {"plan": "layer-moe"}}}, "expand.variants.big.plan", "not an allocation method"),
        ({"variants": {"Big Plan": {"plan": "layermoe"}}}, "expand.variants", "does not match"),
        ({"variants": {"a": {"classifier": True}}}, "expand.variants.a", "'plan' is a required property"),
        ({"init": "most-used"}, "expand.init", "'most-used' is not one of"),
        ({"lpr_form": "logit"}, "expand.lpr_form", "'logit' is not one of"),
        ({"replay_fraction": 1.0}, "expand.replay_fraction", "1.0"),
        ({"replay_fraction": -0.1}, "expand.replay_fraction", "-0.1"),
        ({"model": "cpt-step401"}, "expand.model", "neither a model of this workflow"),
        ({"model": "/no/such/model"}, "expand.model", "neither a model of this workflow"),
        ({"model": "results/models/other"}, "expand.model", "no stage of this workflow makes it"),
        ({"model": "expand-uniform"}, "expand.model", "made by this expansion itself"),
        ({"stage1": {"steps": 0}}, "expand.stage1.steps", "minimum"),
    ],
)
def test_bad_expansion_config_names_the_key(section, key, words):
    with pytest.raises(ConfigError) as info:
        cfg.validate(expanding(**section))
    message = str(info.value)
    assert message.startswith(f"config key '{key}'") and words in message and "\n" not in message, message


def test_expansion_off_skips_its_checks():
    cfg.validate(minimal(expand={"variants": {"big": {"plan": "layer-moe"}}, "model": "nothing"}))


def test_a_family_without_an_expansion_class_stops_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    deepseek = save_config_json(tmp_path / "deepseek", "deepseek_v3", num_hidden_layers=2)
    with pytest.raises(ConfigError, match=r"^config key 'expand.model': '.*deepseek' is a deepseek_v3 model, a family "
                                          r"with no expansion class"):
        cfg.validate(expanding(model=deepseek))
    # the base model's own family, when it is the model expanded
    arch = {"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
            "first_k_dense_replace": 0}
    with pytest.raises(ConfigError, match=r"^config key 'expand.model': 'cpt-step800' is a deepseek_v3 model"):
        cfg.validate(trained(arch, expand={"enabled": True}))
    cfg.validate(trained(arch))  # not expanding: fine
    # expandable families pass: a dense llama directory, an expanded model (lifelong), the default olmoe
    cfg.validate(expanding(model=save_config_json(tmp_path / "llama", "llama", num_hidden_layers=2)))
    grown = save_config_json(tmp_path / "grown", "layermoe_olmoe")
    cfg.validate(expanding(model=grown, init="random"))
    # an MoE not profiled here has no usage counts to rank its experts by
    with pytest.raises(ConfigError, match=r"^config key 'expand.init': most_used .* set expand.init: random"):
        cfg.validate(expanding(model=grown))
    cfg.validate(trained(tiny_arch(), expand={"enabled": True}))


def test_a_routing_variant_needs_a_specialisation_score_at_every_layer():
    # qwen2_moe with a dense first layer: no routing profile there, so no routing plan
    arch = {"model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "mlp_only_layers": [0]}
    with pytest.raises(ConfigError, match=r"^config key 'expand.variants.routing-informed.plan': the routing plan "
                                          r"needs a specialisation score at every layer, and layers \[0\]"):
        cfg.validate(trained(arch, expand={"enabled": True}))
    # without a routing variant the same model expands
    cfg.validate(trained(arch, expand={"enabled": True, "variants": {"layermoe": {"plan": "layermoe"}}}))
    cfg.validate(trained(tiny_arch(), expand={"enabled": True}))  # every layer an MoE layer


def test_stage_settings_left_out_take_the_authors_recipe():
    from moelang.options import ExpandOptions

    config = cfg.validate(expanding(stage1={"steps": 7, "seq_len": 64}, stage2={"steps": 3, "lr": 0.01}))
    options = cfg.expand_options(config, "layermoe")
    authors = ExpandOptions()
    assert options.stage1 == authors.stage1.replace(steps=7, seq_len=64)
    assert options.stage2 == authors.stage2.replace(steps=3, lr=0.01)
    assert (options.stage1.lr, options.stage1.betas, options.stage1.weight_decay, options.stage1.aux_loss_coef) == (
        5e-5, (0.9, 0.999), 0.0, 0.01)
    assert options.stage2.aux_loss_coef == 0.0 and options.stage2.min_lr_ratio == 0.0
    # the section's defaults are the dataclass's
    default = cfg.expand_options(cfg.validate(expanding()), "layermoe")
    assert (default.stage1, default.stage2) == (authors.stage1, authors.stage2)


def test_expand_options_of_each_variant():
    config = cfg.validate(minimal(languages={"high_resource": ["en", "es", "ru"], "targets": {"ca": "es", "uk": "ru"}},
                                  expand={"enabled": True, "lpr_form": "logits", "replay_fraction": 0.25}, seed=3))
    assert list(cfg.expand_variants(config)) == ["layermoe", "uniform", "mola", "routing-informed",
                                                 "layermoe-no-classifier"]
    # the corpus stage dropped uk and ru: the allocation's languages, as the allocation resolves them
    options = cfg.expand_options(config, "layermoe-no-classifier", ["en", "es", "ca"])
    assert (options.variant, options.plan, options.classifier) == ("layermoe-no-classifier", "layermoe", False)
    assert (options.old, options.new, options.parents) == (["en", "es"], ["ca"], {"ca": "es"})
    assert (options.start, options.ref, options.profile_model) == ("cpt-step800", "results/models/cpt/step-800",
                                                                   "cpt-step800")
    assert (options.lpr_form, options.replay_fraction, options.seed) == ("logits", 0.25, 3)
    everything = cfg.expand_options(config, "uniform")
    assert (everything.old, everything.new, everything.parents) == (["en", "es", "ru"], ["ca", "uk"],
                                                                    {"ca": "es", "uk": "ru"})
    assert cfg.expand_options(config, "routing-informed").classifier is True
    assert not cfg.expand_variants(cfg.validate(minimal()))  # off by default


def test_the_paper_configs_expansion(repo, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # hub ids are taken as they are
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = cfg.load(repo / "config" / "layermoe-qwen.yaml")
    options = cfg.expand_options(config, "layermoe")
    assert (options.start, options.ref, options.old, options.new) == ("base", "Qwen/Qwen1.5-1.8B", ["en", "zh", "es"],
                                                                      ["el", "hu", "tr"])
    # sequences per step of the authors' scripts: stage1-6B-layermoe-g1.sh 8 x 8 x 8 GPUs of 1,024 tokens,
    # stage2-6B-layermoe-g1.sh 24 x 4 x 8 GPUs of 512; stage 1 one epoch of 3 x 2e9 tokens
    for stage, seq_len, sequences in ((options.stage1, 1024, 8 * 8 * 8), (options.stage2, 512, 24 * 4 * 8)):
        assert stage.micro_batch_size * stage.grad_accum == sequences and stage.seq_len == seq_len
        assert (stage.lr, stage.betas, stage.weight_decay, stage.warmup_steps, stage.min_lr_ratio, stage.dtype) == (
            5e-5, (0.9, 0.999), 0.0, 0, 0.0, "bf16")
    assert options.stage1.steps == 3 * 2_000_000_000 // (512 * 1024)
    assert config["allocation"]["new_experts"] == 48
    assert config["allocation"]["classifier_layers"] == [5, 6, 10, 11, 12, 13, 23]
    assert (config["allocation"]["uniform_per_layer"], config["allocation"]["mola_budget"]) == (5, "authors")
    assert cfg.rule_resources(config, "expand_stage1")["gpu"] == 1
    m7 = cfg.load(repo / "config" / "olmoe-m7.yaml")
    assert cfg.expand_options(m7, "uniform").stage1.lr == 5e-5 and len(cfg.expand_variants(m7)) == 5


def test_a_dense_base_runs_without_the_routing_stage():
    """LayerMoE's setting: a dense base validates with routing.enabled false, which turns off what needs routing."""
    dense = {"type": "train", "architecture": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                               "intermediate_size": 128, "num_hidden_layers": 2}}
    expand = {"enabled": True, "variants": {"layermoe": {"plan": "layermoe", "classifier": True}}}
    config = cfg.validate(minimal(model={"base": dense}, routing={"enabled": False}, adapt={"enabled": False},
                                  expand=expand))
    assert cfg.expand_options(config, "layermoe").profile_model is None  # nothing profiled to rank experts by
    with pytest.raises(ConfigError, match="'model.base.architecture.model_type': 'llama' is a dense family .*set "
                                          "routing.enabled: false"):
        cfg.validate(minimal(model={"base": dense}, adapt={"enabled": False}))
    with pytest.raises(ConfigError, match="'adapt.enabled': .* routing.enabled is false; set adapt.enabled: false"):
        cfg.validate(minimal(model={"base": dense}, routing={"enabled": False}))
    routing_variant = {"enabled": True, "variants": {"ours": {"plan": "routing", "classifier": True}}}
    with pytest.raises(ConfigError, match="'expand.variants.ours.plan': .* routing.enabled is false"):
        cfg.validate(minimal(model={"base": dense}, routing={"enabled": False}, adapt={"enabled": False},
                             expand=routing_variant))

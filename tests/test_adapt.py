"""Adaptation I: final-layer expert fine-tuning runs, their outputs and the learning-rate selection."""

import json
import math
import re

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from moelang import adapt
from moelang import config as cfg
from moelang.errors import ConfigError, MoelangError
from moelang.options import AdaptOptions, TrainSettings
from test_resume_cli import make_base
from test_train import patterned_docs, write_tokens

SETS = {"ssft": {"0": [1, 2, 5], "1": [0, 3, 6]}, "seft": {"0": [1, 2], "1": [3]},
        "random": {"0": [4, 7], "1": [2]}, "seft_top3": {"0": [1, 2, 6], "1": [3, 4, 5]}}


SPLITS = ["train"] * 48 + ["dev", "test"] * 6  # dev and test documents interleaved in the file


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    make_base(root / "start")
    write_tokens(root / "ca.parquet", patterned_docs(60, seed=3), splits=SPLITS)
    (root / "selected.json").write_text(json.dumps({"ca": SETS}))
    return root


def options(start, **overrides) -> AdaptOptions:
    values = dict(ref=str(start / "start"), device="cpu", lang="ca", parent="es", start="cpt-step4",
                  methods=["ssft", "aeft", "full-ft", "lora"], learning_rates=[1e-3, 2e-2],
                  train=TrainSettings(steps=4, seq_len=16, micro_batch_size=4, lr=1e-3, aux_loss_coef=0.0,
                                      checkpoint_every=2),
                  final_layers=2, lora={"rank": 2, "alpha": 4.0, "targets": ["experts", "router"]},
                  heldout={"tokens_per_language": 400, "seq_len": 32, "batch_tokens": 256})
    return AdaptOptions(**values | overrides)


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def adapted(start, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start), out / "adapt",
                                 out / "state")
    return out, results


def test_expert_methods_change_only_the_chosen_slices_and_routers(start, adapted):
    out, _ = adapted
    before = weights(start / "start")
    for method, chosen in [("ssft", {0: [1, 2, 5], 1: [0, 3, 6]}), ("aeft", {0: list(range(8)), 1: list(range(8))})]:
        after = weights(out / "adapt" / "ca" / method / "lr-0.02")
        assert set(after) == set(before)  # the original architecture's names, nothing added
        for name, tensor in before.items():
            layer = next((i for i in (0, 1) if f"layers.{i}.mlp." in name), None)
            expert = re.search(r"\.experts\.(\d+)\.", name)  # saved one tensor per expert
            if layer is not None and expert is not None:
                changed = not torch.equal(after[name], tensor)
                assert changed == (int(expert.group(1)) in chosen[layer]), (method, name)
            elif layer is not None and name.endswith("mlp.gate.weight"):
                assert not torch.equal(after[name], tensor), (method, name)  # the whole router trains
            else:  # embeddings, attention, norms, lm_head
                assert torch.equal(after[name], tensor), (method, name)
    full = weights(out / "adapt" / "ca" / "full-ft" / "lr-0.02")
    assert not torch.equal(full["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_runs_are_plain_checkpoints_with_their_records(start, adapted):
    from transformers import AutoModelForCausalLM

    out, results = adapted
    assert len(results) == 8
    docs = patterned_docs(60, seed=3)
    split_tokens = {split: sum(len(d) for d, s in zip(docs, SPLITS) if s == split) for split in ("dev", "test")}
    assert all(0 < n < 400 for n in split_tokens.values())
    for method in ("ssft", "aeft", "full-ft", "lora"):
        for lr in ("lr-0.001", "lr-0.02"):
            run = out / "adapt" / "ca" / method / lr
            model, info = AutoModelForCausalLM.from_pretrained(run, output_loading_info=True)
            assert type(model).__name__ == "OlmoeForCausalLM" and not any(info.values()), (method, info)
            assert not (run / "adapter_config.json").exists()
            record = json.loads((run / "moelang_run.json").read_text())
            assert record["method"] == method and record["steps"] == 4
            measured = json.loads((run / "perplexity.json").read_text())
            assert measured["lang"] == "ca" and measured["lr"] == float(lr[3:])
            # dev and test perplexity come from their own documents: every token of each split is
            # scored (fewer than tokens_per_language), counted here from the fixture's documents
            for split in ("dev", "test"):
                assert measured[split]["n_tokens"] == split_tokens[split]
                assert math.isfinite(measured[split]["perplexity"])
            assert measured["dev"]["perplexity"] != measured["test"]["perplexity"]
            assert pq.read_table(run / "train_log.parquet").num_rows == 4
    # trainable counts from the configuration, computed here: an expert is gate_up (2 x 16 x 32) +
    # down (32 x 16) = 1536 parameters, a router 8 x 32
    records = {m: json.loads((out / "adapt" / "ca" / m / "lr-0.001" / "moelang_run.json").read_text())
               for m in ("ssft", "aeft", "full-ft")}
    assert records["ssft"]["trainable_parameters"] == 6 * 1536 + 2 * 8 * 32
    assert records["aeft"]["trainable_parameters"] == 16 * 1536 + 2 * 8 * 32
    assert records["full-ft"]["trainable_parameters"] == records["full-ft"]["total_parameters"]
    assert not (out / "state" / "ca" / "ssft").exists()  # published: the training state is gone


def test_selection_picks_the_lowest_dev_perplexity(start, adapted, tmp_path):
    out, _ = adapted
    root = out / "adapt" / "ca"
    runs = [root / m / lr for m in ("ssft", "aeft", "full-ft", "lora") for lr in ("lr-0.001", "lr-0.02")]
    for run in runs:  # as Snakemake leaves its directory outputs
        (run / adapt.SNAKEMAKE_TIMESTAMP).touch()
    table = adapt.select_target("ca", {"runs": runs}, tmp_path / "runs.parquet", root)
    assert pq.read_schema(tmp_path / "runs.parquet") == adapt.RUNS_SCHEMA
    # selected/ shares the model's files but not the run's timestamp marker: Snakemake touching the
    # output's marker must not make the input newer than the output
    for method in ("ssft", "aeft", "full-ft", "lora"):
        assert not (root / method / "selected" / adapt.SNAKEMAKE_TIMESTAMP).exists()
    for method in ("ssft", "aeft", "full-ft", "lora"):
        measured = {lr: json.loads((root / method / f"lr-{lr:g}" / "perplexity.json").read_text())
                    for lr in (1e-3, 2e-2)}
        best = min(measured, key=lambda lr: (measured[lr]["dev"]["perplexity"], lr))
        rows = table.filter(pl.col("method") == method)
        assert rows.filter(pl.col("selected"))["lr"].to_list() == [best]
        for lr, values in measured.items():
            row = rows.filter(pl.col("lr") == lr).row(0, named=True)
            assert (row["dev_perplexity"], row["test_perplexity"]) == (values["dev"]["perplexity"],
                                                                       values["test"]["perplexity"])
        chosen = root / method / "selected"
        assert (chosen / "model.safetensors").samefile(root / method / f"lr-{best:g}" / "model.safetensors")
    ssft = table.filter((pl.col("method") == "ssft") & (pl.col("lr") == 1e-3)).row(0, named=True)
    assert ssft["layers"] == [0, 1] and ssft["experts_per_layer"] == [3, 3]
    assert ssft["trainable_fraction"] == pytest.approx(ssft["trainable_params"] / ssft["total_params"])
    gathered = adapt.gather_runs([tmp_path / "runs.parquet"], tmp_path / "all.parquet")
    assert gathered.height == 8 and adapt.gather_runs([], tmp_path / "none.parquet").height == 0


def test_ties_and_nan_in_selection():
    table = pl.DataFrame({"lang": ["ca"] * 4, "method": ["ssft"] * 3 + ["seft"], "lr": [1e-3, 1e-4, 4e-3, 1e-3],
                          "dev_perplexity": [5.0, 5.0, float("nan"), float("nan")],
                          "test_perplexity": [1.0, 9.0, 0.5, 2.0], "selected": [False] * 4})
    chosen = adapt.select_runs(table)
    assert chosen["selected"].to_list() == [False, True, False, True]


def test_keeping_the_selected_models_only_drops_the_other_runs_weights(start, adapted, tmp_path):
    """keep_models: selected trains the same runs; the weights of the runs the selection does not
    choose are gone, their records and perplexities stay, and the selection picks the kept one."""
    out, _ = adapted
    adapt.adapt_target(start / "ca.parquet", start / "selected.json",
                       options(start, methods=["ssft", "lora"], keep_models="selected"), tmp_path / "adapt",
                       tmp_path / "state")
    root = tmp_path / "adapt" / "ca"
    runs = [root / m / lr for m in ("ssft", "lora") for lr in ("lr-0.001", "lr-0.02")]
    table = adapt.select_target("ca", {"runs": runs}, tmp_path / "runs.parquet", root)
    everything = adapt.select_runs(adapt.runs_table([out / "adapt" / "ca" / m / lr for m in ("ssft", "lora")
                                                     for lr in ("lr-0.001", "lr-0.02")]))
    assert table.drop("selected").equals(everything.drop("selected")) and table["selected"].equals(everything["selected"])
    for row in table.iter_rows(named=True):
        run = root / row["method"] / f"lr-{row['lr']:g}"
        assert (run / "model.safetensors").is_file() == row["selected"]
        assert (run / adapt.WEIGHTS_NOT_KEPT_FILE).is_file() == (not row["selected"])
        assert (run / "perplexity.json").is_file() and (run / "config.json").is_file()
        if row["selected"]:  # the same weights as the run kept with every other
            a, b = weights(run), weights(out / "adapt" / "ca" / row["method"] / f"lr-{row['lr']:g}")
            assert all(torch.equal(a[k], b[k]) for k in a)
            assert (root / row["method"] / "selected" / "model.safetensors").samefile(run / "model.safetensors")


def test_the_selected_rate_follows_dev_where_test_disagrees(start, adapted, tmp_path):
    """Runs whose dev perplexity favours one rate and whose test perplexity favours the other: the
    selection job picks (and links) the dev choice, and its table reports both numbers."""
    import shutil

    out, _ = adapted
    root = tmp_path / "ca"
    dev_best = {"ssft": 2e-2, "aeft": 1e-3}
    for method, best in dev_best.items():
        for lr in (1e-3, 2e-2):
            run = root / method / f"lr-{lr:g}"
            shutil.copytree(out / "adapt" / "ca" / method / f"lr-{lr:g}", run)
            measured = json.loads((run / "perplexity.json").read_text())
            measured["dev"]["perplexity"] = 10.0 if lr == best else 20.0
            measured["test"]["perplexity"] = 30.0 if lr == best else 15.0  # test prefers the other rate
            (run / "perplexity.json").write_text(json.dumps(measured))
    runs = [root / m / f"lr-{lr:g}" for m in dev_best for lr in (1e-3, 2e-2)]
    table = adapt.select_target("ca", {"runs": runs}, tmp_path / "runs.parquet", root)
    chosen = table.filter(pl.col("selected"))
    assert dict(zip(chosen["method"], chosen["lr"])) == dev_best
    assert chosen["dev_perplexity"].to_list() == [10.0, 10.0] and chosen["test_perplexity"].to_list() == [30.0, 30.0]
    for method, best in dev_best.items():
        assert (root / method / "selected" / "model.safetensors").samefile(root / method / f"lr-{best:g}" /
                                                                           "model.safetensors")
    gathered = adapt.gather_runs([tmp_path / "runs.parquet"], tmp_path / "all.parquet")
    columns = ["dev_perplexity", "test_perplexity"]
    assert gathered.select(columns).equals(table.select(columns))


def test_docs_list_the_runs_table_columns_with_their_types():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "outputs.md").read_text()
    section = text[text.index("`runs.parquet`: `lang`"):]
    section = section[:section.index("\n\n")]
    documented = re.findall(r"`(\w+)`\s+(string|float64|int64|bool|list<int32>)", section)
    names = {pa.string(): "string", pa.float64(): "float64", pa.int64(): "int64", pa.bool_(): "bool",
             pa.list_(pa.int32()): "list<int32>"}
    assert documented == [(field.name, names[field.type]) for field in adapt.RUNS_SCHEMA]


def test_a_killed_job_resumes_to_the_same_models(start, adapted, tmp_path, monkeypatch):
    out, _ = adapted
    finish = adapt._finish_run
    calls = []

    def dies_after_two_runs(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed after two runs
        calls.append(args[2:4])
        return finish(*args, **kwargs)

    monkeypatch.setattr(adapt, "_finish_run", dies_after_two_runs)
    with pytest.raises(KeyboardInterrupt):
        adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start), tmp_path / "adapt",
                           tmp_path / "state")
    assert not (tmp_path / "adapt").exists()  # nothing published before every run is done
    monkeypatch.setattr(adapt, "_finish_run", finish)
    adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start), tmp_path / "adapt",
                       tmp_path / "state")
    for method in ("ssft", "aeft", "full-ft", "lora"):
        for lr in ("lr-0.001", "lr-0.02"):
            a, b = weights(out / "adapt" / "ca" / method / lr), weights(tmp_path / "adapt" / "ca" / method / lr)
            assert all(torch.equal(a[k], b[k]) for k in a), (method, lr)


def test_bad_input_stops_before_training(start, tmp_path):
    with pytest.raises(MoelangError, match="no selected experts.*remove it from adapt.targets"):
        adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start, lang="et"),
                           tmp_path / "adapt", tmp_path / "state")
    with pytest.raises(MoelangError, match="no 'random_hr' set for 'ca'"):
        adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start, methods=["random_hr"]),
                           tmp_path / "adapt", tmp_path / "state")
    with pytest.raises(MoelangError, match="routing.final_layers': 3 adapted layers"):
        adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start, final_layers=3),
                           tmp_path / "adapt", tmp_path / "state")
    assert not (tmp_path / "adapt").exists()
    base = {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4}}
    with pytest.raises(ConfigError, match="adapt.methods': 'sft' is not a method; use one of ssft, seft, seft_top20"):
        cfg.validate(base | {"adapt": {"methods": ["sft"]}})
    with pytest.raises(ConfigError, match="seft_top5.*routing.top_n \\(20\\)"):
        cfg.validate(base | {"adapt": {"methods": ["seft_top5"]}})
    with pytest.raises(ConfigError, match="adapt.learning_rates"):
        cfg.validate(base | {"adapt": {"learning_rates": []}})
    with pytest.raises(ConfigError, match="adapt.learning_rates"):
        cfg.validate(base | {"adapt": {"learning_rates": [0.001, -1]}})
    with pytest.raises(ConfigError, match="adapt.targets': 'et' is not in languages.targets"):
        cfg.validate(base | {"adapt": {"targets": ["et"]}})
    with pytest.raises(ConfigError, match="random_hr trains another parent's experts"):
        cfg.validate(base | {"adapt": {"methods": ["random_hr"]}})
    with pytest.raises(ConfigError, match="adapt.start_model': 'cpt-step200' differs"):
        cfg.validate(base | {"adapt": {"start_model": "cpt-step200"}})


def test_ssft_trains_between_1_5_and_2_5_percent_of_olmoe_1b_7b():
    """SSFT with 11 experts in each of layers 14 and 15 plus their routers, on the real OLMoE-1B-7B
    architecture (meta device: no weights)."""
    from transformers import AutoModelForCausalLM

    from moelang.models import count_parameters, load_config
    from moelang.models.methods import ExpertSubset

    config = load_config("allenai/OLMoE-1B-7B-0924")  # offline: moelang's copy of its config.json
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ExpertSubset(experts={14: list(range(11)), 15: list(range(20, 31))}, routers=[14, 15]).prepare(model)
    counts = count_parameters(model)
    expert = 3 * 2048 * 1024  # gate, up and down projections of one expert
    assert counts["trainable"] == 22 * expert + 2 * 64 * 2048
    assert counts["total"] == 6_919_161_856
    assert 0.015 < counts["trainable_fraction"] < 0.025  # 2.0%


def test_adaptation_trains_without_load_balancing_unless_asked():
    base = {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4}}
    assert cfg.adapt_options(cfg.validate(base | {"adapt": {"train": {"steps": 5}}}), "ca").train.aux_loss_coef == 0
    assert cfg.adapt_options(cfg.validate(base), "ca").train.aux_loss_coef == 0
    given = cfg.validate(base | {"adapt": {"train": {"steps": 5, "aux_loss_coef": 0.02}}})
    assert cfg.adapt_options(given, "ca").train.aux_loss_coef == 0.02
    assert cfg.validate(base)["model"]["cpt"]["train"]["aux_loss_coef"] == 0.01  # pre-training keeps its own


def test_full_ft_trains_with_the_authors_recipe(adapted):
    """The full-ft runs' logs: balancing and z-loss terms in every step, the expert methods' none; the
    rate rising linearly from 0.59 x lr to lr over the run (adapt.full_ft's defaults)."""
    out, _ = adapted
    full = pl.read_parquet(out / "adapt" / "ca" / "full-ft" / "lr-0.02" / "train_log.parquet")
    assert full["aux_loss"].is_finite().all() and (full["z_loss"] > 0).all()
    assert full["lr"].to_list() == pytest.approx([0.02 * (0.59 + 0.41 * (step + 1) / 4) for step in range(4)])
    ssft = pl.read_parquet(out / "adapt" / "ca" / "ssft" / "lr-0.02" / "train_log.parquet")
    assert ssft["aux_loss"].is_nan().all() and "z_loss" not in ssft.columns


def test_default_config_builds_the_adaptation_jobs(repo):
    config = cfg.load(repo / "config" / "config.yaml")
    from moelang import registry

    adapted = {n: e for n, e in registry.evaluated(config).items() if e.target is not None}
    assert adapted and all(e.start == cfg.adapt_start(config).name for e in adapted.values())
    for lang in cfg.adapt_targets(config):
        options = cfg.adapt_options(config, lang)
        assert options.lang == lang and options.parent == config["languages"]["targets"][lang]
        assert options.train.aux_loss_coef == 0.0 and options.final_layers == config["routing"]["final_layers"]
        full_ft = adapt.full_ft_settings(options.train, options.full_ft)  # the authors' Full-FT by default
        assert (full_ft.aux_loss_coef, full_ft.z_loss_coef, full_ft.decay_norms_and_biases) == (0.01, 0.001, True)
        assert {f"adapt-{lang}-{m}" for m in options.methods} <= set(adapted)


def test_shared_frozen_pass_gives_the_models_of_separate_runs(start, adapted, tmp_path, monkeypatch):
    import moelang.sweep

    out, _ = adapted
    calls = []
    sweep = moelang.sweep.train_sweep
    monkeypatch.setattr(moelang.sweep, "train_sweep", lambda *a, **k: calls.append(len(a[2])) or sweep(*a, **k))
    adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start, share_frozen_pass=False),
                       tmp_path / "adapt", tmp_path / "state")
    assert calls == []  # every run alone
    for method in ("ssft", "aeft", "lora", "full-ft"):
        for lr in ("lr-0.001", "lr-0.02"):
            a, b = weights(out / "adapt" / "ca" / method / lr), weights(tmp_path / "adapt" / "ca" / method / lr)
            assert all(torch.equal(a[k], b[k]) for k in a), (method, lr)
    adapt.adapt_target(start / "ca.parquet", start / "selected.json", options(start, methods=["ssft", "lora"]),
                       tmp_path / "again", tmp_path / "state2")
    assert calls == [4]  # ssft and lora at both rates in one pass
    # at most 3 runs a pass: ssft's two rates and lora's first, then lora's second alone; the same models
    adapt.adapt_target(start / "ca.parquet", start / "selected.json",
                       options(start, methods=["ssft", "lora"], sweep_group_size=3), tmp_path / "grouped",
                       tmp_path / "state3")
    assert calls == [4, 3]
    for method in ("ssft", "lora"):
        for lr in ("lr-0.001", "lr-0.02"):
            a, b = weights(out / "adapt" / "ca" / method / lr), weights(tmp_path / "grouped" / "ca" / method / lr)
            assert all(torch.equal(a[k], b[k]) for k in a), (method, lr)


def test_the_config_knows_the_registered_methods():
    # config.py spells the registry's names (the data image validates configs without torch).
    from moelang import adapt, config

    assert config.adapt_method_names(7) == adapt.known_methods(7)
    assert config.adapt_method_names(3) == adapt.known_methods(3)


# A selection whose seft (and so random, random_hr) set is empty in every final layer, and a random set
# empty in one layer only: the thresholds of a small model's routing leave such sets (the default's et, sk).
DEGENERATE = {"seft": {"0": [], "1": []}, "random": {"0": [], "1": [2, 5]}, "ssft": {"0": [4], "1": [0]}}


def test_a_method_with_no_expert_in_any_layer_is_not_trained_and_recorded_with_its_reason(start, tmp_path):
    from moelang.evaluate import evaluate_model

    (tmp_path / "selected.json").write_text(json.dumps({"ca": DEGENERATE}))
    results = adapt.adapt_target(start / "ca.parquet", tmp_path / "selected.json",
                                 options(start, methods=["seft", "random"]), tmp_path / "adapt", tmp_path / "state")
    assert [(r["method"], r["lr"]) for r in results] == [("random", 1e-3), ("random", 2e-2)]  # seft not trained
    root = tmp_path / "adapt" / "ca"
    for lr in ("lr-0.001", "lr-0.02"):
        assert [p.name for p in (root / "seft" / lr).iterdir()] == [adapt.NOT_RUN_FILE]  # no model, no scores
    # the one-layer random set trained its one layer: 2 experts and both routers (1536 per expert, 8 x 32 a router)
    record = json.loads((root / "random" / "lr-0.001" / "moelang_run.json").read_text())
    assert record["trainable_parameters"] == 2 * 1536 + 2 * 8 * 32
    runs = [root / m / lr for m in ("seft", "random") for lr in ("lr-0.001", "lr-0.02")]
    table = adapt.select_target("ca", {"runs": runs}, tmp_path / "runs.parquet", root)
    assert pq.read_schema(tmp_path / "runs.parquet") == adapt.RUNS_SCHEMA
    seft = table.filter(pl.col("method") == "seft")
    assert seft.height == 2 and not seft["trained"].any() and not seft["selected"].any()
    assert seft["experts_per_layer"].to_list() == [[0, 0], [0, 0]] and seft["layers"].to_list() == [[0, 1], [0, 1]]
    assert seft["dev_perplexity"].is_null().all() and seft["test_perplexity"].is_null().all()
    assert seft["trainable_params"].is_null().all()
    reason = seft["not_run_reason"][0]
    assert "empty in every adapted layer (0, 1)" in reason and "routing.alpha" in reason
    random = table.filter(pl.col("method") == "random")
    assert random["trained"].all() and random["not_run_reason"].is_null().all()
    assert random["experts_per_layer"].to_list() == [[0, 2], [0, 2]]  # recorded per layer
    assert random["selected"].sum() == 1
    # what the workflow reads to leave it out of the evaluation, and what an evaluation job would meet
    assert adapt.not_trained(tmp_path / "runs.parquet") == {"seft": reason}
    assert [p.name for p in (root / "seft" / "selected").iterdir()] == [adapt.NOT_RUN_FILE]
    with pytest.raises(MoelangError, match="holds no model: its method was not trained"):
        evaluate_model(str(root / "seft" / "selected"), ["perplexity"], {}, None, {}, {}, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_the_routing_metrics_say_in_one_line_which_sets_are_empty_and_which_setting_decides():
    from moelang.options import RoutingMetricsOptions
    from moelang.routing_metrics import empty_set_notice

    opts = RoutingMetricsOptions(alpha=0.01, shared_k=1, top_n=4)
    notice = empty_set_notice({"ca": DEGENERATE, "uk": {"seft": {"0": [1], "1": [2]}}}, opts)
    assert "\n" not in notice and "routing.alpha = 0.01" in notice
    assert "every final layer, so not trained or evaluated: ca seft [routing.alpha]" in notice
    assert "some final layers only, trained in the others: ca random (layer 0) [routing.alpha (as many as seft)]" in notice
    assert "uk" not in notice
    assert empty_set_notice({"uk": {"seft": {"0": [1], "1": [2]}}}, opts) is None


def test_the_workflow_evaluates_only_the_adapted_models_that_were_trained(tmp_path, repo):
    """The evaluation inputs and the summary's options of workflow/rules/common.smk, with the
    checkpoints answered by fixture files: a target's runs table with one method not trained."""
    import types

    from moelang import registry

    config = cfg.load(repo / "config" / "config.yaml")
    (tmp_path / "languages.json").write_text(json.dumps({"kept": cfg.all_languages(config), "dropped": {}}))
    tables = {}
    for lang in cfg.adapt_targets(config):
        rows = [{"lang": lang, "method": m, "lr": 1e-3, "layers": [2, 3], "experts_per_layer": [0, 0],
                 "selected": m != "random_hr", "trained": m != "random_hr",
                 "not_run_reason": "empty" if m == "random_hr" else None} for m in config["adapt"]["methods"]]
        if lang != "ca":  # only ca's random_hr is empty
            rows = [r | {"trained": True, "selected": True, "not_run_reason": None} for r in rows]
        tables[lang] = tmp_path / f"{lang}.parquet"
        pq.write_table(adapt.pa.Table.from_pylist(rows, schema=adapt.RUNS_SCHEMA), tables[lang])
    get = {"corpus_summary": lambda **_: types.SimpleNamespace(output=types.SimpleNamespace(
        languages=str(tmp_path / "languages.json"))),
           "select_adapt": lambda lang: types.SimpleNamespace(output=types.SimpleNamespace(table=str(tables[lang])))}
    checkpoints = types.SimpleNamespace(**{name: types.SimpleNamespace(get=f) for name, f in get.items()})
    space = {"checkpoints": checkpoints, "config": config, "mcfg": cfg, "EVALUATED": registry.evaluated(config),
             "ADAPT_TARGETS": cfg.adapt_targets(config), "EVAL_MODEL_OUTPUTS": ["perplexity.parquet"],
             "EVAL_FAMILIES": [], "EXPAND_VARIANTS": {}, "os": __import__("os")}
    exec(compile((repo / "workflow" / "rules" / "common.smk").read_text(), "common.smk", "exec"), space)
    adapted = space["adapted_eval_outputs"]()
    assert "results/eval/adapt-ca-random_hr/perplexity.parquet" not in adapted
    assert "results/eval/adapt-uk-random_hr/perplexity.parquet" in adapted
    assert "results/eval/adapt-ca-ssft/perplexity.parquet" in adapted
    assert not any("adapt-" in path for path in space["eval_outputs"]())
    inputs = types.SimpleNamespace(results=space["eval_outputs"](), adapted=adapted)
    summary = json.loads(space["eval_summary_options"](None, inputs))
    assert summary["not_evaluated"] == {"adapt-ca-random_hr": "empty"}
    assert "adapt-ca-random_hr" not in summary["models"] and "adapt-uk-random_hr" in summary["models"]

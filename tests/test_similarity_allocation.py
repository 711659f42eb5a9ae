import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from families import tiny_model
from moelang import allocation as al
from moelang.errors import MoelangError
from moelang.options import AllocationOptions
from moelang.models import ModelAdapter
from moelang.similarity import SIMILARITY_SCHEMA, mean_pair_cosine, sentence_vectors, token_unit_means
from moelang.routing import length_batches


# ---------------------------------------------------------------------------------------------------
# similarity


def test_mean_of_all_pair_cosines_equals_the_brute_force_matrix():
    g = torch.Generator().manual_seed(0)
    for n, m, d in [(50, 70, 16), (3, 200, 64), (1, 1, 8)]:
        x = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 5
        y = torch.randn(m, d, generator=g) + 0.3
        brute = torch.nn.functional.cosine_similarity(x.double()[:, None, :], y.double()[None, :, :], dim=-1).mean()
        assert mean_pair_cosine(x, y) == pytest.approx(float(brute), rel=1e-6)


@pytest.mark.parametrize("family", ["olmoe", "llama"])
def test_unit_means_exclude_padding_and_match_brute_force(family):
    model = tiny_model(family).eval()
    adapter = ModelAdapter(model)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, 90, n) for n in (5, 12, 3)]
    means, n_tokens = token_unit_means(adapter, length_batches(chunks, batch_tokens=24, pad_id=0), "t")
    assert n_tokens == 20
    captured = {i: [] for i in range(adapter.num_layers)}
    with torch.no_grad(), adapter.capture_mlp_inputs(lambda i, h: captured[i].append(h[0].clone())):
        for chunk in chunks:  # unpadded, one at a time
            model(input_ids=torch.tensor(chunk)[None])
    for layer in range(adapter.num_layers):
        vectors = torch.cat(captured[layer]).double()
        expect = torch.nn.functional.normalize(vectors, dim=-1).mean(0)
        assert torch.allclose(means[layer], expect, atol=1e-6)


def test_parallel_variant_on_a_hand_made_example():
    """Sentences whose translations are the same token sequence have cosine 1 at every layer; the
    variant is the mean over items of the cosine of mean-pooled sentence vectors."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moelang.similarity import parallel_similarity

    model = tiny_model("olmoe").eval()
    adapter = ModelAdapter(model)
    vocab = {"<pad>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate("a b c d e f g h".split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    table = pl.DataFrame({"item_id": ["1", "2", "3"], "origin": ["x"] * 3,
                          "en": ["a b c", "d e", "f g h"], "es": ["a b c", "d e", None], "ca": ["h g f", "e", "b"]})
    path = "/tmp/moelang-test-parallel.parquet"
    table.write_parquet(path)
    sims = parallel_similarity(adapter, tok, path, ["en", "es", "ca"], {}, "m")
    assert sims.schema == pl.Schema(SIMILARITY_SCHEMA)
    assert (sims["experts"] == model.config.num_experts).all()  # every tiny OLMoE layer is an MoE layer
    en_es = sims.filter((pl.col("lang_a") == "en") & (pl.col("lang_b") == "es"))
    assert en_es["similarity"].to_numpy() == pytest.approx(1.0)
    # independent: pooled vectors, cosine per item, mean over the 3 items en and ca share
    vec = {lang: sentence_vectors(adapter, tok, table[lang].drop_nulls().to_list())[0] for lang in ("en", "ca")}
    cos = torch.nn.functional.cosine_similarity(vec["en"], vec["ca"], dim=-1).mean(-1)
    got = sims.filter((pl.col("lang_a") == "en") & (pl.col("lang_b") == "ca")).sort("layer")["similarity"].to_numpy()
    assert got == pytest.approx(cos.numpy(), rel=1e-9)


@pytest.mark.parametrize("family, experts", [("olmoe", 8), ("llama", 1)])
def test_token_similarity_table_records_the_experts_of_every_layer(tmp_path, family, experts):
    """The allocation reads dense-or-MoE from the similarity table (never from the model), so the
    table must say it: the tiny OLMoE has 8 experts per layer, a Llama layer is one dense FFN."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moelang.similarity import token_similarity

    model = tiny_model(family).eval()
    assert family != "olmoe" or model.config.num_experts == experts
    adapter = ModelAdapter(model)
    rng = np.random.default_rng(1)
    files = {}
    for lang in ("en", "es"):
        docs = [rng.integers(3, 90, n).tolist() for n in (9, 14, 6)]
        files[lang] = tmp_path / f"{lang}.parquet"
        pq.write_table(pa.table({"split": ["dev"] * 3, "input_ids": docs}), files[lang])
    table = token_similarity(adapter, files, {"seq_len": 8, "batch_tokens": 32, "tokens_per_language": None}, "m")
    assert table.schema == pl.Schema(SIMILARITY_SCHEMA)
    assert table.height == adapter.num_layers * 3  # en-en, en-es, es-es
    assert table["experts"].to_list() == [experts] * table.height


# ---------------------------------------------------------------------------------------------------
# allocation


def sim_table(scores_by_layer: dict[int, dict[tuple[str, str], float]], experts: int = 1) -> pl.DataFrame:
    rows = [("m", layer, a, b, v, 10, 10, experts) for layer, pairs in scores_by_layer.items() for (a, b), v in pairs.items()]
    return pl.DataFrame(rows, schema=SIMILARITY_SCHEMA, orient="row")


def pairs(no, nn):
    # old: en, es; new: el, hu. S_i = (mean new-old + mean new-new) / 2
    return {("el", "en"): no, ("hu", "en"): no, ("es", "el"): no, ("es", "hu"): no, ("el", "hu"): nn, ("en", "es"): 0.99}


def three_layers(experts: int = 1):
    return sim_table({0: pairs(0.2, 0.2), 1: pairs(0.4, 0.4), 2: pairs(0.5, 0.3)}, experts)


def cross_script(experts: int = 1):
    """As en-ru: layer 1's new-old mean cosine is negative, so S_1 = (-0.3 + 0.1) / 2 = -0.1."""
    return sim_table({0: pairs(0.2, 0.2), 1: pairs(-0.3, 0.1), 2: pairs(0.5, 0.3)}, experts)


OLD, NEW = ["en", "es"], ["el", "hu"]


def test_layer_scores_by_hand():
    layers, scores = al.layer_scores(three_layers(), OLD, NEW)
    assert layers == [0, 1, 2] and scores == pytest.approx([0.2, 0.4, 0.4])
    _, single = al.layer_scores(three_layers(), OLD, ["el"])  # new-new term dropped
    assert single == pytest.approx([0.2, 0.4, 0.5])
    _, crossing = al.layer_scores(cross_script(), OLD, NEW)
    assert crossing == pytest.approx([0.2, -0.1, 0.4])


def test_layermoe_counts_by_hand_with_rounding():
    # 1/S = 5, 2.5, 2.5 -> weights .5, .25, .25; delta 10 -> 5, 2.5, 2.5 -> ceil 5, 3, 3
    result = al.allocate(three_layers(), OLD, NEW, delta=10)
    assert result.delta == 10 and result.failed == {"routing": al.NO_SPECIALIZATION}
    assert result.plans["layermoe"].as_json() == {"experts_per_layer": [5, 3, 3], "new_experts_per_layer": [4, 2, 2],
                                                  "classifier_layers": [1, 2]}  # two layers share the minimum: top-2 by S
    # exact products must not round up: delta 8 -> 4, 2, 2
    assert list(al.allocate(three_layers(), OLD, NEW, delta=8).plans["layermoe"].experts) == [4, 2, 2]


def test_the_papers_formula_on_its_published_shape():
    """Inverse-similarity weights and ceil, checked against a direct evaluation of the formula."""
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.2, 0.9, 28)
    inv = 1 / scores
    expect = [math.ceil(x / inv.sum() * 70) for x in inv]
    assert list(al.layermoe_counts(scores, 70)) == expect
    assert sum(expect) >= 70


def test_budget_search_meets_the_total_and_baselines_share_it():
    result = al.allocate(three_layers(), OLD, NEW, new_experts=9)
    plans = result.plans
    assert sum(plans["layermoe"].new) == 9
    assert list(plans["layermoe"].experts) == list(al.layermoe_counts(plans["layermoe"].scores, result.delta))
    assert list(plans["uniform"].new) == [3, 3, 3]
    assert list(plans["increasing"].new) == [2, 3, 4]  # 1 each, then 6 split 1:2:3
    # ties: layers 1 and 2 have the same score, so totals jump: delta in (6, 8] gives (3, 1, 1) = 5 new
    # experts and (8, 10] gives (4, 2, 2) = 8; 6 and 7 are unreachable: the largest total below is taken
    for wanted in (6, 7):
        assert list(al.allocate(three_layers(), OLD, NEW, new_experts=wanted).plans["layermoe"].new) == [3, 1, 1]
    assert list(al.uniform(4, 10)) == [2, 3, 2, 3]


def test_uniform_per_layer_is_moe_lprs_own_budget_and_the_other_baselines_keep_layermoes(tmp_path):
    result = al.allocate(three_layers(), OLD, NEW, new_experts=9, uniform_per_layer=5)
    assert list(result.plans["uniform"].new) == [5, 5, 5]  # 15 new experts against LayerMoE's 9
    assert list(result.plans["uniform"].experts) == [6, 6, 6]  # a dense base: the original FFN counts
    assert sum(result.plans["layermoe"].new) == sum(result.plans["mola"].new) == result.total == 9
    # with a delta budget whose LayerMoE plan fails, the uniform plan still has its own budget
    failed = al.allocate(cross_script(), OLD, NEW, delta=10, nonpositive="error", uniform_per_layer=2)
    assert list(failed.plans) == ["uniform", "mola"] and list(failed.plans["uniform"].new) == [2, 2, 2]
    three_layers().write_parquet(tmp_path / "sim.parquet")
    assert allocate_cli("--similarity", tmp_path / "sim.parquet", "--old", "en,es", "--new", "el,hu", "--new-experts", 9,
                        "--uniform-per-layer", 4, "--out", tmp_path / "plan") == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["uniform"]["new_experts_per_layer"] == [4, 4, 4]


def test_moe_base_counts_only_new_experts_and_routing_variant():
    spec = {0: 0.1, 1: 0.1, 2: 0.6}
    plans = al.allocate(three_layers(), OLD, NEW, new_experts=8, existing=64, counts_existing=False,
                        specialization=spec).plans
    assert sum(plans["layermoe"].new) == 8 and list(plans["layermoe"].experts) == list(plans["layermoe"].new)
    # 1 each, the other 5 by specialisation .125/.125/.75 = .625/.625/3.75: floors 0/0/3, the two
    # remaining go to the largest remainders (.75, then the first .625)
    assert list(plans["routing"].new) == [2, 1, 5]
    mixed = al.allocate(three_layers(), OLD, NEW, new_experts=8, counts_existing=False, specialization=spec,
                        routing_weight=0.5).plans
    assert sum(mixed["routing"].new) == 8


@pytest.mark.parametrize("kwargs, words", [
    (dict(delta=3, mola_budget="layermoe_total"), "no method gives a plan: layermoe: delta 3 gives layers \\[1, 2\\] no new expert; raise allocation.delta"),
    (dict(new_experts=2), "set allocation.new_experts \\(--new-experts\\) to at least 3"),
    (dict(delta=5, new_experts=4), "exactly one budget, allocation.delta or allocation.new_experts"),
    (dict(), "exactly one budget"),
    (dict(delta=10, nonpositive="drop"), "allocation.nonpositive is 'drop'; use one of shift, clip, error"),
    (dict(delta=10, routing_weight=1.5), "allocation.routing_weight"),
])
def test_invalid_budgets_are_rejected(kwargs, words):
    with pytest.raises(MoelangError, match=words):
        al.allocate(three_layers(), OLD, NEW, **kwargs)


def test_bad_languages_are_rejected():
    with pytest.raises(MoelangError, match="no pair with \\['zh'\\]; remove them from allocation.old/new"):
        al.allocate(three_layers(), ["en", "zh"], ["el"], delta=10)
    with pytest.raises(MoelangError, match="both old and new"):
        al.allocate(three_layers(), ["en", "el"], ["el"], delta=10)


def direct_layermoe(used: list[float], delta: float) -> list[int]:
    inv = [1 / s for s in used]
    return [math.ceil(round(x / sum(inv) * delta, 9)) for x in inv]


def test_nonpositive_scores_shift_by_default():
    """S = 0.2, -0.1, 0.4: the default maps every score through (1 + S) / 2 and then applies the
    paper's formula; the order of the layers is kept (the least similar layer gets the most)."""
    assert AllocationOptions().nonpositive == "shift"
    result = al.allocate(cross_script(), OLD, NEW, delta=10)
    used = [(1 + s) / 2 for s in (0.2, -0.1, 0.4)]
    assert result.scores_used == pytest.approx(used) and result.nonpositive_layers == [1]
    assert list(result.plans["layermoe"].experts) == direct_layermoe(used, 10) == [4, 5, 3]
    assert set(result.plans) == {"layermoe", "uniform", "mola", "increasing"}
    assert result.plans["layermoe"].classifier_layers == [2]  # the highest S, measured


def test_nonpositive_scores_clip_to_the_smallest_positive():
    result = al.allocate(cross_script(), OLD, NEW, delta=10, nonpositive="clip")
    assert result.scores_used == pytest.approx([0.2, 0.2, 0.4])
    assert list(result.plans["layermoe"].experts) == direct_layermoe([0.2, 0.2, 0.4], 10) == [4, 4, 2]
    everything_negative = cross_script().with_columns(-pl.col("similarity").abs())
    failed = al.allocate(everything_negative, OLD, NEW, new_experts=6, nonpositive="clip").failed
    assert "allocation.nonpositive: shift" in failed["layermoe"]


def test_positive_scores_give_the_papers_numbers_under_every_treatment():
    for treatment in al.NONPOSITIVE:
        result = al.allocate(three_layers(), OLD, NEW, delta=10, nonpositive=treatment)
        assert list(result.plans["layermoe"].experts) == [5, 3, 3] and result.nonpositive_layers == []


def test_a_failing_method_does_not_lose_the_others():
    """nonpositive: error fails LayerMoE (and the routing mix that uses 1/S_i); the baselines and the
    pure routing method, which need no similarity weights, are still computed."""
    spec = {0: 0.2, 1: 0.3, 2: 0.5}
    result = al.allocate(cross_script(), OLD, NEW, new_experts=6, nonpositive="error", specialization=spec)
    assert set(result.plans) == {"uniform", "mola", "increasing", "routing"}
    assert "S_i <= 0 at layers [1]" in result.failed["layermoe"]
    assert "set allocation.nonpositive: shift" in result.failed["layermoe"]
    assert [sum(p.new) for name, p in result.plans.items() if name != "mola"] == [6, 6, 6]
    assert list(result.plans["mola"].new) == [1, 3, 5]  # the authors' MoLA has its own budget
    mixed = al.allocate(cross_script(), OLD, NEW, new_experts=6, nonpositive="error", specialization=spec,
                        routing_weight=0.5)
    assert set(mixed.failed) == {"layermoe", "routing"} and "allocation.routing_weight 0.5" in mixed.failed["routing"]
    missing = al.allocate(three_layers(), OLD, NEW, new_experts=6, specialization={0: 0.1, 1: 0.2})
    assert set(missing.plans) == set(al.METHODS) - {"routing"} and "layers [2]" in missing.failed["routing"]
    # a delta budget takes its total from LayerMoE: without that plan no method at equal budget has a
    # total; the authors' MoLA, with its own budget, still has a plan
    alone = al.allocate(cross_script(), OLD, NEW, delta=10, nonpositive="error")
    assert list(alone.plans) == ["mola"] and "the budget is allocation.delta" in alone.failed["uniform"]
    with pytest.raises(MoelangError, match="no method gives a plan: layermoe: .*; uniform, mola, increasing, routing: the budget is allocation.delta"):
        al.allocate(cross_script(), OLD, NEW, delta=10, nonpositive="error", mola_budget="layermoe_total")


def test_failures_and_agreement_are_written_into_the_plan(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    cross_script(experts=8).write_parquet(tmp_path / "in" / "sim.parquet")
    with caplog.at_level("WARNING", logger="moelang"):
        al.run_allocation(tmp_path / "in" / "sim.parquet", {"old": OLD, "new": NEW, "new_experts": 3,
                                                           "nonpositive": "error", "mola_budget": "layermoe_total"},
                          tmp_path / "a")
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert set(plan) == {"uniform", "mola", "increasing", "_meta"}
    meta = plan["_meta"]
    assert meta["methods"] == ["uniform", "mola", "increasing"] and set(meta["failed"]) == {"layermoe", "routing"}
    assert meta["nonpositive_layers"] == [1] and meta["scores_used"] is None and meta["all_methods_agree"] is True
    assert meta["counts_existing"] is False and meta["existing_experts_per_layer"] == [8, 8, 8]  # from the table
    assert "no layermoe plan: layer score S_i <= 0" in caplog.text and "gives the same plan" in caplog.text
    table = pl.read_parquet(tmp_path / "a" / "plan.parquet")
    assert table.columns == ["method", "layer", "score", "score_used", "experts", "new_experts", "classifier"]
    assert sorted(table["method"].unique()) == ["increasing", "mola", "uniform"] and table["score_used"].is_null().all()
    # nine new experts over three layers: the methods differ, and say so
    al.run_allocation(tmp_path / "in" / "sim.parquet", {"old": OLD, "new": NEW, "new_experts": 9}, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "plan.json").read_text())["_meta"]
    assert meta["all_methods_agree"] is False and meta["nonpositive"] == "shift"
    assert meta["scores_used"] == pytest.approx([0.6, 0.45, 0.7])


def test_dense_or_moe_comes_from_the_similarity_table(tmp_path):
    for experts, counts_existing in ((1, True), (4, False)):
        path = tmp_path / f"sim{experts}.parquet"
        three_layers(experts).write_parquet(path)
        result = al.run_allocation(path, {"old": OLD, "new": NEW, "delta": 10}, tmp_path / str(experts))
        meta = json.loads((tmp_path / str(experts) / "plan.json").read_text())["_meta"]
        assert meta["counts_existing"] is counts_existing
        layermoe = result.plans["layermoe"]
        assert list(layermoe.experts) == [5, 3, 3]
        assert list(layermoe.new) == ([4, 2, 2] if counts_existing else [5, 3, 3])


def allocate_cli(*argv) -> int:
    from moelang.cli import main

    return main(["allocate", *map(str, argv)])


def test_cli_allocate_standalone(tmp_path, capsys):
    three_layers().write_parquet(tmp_path / "sim.parquet")
    assert allocate_cli("--similarity", tmp_path / "sim.parquet", "--old", "en,es", "--new", "el,hu", "--delta", 10,
                        "--out", tmp_path / "plan") == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["layermoe"]["experts_per_layer"] == [5, 3, 3]
    assert "routing" not in plan and "--specialization" in plan["_meta"]["failed"]["routing"]
    assert pl.read_parquet(tmp_path / "plan" / "plan.parquet").height == 4 * 3  # layermoe, uniform, mola, increasing
    assert (tmp_path / "plan" / "plan.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert allocate_cli("--similarity", tmp_path / "sim.parquet", "--old", "en", "--new", "el", "--out", tmp_path / "p2") == 2
    assert "exactly one budget" in capsys.readouterr().err


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"layer,lang_a\n0,en\n"), "is not a readable Parquet file"),
    (lambda p: p.write_bytes(b""), "is not a readable Parquet file"),
    (lambda p: three_layers().drop("similarity").write_parquet(p), "has no column similarity"),
    (lambda p: three_layers().drop("experts").write_parquet(p), "has no column experts"),
    (lambda p: three_layers().with_columns(pl.col("similarity").cast(pl.String)).write_parquet(p),
     "wrong column types \\(similarity is String, not number\\)"),
])
def test_corrupt_similarity_table_is_one_line_naming_the_file(tmp_path, capsys, make, words):
    path = tmp_path / "sim.parquet"
    make(path)
    assert allocate_cli("--similarity", path, "--old", "en,es", "--new", "el,hu", "--new-experts", 6,
                        "--out", tmp_path / "plan") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"'{path}'" in err and re.search(words, err) and "remake it with the similarity stage" in err
    assert not (tmp_path / "plan").exists()


def test_a_table_without_the_experts_column_works_with_existing(tmp_path):
    three_layers().drop("experts").write_parquet(tmp_path / "sim.parquet")
    assert allocate_cli("--similarity", tmp_path / "sim.parquet", "--old", "en,es", "--new", "el,hu", "--delta", 10,
                        "--existing", 1, "--out", tmp_path / "plan") == 0
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["layermoe"]["new_experts_per_layer"] == [4, 2, 2]


@pytest.mark.parametrize("experts", [1, 4])
def test_cli_by_hand_gives_the_rules_plan(tmp_path, monkeypatch, experts):
    """The rule passes allocation_options() as --options; by hand, --config and plain flags must give
    the same plan, for a dense model and for an MoE (read from the similarity table), with a
    non-positive layer and a specialisation table of several checkpoints."""
    import yaml

    from moelang import config as cfg
    from moelang import registry

    user = {"languages": {"high_resource": ["en", "es"], "targets": {"el": "es", "hu": "es"}},
            "allocation": {"new_experts": 7}}
    config = cfg.validate(json.loads(json.dumps(user)))
    entry = registry.profiled(config)[cfg.similarity_model(config)]
    sim, spec = tmp_path / "sim.parquet", tmp_path / "spec.parquet"
    cross_script(experts).write_parquet(sim)
    pl.DataFrame({"model": [entry.series] * 6, "checkpoint_step": [0] * 3 + [entry.checkpoint_step] * 3,
                  "layer": [0, 1, 2] * 2, "score": [0.9, 0.05, 0.05, 0.1, 0.2, 0.7]},
                 schema={"model": pl.String, "checkpoint_step": pl.Int64, "layer": pl.Int32, "score": pl.Float64}
                 ).write_parquet(spec)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(user))
    monkeypatch.chdir(tmp_path)  # no results/corpus/languages.json here: the table's languages are the kept ones
    rule_options = cfg.to_json(cfg.allocation_options(config, ["en", "es", "el", "hu"]))
    common = ["--similarity", sim, "--specialization", spec]
    assert allocate_cli("--options", rule_options, *common, "--out", "rule") == 0
    assert allocate_cli("--config", "config.yaml", *common, "--out", "config") == 0
    assert allocate_cli(*common, "--old", "en,es", "--new", "el,hu", "--new-experts", 7,
                        "--checkpoint-step", entry.checkpoint_step, "--out", "flags") == 0
    rule = json.loads(Path("rule/plan.json").read_text())
    assert set(rule) == set(al.METHODS) | {"_meta"} and rule["_meta"]["counts_existing"] is (experts == 1)
    assert rule["routing"]["new_experts_per_layer"] == list(al.spread(np.array([0.1, 0.2, 0.7]), 7))
    for by_hand in ("config", "flags"):
        assert json.loads(Path(by_hand, "plan.json").read_text()) == rule, by_hand
        assert pl.read_parquet(Path(by_hand, "plan.parquet")).equals(pl.read_parquet("rule/plan.parquet"))


def test_by_hand_flags_and_a_config_do_not_mix(tmp_path, capsys):
    three_layers().write_parquet(tmp_path / "sim.parquet")
    assert allocate_cli("--options", "{}", "--similarity", tmp_path / "sim.parquet", "--delta", 4,
                        "--out", tmp_path / "p") == 2
    assert "--delta cannot be combined with --config/--options" in capsys.readouterr().err


def test_parallel_similarity_without_a_parallel_table_is_a_config_error():
    from moelang import config as cfg
    from moelang.errors import ConfigError

    with pytest.raises(ConfigError, match="config key 'similarity.method': the parallel method needs a parallel table"):
        cfg.validate({"languages": {"high_resource": ["en", "es"]}, "allocation": {"new_experts": 4},
                      "similarity": {"method": "parallel"}, "corpus": {"parallel": {"source": "none"}}})


def _schema_has(schema: dict, dotted: str) -> bool:
    node = schema
    for part in dotted.split("."):
        props = node.get("properties", {})
        if part not in props:
            return False
        node = props[part]
    return True


def test_every_config_key_an_error_names_exists():
    """Messages say `set allocation.X` or `similarity.X`: each such key must be in the schema (a key
    that does not exist is advice that cannot be followed)."""
    import ast

    from moelang import cli, config as cfg, similarity

    schema = cfg.load_schema()
    named = set()
    for module in (al, similarity, cli):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named |= set(re.findall(r"(?<![\w./])((?:allocation|similarity|corpus|model)(?:\.[a-z_]+)+)", node.value))
    named = {key.removesuffix(".py") for key in named if not key.endswith(".py")}
    assert {"allocation.nonpositive", "allocation.new_experts", "similarity.method", "model.dtype"} <= named
    assert [key for key in sorted(named) if not _schema_has(schema, key)] == []


# ---------------------------------------------------------------------------------------------------
# MoLA's step shape, explicit classifier layers, layers with different expert counts


def test_mola_step_shape_by_hand():
    assert list(al.mola_shape(16)) == [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4
    assert list(al.mola_shape(6)) == [2, 2, 4, 6, 6, 8]  # layer i in quarter floor(4 i / 6)
    assert list(al.mola_shape(3)) == [2, 4, 6]
    # a total equal to the shape's sum gives the shape itself
    assert list(al.scale_shape(al.mola_shape(8), 40)) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert list(al.scale_shape(al.mola_shape(4), 10)) == [1, 2, 3, 4]
    # 6 over 2,4,6,8: 0.6, 1.2, 1.8, 2.4 -> floors 0, 1, 1, 2; remainders .6 .2 .8 .4 -> layers 2 and 0
    assert list(al.scale_shape(al.mola_shape(4), 6)) == [1, 1, 2, 2]
    # 9 over 2,2,4,4,6,6,8,8 (sum 40): 0.45 .45 .9 .9 1.35 1.35 1.8 1.8 -> floors 0,0,0,0,1,1,1,1 (4);
    # the 5 largest remainders (.9 .9 .8 .8 .45) -> 1,0,1,1,1,1,2,2; layer 1 at 0 takes one from layer 6
    assert list(al.scale_shape(al.mola_shape(8), 9)) == [1, 1, 1, 1, 1, 1, 1, 2]
    assert list(al.scale_shape(al.mola_shape(8), 8)) == [1] * 8
    with pytest.raises(MoelangError, match="at least 8"):
        al.scale_shape(al.mola_shape(8), 7)


def test_mola_plan_has_the_layermoe_total():
    sims = sim_table({layer: pairs(0.2 + 0.05 * layer, 0.3) for layer in range(8)})
    result = al.allocate(sims, OLD, NEW, new_experts=40, mola_budget="layermoe_total")
    assert sum(result.plans["layermoe"].new) == 40
    assert list(result.plans["mola"].new) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert list(result.plans["mola"].experts) == [3, 3, 5, 5, 7, 7, 9, 9]  # dense: N_i counts the original FFN


def test_mola_is_the_authors_shape_and_budget_on_a_24_layer_dense_table():
    """stage1+2-6B-mola-g2.sh, line 31: --ada_moe_num_experts_list 2 x6, 4 x6, 6 x6, 8 x6 on the 24
    dense layers of Qwen1.5-1.8B, the FFN counted: 1, 3, 5, 7 new experts per quarter, 96 in all,
    whatever LayerMoE's total (48 here, as the authors' group 1)."""
    authors = [2] * 6 + [4] * 6 + [6] * 6 + [8] * 6  # their list, written out
    sims = sim_table({layer: pairs(0.2 + 0.01 * layer, 0.3) for layer in range(24)})
    result = al.allocate(sims, OLD, NEW, new_experts=48)
    assert sum(result.plans["layermoe"].new) == 48
    mola = result.plans["mola"]
    assert list(mola.experts) == authors
    assert list(mola.new) == [count - 1 for count in authors] == [1] * 6 + [3] * 6 + [5] * 6 + [7] * 6
    assert int(mola.new.sum()) == 96
    # the same through the stage, budget read from the options, the table dense by its experts column
    assert AllocationOptions().mola_budget == "authors"
    for total in (24, 200):  # LayerMoE's total does not move it
        assert list(al.allocate(sims, OLD, NEW, new_experts=total).plans["mola"].new) == list(mola.new)


def test_mola_on_an_moe_base_adds_the_same_new_experts_per_quarter(tmp_path):
    """An MoE base of 8 experts per layer gets the authors' 1, 3, 5, 7 new experts per quarter (not
    a count scaled by its 8 experts); depth not divisible by 4: layer i in quarter floor(4 i / n)."""
    sims = sim_table({layer: pairs(0.2 + 0.05 * layer, 0.3) for layer in range(4)}, experts=8)
    sims.write_parquet(tmp_path / "sim.parquet")
    result = al.run_allocation(tmp_path / "sim.parquet", {"old": OLD, "new": NEW, "new_experts": 8}, tmp_path / "a")
    assert list(result.plans["mola"].new) == [1, 3, 5, 7]  # the default config's 4 MoE layers: 16 new
    assert list(result.plans["mola"].experts) == [1, 3, 5, 7]  # an MoE: N_i counts new experts only
    counted = al.run_allocation(tmp_path / "sim.parquet", {"old": OLD, "new": NEW, "new_experts": 8,
                                                           "counts_existing": True}, tmp_path / "b")
    assert list(counted.plans["mola"].new) == [1, 3, 5, 7] and list(counted.plans["mola"].experts) == [9, 11, 13, 15]
    six = sim_table({layer: pairs(0.2 + 0.05 * layer, 0.3) for layer in range(6)})
    assert list(al.allocate(six, OLD, NEW, new_experts=12).plans["mola"].new) == [1, 1, 3, 5, 5, 7]
    with pytest.raises(MoelangError, match="mola_budget is 'scaled'"):
        al.allocate(six, OLD, NEW, new_experts=12, mola_budget="scaled")


def test_explicit_classifier_layers_are_taken_as_given():
    result = al.allocate(three_layers(), OLD, NEW, new_experts=9, classifier=[2, 0])
    assert {name: plan.classifier_layers for name, plan in result.plans.items()} == \
        {name: [0, 2] for name in result.plans}
    # our rule for comparison: the m layers with the highest S (S = 0.2, 0.4, 0.4)
    assert al.allocate(three_layers(), OLD, NEW, new_experts=9, classifier=2).plans["layermoe"].classifier_layers == [1, 2]
    with pytest.raises(MoelangError, match=r"classifier_layers .* lists layers \[3, 7\] that the similarity table"):
        al.allocate(three_layers(), OLD, NEW, new_experts=9, classifier=[0, 3, 7])
    with pytest.raises(MoelangError, match="a layer twice"):
        al.allocate(three_layers(), OLD, NEW, new_experts=9, classifier=[1, 1])


def test_cli_takes_a_classifier_list_or_a_number(tmp_path, capsys):
    three_layers().write_parquet(tmp_path / "sim.parquet")
    common = ("--similarity", tmp_path / "sim.parquet", "--old", "en,es", "--new", "el,hu", "--new-experts", 9)
    assert allocate_cli(*common, "--classifier-layers", "0,2", "--out", tmp_path / "a") == 0
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["layermoe"]["classifier_layers"] == plan["mola"]["classifier_layers"] == [0, 2]
    assert allocate_cli(*common, "--classifier-layers", "1", "--out", tmp_path / "b") == 0
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["layermoe"]["classifier_layers"] == [1]
    table = pl.read_parquet(tmp_path / "a" / "plan.parquet").filter(pl.col("method") == "mola")
    assert table["classifier"].to_list() == [True, False, True]
    with pytest.raises(SystemExit):
        allocate_cli(*common, "--classifier-layers", "two", "--out", tmp_path / "c")
    assert "neither a number nor comma-separated layer indices" in capsys.readouterr().err


def test_existing_experts_of_layers_with_different_counts(tmp_path):
    """A model whose MoE layers have 8, 10, 12, 8 experts: the similarity table records each layer's
    count, and the allocation's existing experts (and N_i with counts_existing) follow it per layer."""
    from families import tiny_olmoe_with_expert_counts
    from moelang.similarity import layer_experts

    sizes = [8, 10, 12, 8]
    model, _, _ = tiny_olmoe_with_expert_counts(sizes)
    assert layer_experts(ModelAdapter(model)) == sizes
    sims = sim_table({layer: pairs(0.2 + 0.1 * layer, 0.3) for layer in range(4)})
    sims = sims.with_columns(pl.col("layer").map_elements(lambda layer: sizes[layer], return_dtype=pl.Int64).alias("experts"))
    sims.write_parquet(tmp_path / "sim.parquet")
    assert al.layer_experts(al.read_similarity(tmp_path / "sim.parquet"), "sim") == dict(enumerate(sizes))
    result = al.run_allocation(tmp_path / "sim.parquet", {"old": OLD, "new": NEW, "new_experts": 8}, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "plan.json").read_text())["_meta"]
    assert meta["existing_experts_per_layer"] == sizes and meta["counts_existing"] is False
    for plan in result.plans.values():
        assert list(plan.experts) == list(plan.new)  # an MoE: N_i counts new experts only
    # N_i counting 8..12 existing experts: LayerMoE needs a larger budget to give every layer a new one
    counted = al.run_allocation(tmp_path / "sim.parquet", {"old": OLD, "new": NEW, "new_experts": 30,
                                                           "counts_existing": True}, tmp_path / "b")
    assert "layermoe" in counted.plans and "mola" in counted.plans
    for name, plan in counted.plans.items():
        assert list(plan.experts - plan.new) == sizes
        assert (plan.new >= 1).all() and plan.new.sum() == (16 if name == "mola" else 30)  # MoLA: 1, 3, 5, 7


# ---------------------------------------------------------------------------------------------------
# similarity context and BOS


def write_token_file(path, docs, splits=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"split": splits or ["dev"] * len(docs), "input_ids": docs}), path)
    return path


def test_context_sequences_by_hand(tmp_path):
    from moelang.similarity import context_sequences
    from moelang.splits import split_documents

    path = write_token_file(tmp_path / "t.parquet", [[5] * 10, [9] * 4, [6] * 3, [8] * 2, [7] * 8],
                            splits=["dev", "train", "dev", "test", "dev"])
    docs = split_documents(path, "dev")  # what token_similarity reads: neither train nor test
    assert [d.tolist() for d in docs] == [[5] * 10, [6] * 3, [7] * 8]

    def seqs(*args, **kwargs):
        return [s.tolist() for s in context_sequences(docs, *args, **kwargs)]

    assert seqs("chunks", 4, None) == [[5] * 4, [5] * 4, [5] * 2, [6] * 3, [7] * 4, [7] * 4]
    assert seqs("documents", 4, None) == [[5] * 4, [6] * 3, [7] * 4]
    stream = [5] * 10 + [2] + [6] * 3 + [2] + [7] * 8 + [2]
    assert seqs("stream", 4, None, eos_id=2) == [stream[i:i + 4] for i in range(0, len(stream), 4)]
    assert seqs("chunks", 4, None, bos_id=1) == [[1, 5, 5, 5]] * 3 + [[1, 5], [1, 6, 6, 6], [1, 7, 7, 7], [1, 7, 7, 7],
                                                                   [1, 7, 7]]
    assert seqs("documents", 4, 9, bos_id=1) == [[1, 5, 5, 5], [1, 6, 6, 6], [1]]  # the budget counts the BOS
    assert seqs("chunks", 4, 11) == [[5] * 4, [5] * 4, [5] * 2, [6]]
    with pytest.raises(MoelangError, match="similarity.context is 'windows'"):
        context_sequences(docs, "windows", 4, None)


def brute_similarity(model, sequences_by_lang, layer_count):
    """Mean cosine over all token pairs from the full cosine matrix, each sequence run alone (no padding)."""
    states = {}
    for lang, sequences in sequences_by_lang.items():
        captured = {i: [] for i in range(layer_count)}
        with torch.no_grad(), ModelAdapter(model).capture_mlp_inputs(lambda i, h: captured[i].append(h[0].clone())):
            for seq in sequences:
                model(input_ids=torch.tensor(seq)[None])
        states[lang] = {i: torch.cat(v).double() for i, v in captured.items()}
    out = {}
    for layer in range(layer_count):
        a, b = states["en"][layer], states["es"][layer]
        out[layer] = float(torch.nn.functional.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1).mean())
    return out


@pytest.mark.parametrize("context, bos", [("chunks", False), ("chunks", True), ("documents", False),
                                          ("documents", True), ("stream", False), ("stream", True)])
def test_similarity_context_and_bos_match_an_independent_computation(tmp_path, context, bos):
    from moelang.similarity import token_similarity

    model = tiny_model("llama").eval()  # bos_token_id 1, eos_token_id 2
    bos_id, eos_id = model.config.bos_token_id, model.config.eos_token_id
    rng = np.random.default_rng(3)
    docs = {lang: [rng.integers(3, 90, n).tolist() for n in lengths]
            for lang, lengths in (("en", (9, 14, 6)), ("es", (5, 17, 11)))}
    # a test and a train document around the dev ones: the similarity must read the dev split only
    files = {lang: write_token_file(tmp_path / f"{lang}.parquet", [[95] * 7] + d + [[96] * 5],
                                    splits=["test"] + ["dev"] * len(d) + ["train"]) for lang, d in docs.items()}
    seq_len, budget = 8, 25
    expected_sequences = {}
    for lang, doc_list in docs.items():  # the sequences, written out plainly for each context
        room = seq_len - bos
        if context == "chunks":
            pieces = [doc[s:s + room] for doc in doc_list for s in range(0, len(doc), room)]
        elif context == "documents":
            pieces = [doc[:room] for doc in doc_list]
        else:
            stream = [t for doc in doc_list for t in doc + [eos_id]]
            pieces = [stream[s:s + room] for s in range(0, len(stream), room)]
        flat = [t for piece in pieces for t in ([bos_id] if bos else []) + piece]
        sequences, start = [], 0
        for piece in pieces:  # the first `budget` positions, in order
            width = len(piece) + bos
            if start < budget:
                sequences.append((([bos_id] if bos else []) + piece)[: budget - start])
            start += width
        assert sum(map(len, sequences)) == min(budget, len(flat))
        expected_sequences[lang] = sequences
    options = {"seq_len": seq_len, "batch_tokens": 32, "tokens_per_language": budget, "context": context, "bos": bos}
    table = token_similarity(ModelAdapter(model), files, options, "m")
    expect = brute_similarity(model, expected_sequences, model.config.num_hidden_layers)
    cross = table.filter((pl.col("lang_a") == "en") & (pl.col("lang_b") == "es")).sort("layer")
    assert cross["similarity"].to_list() == pytest.approx([expect[i] for i in sorted(expect)], rel=1e-6)
    assert cross["n_tokens_a"].to_list() == [sum(map(len, expected_sequences["en"]))] * len(expect)
    assert cross["n_tokens_b"].to_list() == [sum(map(len, expected_sequences["es"]))] * len(expect)


def test_default_context_keeps_the_chunked_numbers(tmp_path):
    """Without the new keys the table is the one made from routing-style per-document chunks, no BOS."""
    from moelang.routing import heldout_chunks
    from moelang.similarity import token_similarity

    model = tiny_model("olmoe").eval()
    rng = np.random.default_rng(4)
    files = {lang: write_token_file(tmp_path / f"{lang}.parquet", [rng.integers(3, 90, n).tolist() for n in (9, 14, 6)])
             for lang in ("en", "es")}
    table = token_similarity(ModelAdapter(model), files, {"seq_len": 8, "batch_tokens": 32, "tokens_per_language": 20}, "m")
    means = {lang: token_unit_means(ModelAdapter(model), length_batches(heldout_chunks(path, 8, 20, split="dev"), 32, 0),
                                    lang)[0] for lang, path in files.items()}
    cross = table.filter((pl.col("lang_a") == "en") & (pl.col("lang_b") == "es")).sort("layer")
    assert cross["similarity"].to_list() == pytest.approx((means["en"] * means["es"]).sum(-1).tolist(), rel=1e-12)


def test_bos_on_a_model_without_one_is_one_line(tmp_path):
    from moelang.similarity import token_similarity

    model = tiny_model("olmoe").eval()
    model.config.bos_token_id = None
    files = {"en": write_token_file(tmp_path / "en.parquet", [[5, 6, 7]])}
    with pytest.raises(MoelangError, match="similarity.bos is true, but this olmoe model has no BOS token"):
        token_similarity(ModelAdapter(model), files, {"seq_len": 8, "batch_tokens": 32, "bos": True}, "m")

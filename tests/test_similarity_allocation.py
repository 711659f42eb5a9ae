import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from families import tiny_model
from moelang import allocation as al
from moelang.errors import MoelangError
from moelang.models import ModelAdapter
from moelang.similarity import mean_pair_cosine, sentence_vectors, token_unit_means
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
    en_es = sims.filter((pl.col("lang_a") == "en") & (pl.col("lang_b") == "es"))
    assert en_es["similarity"].to_numpy() == pytest.approx(1.0)
    # independent: pooled vectors, cosine per item, mean over the 3 items en and ca share
    vec = {lang: sentence_vectors(adapter, tok, table[lang].drop_nulls().to_list())[0] for lang in ("en", "ca")}
    cos = torch.nn.functional.cosine_similarity(vec["en"], vec["ca"], dim=-1).mean(-1)
    got = sims.filter((pl.col("lang_a") == "en") & (pl.col("lang_b") == "ca")).sort("layer")["similarity"].to_numpy()
    assert got == pytest.approx(cos.numpy(), rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# allocation


def sim_table(scores_by_layer: dict[int, dict[tuple[str, str], float]]) -> pl.DataFrame:
    rows = [("m", layer, a, b, v, 10, 10) for layer, pairs in scores_by_layer.items() for (a, b), v in pairs.items()]
    return pl.DataFrame(rows, schema={"model": pl.String, "layer": pl.Int32, "lang_a": pl.String, "lang_b": pl.String,
                                      "similarity": pl.Float64, "n_tokens_a": pl.Int64, "n_tokens_b": pl.Int64},
                        orient="row")


def three_layers():
    # old: en, es; new: el, hu. S_i = (mean new-old + mean new-new) / 2
    def layer(no, nn):
        return {("el", "en"): no, ("hu", "en"): no, ("es", "el"): no, ("es", "hu"): no, ("el", "hu"): nn,
                ("en", "es"): 0.99}
    return sim_table({0: layer(0.2, 0.2), 1: layer(0.4, 0.4), 2: layer(0.5, 0.3)})


def test_layer_scores_by_hand():
    layers, scores = al.layer_scores(three_layers(), ["en", "es"], ["el", "hu"])
    assert layers == [0, 1, 2] and scores == pytest.approx([0.2, 0.4, 0.4])
    _, single = al.layer_scores(three_layers(), ["en", "es"], ["el"])  # new-new term dropped
    assert single == pytest.approx([0.2, 0.4, 0.5])


def test_layermoe_counts_by_hand_with_rounding():
    # 1/S = 5, 2.5, 2.5 -> weights .5, .25, .25; delta 10 -> 5, 2.5, 2.5 -> ceil 5, 3, 3
    plans, delta = al.allocate(three_layers(), ["en", "es"], ["el", "hu"], delta=10)
    assert delta == 10
    assert plans["layermoe"].as_json() == {"experts_per_layer": [5, 3, 3], "new_experts_per_layer": [4, 2, 2],
                                           "classifier_layers": [1, 2]}  # two layers share the minimum: top-2 by S
    # exact products must not round up: delta 8 -> 4, 2, 2
    plans, _ = al.allocate(three_layers(), ["en", "es"], ["el", "hu"], delta=8)
    assert list(plans["layermoe"].experts) == [4, 2, 2]


def test_the_papers_formula_on_its_published_shape():
    """Inverse-similarity weights and ceil, checked against a direct evaluation of the formula."""
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.2, 0.9, 28)
    inv = 1 / scores
    expect = [math.ceil(x / inv.sum() * 70) for x in inv]
    assert list(al.layermoe_counts(scores, 70)) == expect
    assert sum(expect) >= 70


def test_budget_search_meets_the_total_and_baselines_share_it():
    plans, delta = al.allocate(three_layers(), ["en", "es"], ["el", "hu"], new_experts=9)
    assert sum(plans["layermoe"].new) == 9
    assert list(plans["layermoe"].experts) == list(al.layermoe_counts(plans["layermoe"].scores, delta))
    assert list(plans["uniform"].new) == [3, 3, 3]
    assert list(plans["increasing"].new) == [2, 3, 4]  # 1 each, then 6 split 1:2:3
    # ties: layers 1 and 2 have the same score, so totals jump: delta in (6, 8] gives (3, 1, 1) = 5 new
    # experts and (8, 10] gives (4, 2, 2) = 8; 6 and 7 are unreachable: the largest total below is taken
    for wanted in (6, 7):
        plans, _ = al.allocate(three_layers(), ["en", "es"], ["el", "hu"], new_experts=wanted)
        assert list(plans["layermoe"].new) == [3, 1, 1]
    assert list(al.uniform(4, 10)) == [2, 3, 2, 3]


def test_moe_base_counts_only_new_experts_and_routing_variant():
    spec = {0: 0.1, 1: 0.1, 2: 0.6}
    plans, _ = al.allocate(three_layers(), ["en", "es"], ["el", "hu"], new_experts=8, existing=64,
                           counts_existing=False, specialization=spec)
    assert sum(plans["layermoe"].new) == 8 and list(plans["layermoe"].experts) == list(plans["layermoe"].new)
    # 1 each, the other 5 by specialisation .125/.125/.75 = .625/.625/3.75: floors 0/0/3, the two
    # remaining go to the largest remainders (.75, then the first .625)
    assert list(plans["routing"].new) == [2, 1, 5]
    mixed, _ = al.allocate(three_layers(), ["en", "es"], ["el", "hu"], new_experts=8, counts_existing=False,
                           specialization=spec, routing_weight=0.5)
    assert sum(mixed["routing"].new) == 8


@pytest.mark.parametrize("kwargs, words", [
    (dict(delta=3), "no new expert; raise delta"),
    (dict(new_experts=2), "at least 3"),
    (dict(delta=5, new_experts=4), "exactly one budget"),
    (dict(), "exactly one budget"),
])
def test_invalid_budgets_are_rejected(kwargs, words):
    with pytest.raises(MoelangError, match=words):
        al.allocate(three_layers(), ["en", "es"], ["el", "hu"], **kwargs)


def test_non_positive_similarity_and_bad_languages_are_rejected():
    table = three_layers().with_columns(
        pl.when(pl.col("layer") == 1).then(-0.1).otherwise(pl.col("similarity")).alias("similarity"))
    with pytest.raises(MoelangError, match="S_i <= 0 at layers \\[1\\]"):
        al.allocate(table, ["en", "es"], ["el", "hu"], delta=10)
    with pytest.raises(MoelangError, match="no pair with \\['zh'\\]"):
        al.allocate(three_layers(), ["en", "zh"], ["el"], delta=10)
    with pytest.raises(MoelangError, match="both old and new"):
        al.allocate(three_layers(), ["en", "el"], ["el"], delta=10)


def test_cli_allocate_standalone(tmp_path):
    import subprocess
    import sys

    three_layers().write_parquet(tmp_path / "sim.parquet")
    proc = subprocess.run([sys.executable, "-m", "moelang", "allocate", "--similarity", str(tmp_path / "sim.parquet"),
                           "--old", "en,es", "--new", "el,hu", "--delta", "10", "--out", str(tmp_path / "plan")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["layermoe"]["experts_per_layer"] == [5, 3, 3]
    assert "routing" not in plan  # no specialisation table given
    assert pl.read_parquet(tmp_path / "plan" / "plan.parquet").height == 3 * 3
    assert (tmp_path / "plan" / "plan.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "moelang", "allocate", "--similarity", str(tmp_path / "sim.parquet"),
                          "--old", "en", "--new", "el", "--out", str(tmp_path / "p2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "exactly one budget" in bad.stderr and "Traceback" not in bad.stderr

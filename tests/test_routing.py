import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import mutual_info_score

from families import MOE_FAMILIES, tiny_model
from moelang.errors import MoelangError
from moelang import routing_metrics as rm
from moelang.models import ModelAdapter
from moelang.routing import PROFILE_SCHEMA, RoutingProfiler, heldout_chunks, length_batches, profile_model
from test_train import write_tokens

# ---------------------------------------------------------------------------------------------------
# metrics against independent computations


def test_entropy_and_jsd_equal_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 50, 16), rng.integers(0, 50, 16)
        a[0] += 1
        b[1] += 1
        assert rm.entropy(a) == pytest.approx(scipy_entropy(a / a.sum()))
        assert rm.jsd(a, b) == pytest.approx(jensenshannon(a / a.sum(), b / b.sum()) ** 2, abs=1e-12)
    assert rm.jsd([1, 0], [0, 1]) == pytest.approx(np.log(2))
    assert rm.entropy([5, 5, 5, 5]) == pytest.approx(np.log(4))


def test_specialization_on_hand_made_tables():
    assert rm.specialization([[10, 10, 0, 0], [0, 0, 7, 7]]) == pytest.approx(1.0)  # experts identify the language
    assert rm.specialization([[10, 20, 30], [1, 2, 3]]) == pytest.approx(0.0, abs=1e-12)  # independent
    assert np.isnan(rm.specialization([[1, 2, 3]]))
    rng = np.random.default_rng(1)
    table = rng.integers(0, 40, (4, 8)) + 1
    # independent: sklearn's mutual information (nats) over the expanded (language, expert) labels
    langs = np.repeat(np.arange(4), table.sum(axis=1))
    experts = np.concatenate([np.repeat(np.arange(8), row) for row in table])
    mi_bits = mutual_info_score(langs, experts) / np.log(2)
    h_bits = scipy_entropy(table.sum(axis=1), base=2)
    assert rm.specialization(table) == pytest.approx(mi_bits / h_bits, rel=1e-9)


def test_expert_selection_by_activation_gap_and_mean_share():
    shares = {"en": np.array([0.50, 0.20, 0.10, 0.10, 0.10]),
              "es": np.array([0.10, 0.195, 0.40, 0.20, 0.105]),
              "ru": np.array([0.10, 0.20, 0.10, 0.35, 0.25])}
    out = rm.select_experts(shares, alpha=0.01, shared_k=2)
    # top language and gap to the second: e0 en .30, e1 en/ru tie .20 (gap 0), e2 es .20, e3 ru .15, e4 ru .145
    assert out["specific"] == {"en": [0], "es": [2], "ru": [3, 4]}
    # mean shares: e0 .233, e1 .198, e2 .2, e3 .217, e4 .152 -> top 2: e0, e3
    assert out["shared"] == [0, 3]
    per = {r["expert"]: r for r in out["per_expert"]}
    assert per[1]["specific_lang"] is None and per[1]["gap"] == pytest.approx(0.0)
    assert rm.top_by_gap(shares, "es", 2) == [1, 2]  # gaps of es: -.4, -.005, .3, -.15, -.145


def test_jsd_overlap_correlation_matches_scipy():
    import polars as pl
    from scipy import stats

    jsd = pl.DataFrame({"model": ["m"] * 3, "checkpoint_step": [0] * 3, "layer": [3] * 3,
                        "lang_a": ["aa", "aa", "bb"], "lang_b": ["bb", "cc", "cc"], "jsd": [0.1, 0.3, 0.2]})
    overlap = pl.DataFrame({"lang_a": ["aa", "aa", "bb"], "lang_b": ["bb", "cc", "cc"], "measure": ["jaccard"] * 3,
                            "value": [0.9, 0.2, 0.5]})
    out = rm.jsd_overlap_table(jsd, overlap, layer=None)
    assert out["n_pairs"].to_list() == [3]
    assert out["pearson_r"][0] == pytest.approx(stats.pearsonr([0.9, 0.2, 0.5], [0.1, 0.3, 0.2])[0])
    assert out["spearman_r"][0] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------------
# the profiler against a brute-force count from output_router_logits


def grouped_topk(logits, router):
    """DeepSeek-V3's selection, recomputed from its router logits: top groups first, then top-k inside."""
    scores = logits.sigmoid() + router.e_score_correction_bias
    groups = scores.view(-1, router.num_group, router.num_experts // router.num_group)
    group_scores = groups.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, 1)
    mask = keep.unsqueeze(-1).expand_as(groups).reshape(scores.shape).bool()
    return scores.masked_fill(~mask, float("-inf")).topk(router.top_k, dim=-1).indices


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_profiler_counts_equal_a_brute_force_count(family):
    model = tiny_model(family).eval()
    adapter = ModelAdapter(model)
    if family == "deepseek_v3":
        for layer in adapter.moe_layers:
            layer.router.e_score_correction_bias.copy_(torch.randn(layer.num_experts) * 0.5)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, model.config.vocab_size, n) for n in (9, 4, 13, 7)]
    profiler = RoutingProfiler(adapter)
    profiler.run(length_batches(chunks, batch_tokens=30, pad_id=0))  # padded batches
    brute = {layer.index: Counter() for layer in adapter.moe_layers}
    with torch.no_grad():
        for chunk in chunks:  # one unpadded sequence at a time
            out = model(input_ids=torch.tensor(chunk)[None], output_router_logits=True)
            for k, layer in enumerate(adapter.moe_layers):
                logits = out.router_logits[k]
                chosen = grouped_topk(logits, layer.router) if family == "deepseek_v3" \
                    else logits.topk(layer.top_k, dim=-1).indices
                brute[layer.index].update(chosen.reshape(-1).tolist())
    table = profiler.table("m", 0, "xx")
    assert table.schema.equals(PROFILE_SCHEMA)
    for layer in adapter.moe_layers:
        rows = [r for r in table.to_pylist() if r["layer"] == layer.index]
        assert [r["count"] for r in rows] == [brute[layer.index][e] for e in range(layer.num_experts)]
        assert {r["n_tokens"] for r in rows} == {sum(map(len, chunks))}  # padding never counted


def test_weight_sums_are_the_router_probability_mass():
    model = tiny_model("olmoe").eval()
    adapter = ModelAdapter(model)
    chunk = np.arange(3, 40)
    profiler = RoutingProfiler(adapter)
    profiler.run(length_batches([chunk], batch_tokens=64, pad_id=0))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(chunk)[None], output_router_logits=True)
    for k, layer in enumerate(adapter.moe_layers):
        probs = out.router_logits[k].softmax(-1)
        top = probs.topk(layer.top_k, dim=-1)
        expect = torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(
            0, top.indices.reshape(-1), top.values.reshape(-1).double())
        got = profiler.state.weight_sums[k]
        assert torch.allclose(got, expect, atol=1e-5)


def test_chunks_respect_the_budget_and_the_split(tmp_path):
    path = write_tokens(tmp_path / "t.parquet", [[5] * 10, [6] * 3, [7] * 8, [8] * 5],
                        splits=["dev", "train", "dev", "test"])
    chunks = heldout_chunks(path, seq_len=4, token_budget=None, split="dev")
    assert [c.tolist() for c in chunks] == [[5] * 4, [5] * 4, [5] * 2, [7] * 4, [7] * 4]
    assert [c.tolist() for c in heldout_chunks(path, seq_len=4, token_budget=None, split="test")] == [[8] * 4, [8]]
    assert sum(map(len, heldout_chunks(path, seq_len=4, token_budget=11, split="dev"))) == 11
    batches = length_batches(chunks, batch_tokens=8, pad_id=0)
    assert sum(int(mask.sum()) for _, mask in batches) == 18
    assert all(ids.numel() <= 8 for ids, _ in batches)


# ---------------------------------------------------------------------------------------------------
# a model with planted language structure


def planted_model(seed=0):
    """Tiny OLMoE whose residual stream is the token embedding at every layer (attention and expert
    outputs zeroed). Tokens 3..49 belong to 'en', 50..96 to 'es'; their embeddings are a language
    direction plus noise orthogonal to both directions. Early routers only see the noise; the last
    layer's router maps 'en' to experts {0, 1} and 'es' to {2, 3}."""
    model = tiny_model("olmoe", seed=seed)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))
    u_en, u_es, noise_basis = basis[:, 0], basis[:, 1], basis[:, 2:]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        noise = torch.randn(emb.shape[0], hidden - 2, generator=g) @ noise_basis.T
        emb.copy_(noise)
        emb[3:50] += 4 * u_en
        emb[50:] += 4 * u_es
        layers = model.model.layers
        for layer in layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            router = layer.mlp.gate.weight
            router.copy_(torch.randn(router.shape, generator=g) @ noise_basis @ noise_basis.T)
        last = layers[-1].mlp.gate.weight
        last[0] += 20 * u_en
        last[1] += 19 * u_en
        last[2] += 20 * u_es
        last[3] += 19 * u_es
    return model


def test_profiler_and_metrics_find_planted_language_structure(tmp_path):
    model = planted_model()
    model.save_pretrained(tmp_path / "planted")
    rng = np.random.default_rng(0)
    docs = {"en": [rng.integers(3, 50, rng.integers(5, 40)).tolist() for _ in range(80)],
            "es": [rng.integers(50, 97, rng.integers(5, 40)).tolist() for _ in range(80)],
            "ca": [rng.integers(50, 97, rng.integers(5, 40)).tolist() for _ in range(20)]}  # a target, via its parent
    files = {lang: write_tokens(tmp_path / f"{lang}.parquet", d, splits=["dev"] * len(d)) for lang, d in docs.items()}
    options = {"seq_len": 16, "batch_tokens": 64, "tokens_per_language": None, "device": "cpu", "token_layers": [1]}
    profile_model(tmp_path / "planted", files, options, tmp_path / "routing", "planted", 7)
    profiles = [tmp_path / "routing" / f"{lang}.parquet" for lang in ("en", "es", "ca")]
    tokens = pq.read_table(tmp_path / "routing" / "en.tokens.parquet").to_pylist()
    assert {r["layer"] for r in tokens} == {1} and {r["expert"] for r in tokens} <= {0, 1}
    assert all(3 <= r["token_id"] < 50 for r in tokens)

    import polars as pl

    overlap = pl.DataFrame({"lang_a": ["en", "en", "es"], "lang_b": ["es", "ca", "ca"],
                            "measure": ["jaccard"] * 3, "value": [0.0, 0.0, 0.8]})
    overlap.write_parquet(tmp_path / "overlap.parquet")
    opts = {"languages": ["en", "es", "ca"], "base_language": "en", "high_resource": ["en", "es"],
            "targets": {"ca": "es"}, "seed": 0, "final_layers": 1, "alpha": 0.01, "shared_k": 0, "top_n": 2}
    rm.run_metrics(profiles, tmp_path / "overlap.parquet", opts, tmp_path / "metrics", tmp_path / "selected.json")
    # over en, es, ca the last layer separates en from {es, ca}: I(L;E) = H(en vs rest) < H(L)
    spec = pl.read_parquet(tmp_path / "metrics" / "specialization.parquet").sort("layer")
    assert spec["score"].to_list()[0] < 0.05
    last = pl.read_parquet(tmp_path / "routing" / "en.parquet").filter(pl.col("layer") == 1)
    assert last.filter(pl.col("count") > 0)["expert"].to_list() == [0, 1]
    two = rm.metric_tables(pl.concat([pl.read_parquet(p) for p in profiles[:2]]), ["en", "es"])["specialization"]
    assert two.sort("layer")["score"].to_list()[-1] == pytest.approx(1.0)
    assert two.sort("layer")["score"].to_list()[0] < 0.05
    selected = json.loads((tmp_path / "selected.json").read_text())
    assert selected["ca"]["seft"] == {"1": [2, 3]}
    assert selected["ca"]["ssft"] == {"1": [2, 3]}
    assert selected["ca"]["seft_top2"] == {"1": [2, 3]}
    for name in ("entropy", "jsd_dynamics", "jsd_heatmap", "specialization", "jsd_overlap"):
        assert (tmp_path / "metrics" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    experts = pl.read_parquet(tmp_path / "metrics" / "experts.parquet")
    assert experts.filter(pl.col("specific_lang") == "en")["expert"].to_list() == [0, 1]
    summary = pl.read_parquet(tmp_path / "metrics" / "jsd_overlap.parquet")
    assert summary["pairs"].to_list() == ["all", "without_lr_lr", "hr_lr", "hr_hr"]
    assert summary["n_pairs"].to_list() == [3, 3, 2, 1]  # en-es HR-HR; en-ca, es-ca HR-LR
    means = pl.read_parquet(tmp_path / "metrics" / "jsd_mean.parquet")
    assert set(means["languages"]) == {"all", "without_en", "high_resource", "high_resource_without_en"}


def test_sharded_profiles_add_up_to_the_whole(tmp_path):
    from moelang.routing import TOKEN_SCHEMA, merge_profile_dirs

    model = tiny_model("olmoe").eval()
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(3)
    tokens = {lang: write_tokens(tmp_path / f"{lang}.parquet",
                                 [rng.integers(3, 97, rng.integers(5, 60)).tolist() for _ in range(40)],
                                 splits=["dev"] * 40) for lang in ("es", "ca")}
    base = {"seq_len": 16, "batch_tokens": 64, "tokens_per_language": 700, "device": "cpu", "token_layers": [1]}
    profile_model(tmp_path / "m", tokens, base, tmp_path / "whole", "m", 0)
    for i in range(3):
        profile_model(tmp_path / "m", tokens, {**base, "shard": [i, 3]}, tmp_path / f"s{i}", "m", 0)
    names = merge_profile_dirs([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    assert names == ["ca.parquet", "ca.tokens.parquet", "es.parquet", "es.tokens.parquet"]
    for lang in ("es", "ca"):
        merged = pq.read_table(tmp_path / "merged" / f"{lang}.parquet")
        whole = pq.read_table(tmp_path / "whole" / f"{lang}.parquet")
        assert merged.schema.equals(PROFILE_SCHEMA)
        for column in ("layer", "expert", "count", "n_tokens"):
            assert merged.column(column).to_pylist() == whole.column(column).to_pylist(), column
        # weights come from fp32 forward passes over differently composed batches: equal to fp32 precision
        assert np.allclose(merged.column("weight_sum").to_numpy(), whole.column("weight_sum").to_numpy(), rtol=1e-6)
        assert whole.column("n_tokens")[0].as_py() == 700
        merged_tokens = pq.read_table(tmp_path / "merged" / f"{lang}.tokens.parquet")
        assert merged_tokens.schema.equals(TOKEN_SCHEMA)
        assert merged_tokens.equals(pq.read_table(tmp_path / "whole" / f"{lang}.tokens.parquet").sort_by(
            [(name, "ascending") for name in ("model", "checkpoint_step", "lang", "layer", "token_id", "expert")]))
    (tmp_path / "s2" / "ca.tokens.parquet").unlink()
    with pytest.raises(MoelangError, match="the shards must profile the same languages"):
        merge_profile_dirs([tmp_path / f"s{i}" for i in range(3)], tmp_path / "again")
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------------
# the authors' way: stream windows, high-resource means, pair types, expert-set controls


def test_stream_windows_equal_an_independent_concatenation_and_cut(tmp_path):
    from moelang.routing import heldout_windows, routing_sequences

    rng = np.random.default_rng(5)
    docs = [rng.integers(3, 90, rng.integers(1, 30)).tolist() for _ in range(25)]
    splits = [("train", "dev", "test")[i % 3] for i in range(25)]
    path = write_tokens(tmp_path / "t.parquet", docs, splits=splits)
    eos = 2
    stream = []  # independent: plain Python, in file order, each dev document followed by EOS (routing reads dev)
    for doc, split in zip(docs, splits):
        if split == "dev":
            stream += doc + [eos]
    for window, budget in ((7, None), (16, None), (7, 100), (16, 40)):
        usable = stream[: budget] if budget is not None else stream
        expect = [usable[i:i + window] for i in range(0, len(usable) - window + 1, window)]
        got = heldout_windows(path, window, budget, eos, split="dev")
        assert [w.tolist() for w in got] == expect
        assert all(len(w) == window for w in got)  # no padding, the tail dropped
        assert len(expect) == len(usable) // window
        parts = [heldout_windows(path, window, budget, eos, split="dev", shard=(i, 3)) for i in range(3)]
        assert sorted(w.tolist() for part in parts for w in part) == sorted(expect)
        options = {"windowing": "stream", "seq_len": window, "tokens_per_language": budget}
        assert [w.tolist() for w in routing_sequences(path, options, eos)] == expect
    # the default keeps today's per-document chunks
    assert [c.tolist() for c in routing_sequences(path, {"seq_len": 7, "tokens_per_language": None}, eos)] == \
        [c.tolist() for c in heldout_chunks(path, 7, None, split="dev")]
    with pytest.raises(MoelangError, match="routing.seq_len"):
        heldout_windows(path, len(stream) + 1, None, eos, split="dev")
    with pytest.raises(MoelangError, match="eos_token_id"):
        routing_sequences(path, {"windowing": "stream", "seq_len": 7}, None)


def test_stream_profile_counts_whole_windows(tmp_path):
    model = tiny_model("olmoe").eval()
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(4)
    docs = [rng.integers(3, 97, rng.integers(5, 40)).tolist() for _ in range(30)]
    tokens = {"es": write_tokens(tmp_path / "es.parquet", docs, splits=["dev"] * 30)}
    options = {"windowing": "stream", "seq_len": 32, "batch_tokens": 128, "tokens_per_language": 500, "device": "cpu"}
    profile_model(tmp_path / "m", tokens, options, tmp_path / "out", "m", 0)
    table = pq.read_table(tmp_path / "out" / "es.parquet").to_pylist()
    assert {r["n_tokens"] for r in table} == {500 // 32 * 32}
    # brute force: each window alone, top-k of the router logits
    stream = np.concatenate([np.append(d, model.config.eos_token_id) for d in docs])[: 500 // 32 * 32]
    adapter = ModelAdapter(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(stream.reshape(-1, 32)), output_router_logits=True)
    for k, layer in enumerate(adapter.moe_layers):
        chosen = out.router_logits[k].topk(layer.top_k, dim=-1).indices.reshape(-1)
        expect = torch.bincount(chosen, minlength=layer.num_experts).tolist()
        assert [r["count"] for r in table if r["layer"] == layer.index] == expect


def random_profiles(langs, layers=(2, 3), experts=6, seed=0):
    import polars as pl

    rng = np.random.default_rng(seed)
    rows = [{"model": "m", "checkpoint_step": 0, "lang": lang, "layer": layer, "expert": e,
             "count": int(rng.integers(1, 200)), "weight_sum": 0.0, "n_tokens": 0}
            for lang in langs for layer in layers for e in range(experts)]
    return pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "lang": pl.String,
                                      "layer": pl.Int32, "expert": pl.Int32, "count": pl.Int64,
                                      "weight_sum": pl.Float64, "n_tokens": pl.Int64})


def test_mean_jsd_over_high_resource_languages_matches_scipy():
    import itertools

    import polars as pl

    langs = ["en", "ar", "cs", "es", "ca", "sk"]
    high_resource = ["en", "ar", "cs", "es"]
    profiles = random_profiles(langs)
    means = rm.metric_tables(profiles, langs, "en", high_resource)["jsd_mean"]
    for layer in (2, 3):
        at_layer = profiles.filter(pl.col("layer") == layer).sort("expert")
        dist = {l: at_layer.filter(pl.col("lang") == l)["count"].to_numpy() for l in langs}
        for subset, members in (("all", langs), ("without_en", langs[1:]), ("high_resource", high_resource),
                                ("high_resource_without_en", high_resource[1:])):
            values = [jensenshannon(dist[a] / dist[a].sum(), dist[b] / dist[b].sum()) ** 2
                      for a, b in itertools.combinations(members, 2)]
            row = means.filter((pl.col("layer") == layer) & (pl.col("languages") == subset))
            assert row["n_pairs"].to_list() == [len(values)]
            assert row["mean_jsd"][0] == pytest.approx(np.mean(values), rel=1e-12)
    # without high_resource the table keeps today's two subsets
    old = rm.metric_tables(profiles, langs, "en")["jsd_mean"]
    assert set(old["languages"]) == {"all", "without_en"}


def test_jsd_overlap_per_pair_type_matches_scipy():
    import itertools

    import polars as pl
    from scipy import stats

    langs = ["en", "ar", "cs", "ca", "sk", "uk"]
    high_resource, targets = ["en", "ar", "cs"], ["ca", "sk", "uk"]
    rng = np.random.default_rng(2)
    pairs = list(itertools.combinations(langs, 2))
    jsd_values, overlap_values = rng.random(len(pairs)), rng.random(len(pairs))
    jsd = pl.DataFrame({"model": ["m"] * len(pairs), "checkpoint_step": [0] * len(pairs), "layer": [3] * len(pairs),
                        "lang_a": [a for a, _ in pairs], "lang_b": [b for _, b in pairs], "jsd": jsd_values})
    overlap = pl.DataFrame({"lang_a": [a for a, _ in pairs], "lang_b": [b for _, b in pairs],
                            "measure": ["jaccard"] * len(pairs), "value": overlap_values})
    out = rm.jsd_overlap_table(jsd, overlap, None, high_resource, targets)
    assert out["pairs"].to_list() == ["all", "without_lr_lr", "hr_lr", "hr_hr"]
    hr = set(high_resource)
    kind = {p: ("hr_hr" if set(p) <= hr else "lr_lr" if not set(p) & hr else "hr_lr") for p in pairs}
    for pair_set, keep in (("all", lambda k: True), ("without_lr_lr", lambda k: k != "lr_lr"),
                           ("hr_lr", lambda k: k == "hr_lr"), ("hr_hr", lambda k: k == "hr_hr")):
        pick = np.array([keep(kind[p]) for p in pairs])
        row = out.filter(pl.col("pairs") == pair_set)
        assert row["n_pairs"][0] == pick.sum() == {"all": 15, "without_lr_lr": 12, "hr_lr": 9, "hr_hr": 3}[pair_set]
        assert row["pearson_r"][0] == pytest.approx(stats.pearsonr(overlap_values[pick], jsd_values[pick])[0])
        assert row["spearman_r"][0] == pytest.approx(stats.spearmanr(overlap_values[pick], jsd_values[pick])[0])


def test_ssft_sets_by_shared_mode():
    shared_order = [3, 1, 0, 2, 4]
    assert rm.ssft_experts([0, 3], shared_order, 2, "k_extra") == [0, 1, 2, 3]  # 3 is specific: skip to 1, 2
    assert rm.ssft_experts([0, 3], shared_order, 2, "union") == [0, 1, 3]
    assert rm.ssft_experts([], shared_order, 2, "k_extra") == [1, 3]
    assert rm.ssft_experts([0, 1, 2, 3], shared_order, 2, "k_extra") == [0, 1, 2, 3, 4]  # runs out of experts
    with pytest.raises(MoelangError, match="routing.shared_mode"):
        rm.ssft_experts([0], shared_order, 2, "both")


def test_random_hr_derangement():
    authors = {"ca": "es", "et": "fi", "mr": "hi", "sk": "cs", "uk": "ru", "ur": "ar"}
    # ur <- sk, sk <- ca, ca <- et, et <- mr, mr <- uk, uk <- ur: the parent of the target after the arrow
    expect = {"ur": "cs", "sk": "es", "ca": "fi", "et": "hi", "mr": "ru", "uk": "ar"}
    paper_hr = ["en", "ar", "cs", "es", "fi", "hi", "ru"]
    assert rm.random_hr_donors(authors, paper_hr) == expect
    assert rm.random_hr_donors(authors, list(reversed(paper_hr))) == expect  # their targets: their mapping
    assert rm.cyclic_parent_donors(authors, paper_hr) == expect  # the general rule agrees with it
    with_nl = {**authors, "nl": "en"}
    assert rm.random_hr_donors(with_nl, paper_hr) == {"nl": "ar", "ur": "cs", "sk": "es", "ca": "fi", "et": "hi",
                                                      "mr": "ru", "uk": "en"}
    shared_parent = {"ca": "es", "gl": "es", "et": "fi"}
    assert rm.random_hr_donors(shared_parent, paper_hr) == {"ca": "fi", "gl": "fi", "et": "es"}
    assert rm.random_hr_donors({"ca": "es", "gl": "es"}, paper_hr) == {}


def test_expert_sets_against_hand_computed_sets():
    import polars as pl

    shares = {"en": [500, 200, 100, 100, 100], "es": [100, 195, 400, 200, 105], "ru": [100, 200, 100, 350, 250]}
    rows = [{"model": "m", "checkpoint_step": 4, "lang": lang, "layer": 5, "expert": e, "count": c,
             "weight_sum": 0.0, "n_tokens": 1000} for lang, counts in shares.items() for e, c in enumerate(counts)]
    profiles = pl.DataFrame(rows, schema={"model": pl.String, "checkpoint_step": pl.Int64, "lang": pl.String,
                                          "layer": pl.Int32, "expert": pl.Int32, "count": pl.Int64,
                                          "weight_sum": pl.Float64, "n_tokens": pl.Int64})
    targets = {"ca": "es", "uk": "ru"}
    options = {"final_layers": 1, "alpha": 0.01, "shared_k": 2, "top_n": 2, "targets": targets}
    # specific (gap >= .01): en [0], es [2], ru [3, 4]; mean shares .233 .198 .2 .217 .152: order 0, 3, 2, 1, 4
    _, selected = rm.expert_selection(profiles, "m", 4, ["en", "es", "ru"], targets, options, seed=7)
    assert selected["ca"]["seft"] == {"5": [2]} and selected["uk"]["seft"] == {"5": [3, 4]}
    assert selected["ca"]["ssft"] == {"5": [0, 2, 3]}  # 2 extra: 0, 3
    assert selected["uk"]["ssft"] == {"5": [0, 2, 3, 4]}  # 3 is specific already: 0, 2
    assert selected["ca"]["random_hr"] == {"5": [3, 4]}  # es <- ru
    assert selected["uk"]["random_hr"] == {"5": [2]}  # ru <- es
    rng = np.random.default_rng(7)
    assert selected["ca"]["random"] == {"5": sorted(rng.choice(5, size=1, replace=False).tolist())}
    assert selected["uk"]["random"] == {"5": sorted(rng.choice(5, size=2, replace=False).tolist())}
    _, union = rm.expert_selection(profiles, "m", 4, ["en", "es", "ru"], targets,
                                   {**options, "shared_mode": "union"}, seed=7)
    assert union["ca"]["ssft"] == {"5": [0, 2, 3]} and union["uk"]["ssft"] == {"5": [0, 3, 4]}
    # a single parent: no derangement, no random_hr
    _, single = rm.expert_selection(profiles, "m", 4, ["en", "es", "ru"], {"ca": "es"},
                                    {**options, "targets": {"ca": "es"}}, seed=7)
    assert "random_hr" not in single["ca"]


def test_stream_windows_longer_than_the_context_are_refused_at_start_up():
    from moelang import config as cfg
    from moelang.errors import ConfigError
    from test_config import tiny_arch, trained

    with pytest.raises(ConfigError, match="config key 'routing.seq_len': stream windows of 512 tokens exceed"):
        cfg.validate(trained(tiny_arch(), routing={"windowing": "stream", "seq_len": 512}))
    cfg.validate(trained(tiny_arch(), routing={"windowing": "stream", "seq_len": 256}))
    cfg.validate(trained(tiny_arch(), routing={"seq_len": 512}))  # document chunks: as before
    with pytest.raises(ConfigError, match="routing.windowing"):
        cfg.validate(trained(tiny_arch(), routing={"windowing": "windows"}))


# MoE layers with different expert counts (an expanded model)


def test_profiler_counts_layers_with_different_expert_counts_against_brute_force():
    from families import tiny_olmoe_with_expert_counts

    sizes = [8, 10, 12, 8]
    model, _, _ = tiny_olmoe_with_expert_counts(sizes)
    adapter = ModelAdapter(model)
    assert [m.num_experts for m in adapter.moe_layers] == sizes
    rng = np.random.default_rng(1)
    chunks = [rng.integers(3, model.config.vocab_size, n) for n in (9, 4, 13, 7)]
    profiler = RoutingProfiler(adapter, token_layers=[2])
    profiler.run(length_batches(chunks, batch_tokens=30, pad_id=0))  # padded batches
    brute = {i: Counter() for i in range(len(sizes))}
    brute_tokens = Counter()
    weights = {i: np.zeros(size) for i, size in enumerate(sizes)}
    # the router's own logits (output_router_logits would also compute the load-balancing loss, which
    # transformers cannot do for layers of different widths)
    router_logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda module, args, out: router_logits.append(out[0]))
             for layer in model.model.layers]
    with torch.no_grad():
        for chunk in chunks:
            router_logits.clear()
            model(input_ids=torch.tensor(chunk)[None])
            for i, logits in enumerate(router_logits):
                assert logits.shape[-1] == sizes[i]
                top = logits.softmax(-1).topk(model.config.num_experts_per_tok, dim=-1)
                brute[i].update(top.indices.reshape(-1).tolist())
                np.add.at(weights[i], top.indices.reshape(-1).numpy(), top.values.reshape(-1).double().numpy())
                if i == 2:
                    for token, chosen in zip(chunk, top.indices.tolist()):
                        brute_tokens.update((int(token), e) for e in chosen)
    for hook in hooks:
        hook.remove()
    rows = profiler.table("m", 0, "xx").to_pylist()
    assert [(r["layer"], r["expert"]) for r in rows] == [(i, e) for i, size in enumerate(sizes) for e in range(size)]
    for i, size in enumerate(sizes):
        layer_rows = [r for r in rows if r["layer"] == i]
        assert [r["count"] for r in layer_rows] == [brute[i][e] for e in range(size)]
        assert np.allclose([r["weight_sum"] for r in layer_rows], weights[i], atol=1e-5)
        assert {r["n_tokens"] for r in layer_rows} == {sum(map(len, chunks))}
    tokens = profiler.token_table("m", 0, "xx").to_pylist()
    assert {(r["token_id"], r["expert"]): r["count"] for r in tokens} == dict(brute_tokens)
    assert max(r["expert"] for r in tokens) < sizes[2]

"""LayerMoE expanded models (moelang.models.layermoe): upcycling a dense model, growing an MoE model,
the router classifier, the per-layer load balancing, saving and reloading, and how the rest of the
pipeline sees them. Every check compares against an independent computation (the base model, the
router and classifier weights applied by hand, a loop over tokens)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from families import tiny_model
from moelang.errors import MoelangError
from moelang.models import ModelAdapter, count_parameters
from moelang.models.adapters import split_experts
from moelang.models.layermoe import EXPANDED
from moelang.models.layermoe.build import add_classifiers, expand_model, most_used_experts
from moelang.models.layermoe.common import load_balancing_loss

DENSE = ["llama", "qwen2"]
GROWN = ["olmoe", "qwen2_moe", "mixtral"]
# a 4-layer dense base: layer 0 stays dense (N_0 = 1), layers 1..3 get 2, 3 and 4 experts
DENSE_NEW = [0, 1, 2, 3]
GROWN_NEW = [3, 1]  # 8 experts per layer in the tiny MoE bases
GROWN_SOURCES = {0: [5, 5, 2], 1: [7]}


def token_ids(seed=0, batch=2, seq=12, vocab=97):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def dense_base(family="llama", layers=4, seed=0):
    return tiny_model(family, seed=seed, num_hidden_layers=layers).eval()


def logits_of(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def mlp_inputs(model, ids, attention_mask=None) -> dict[int, torch.Tensor]:
    captured = {}
    with torch.no_grad(), ModelAdapter(model).capture_mlp_inputs(lambda i, h: captured.__setitem__(i, h.clone())):
        model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    return captured


def routing_of(model, ids, **kwargs) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    recorded = {}
    with torch.no_grad(), ModelAdapter(model).record_routing(
            lambda i, index, weights: recorded.__setitem__(i, (index.clone(), weights.clone()))):
        model(input_ids=ids, use_cache=False, **kwargs)
    return recorded


def pooled_by_hand(hidden: torch.Tensor, pooling: str, decision: str, valid=None) -> torch.Tensor:
    """What a router classifier reads, with a loop over positions: ``[batch, hidden]`` (sequence) or
    ``[batch, seq, hidden]`` (causal: position t pools positions 0..t)."""
    hidden = hidden.double()
    batch, seq, _ = hidden.shape
    valid = torch.ones(batch, seq) if valid is None or pooling == "sum" else valid.double()
    ends = [seq] if decision == "sequence" else range(1, seq + 1)
    out = torch.zeros(batch, len(ends), hidden.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for j, end in enumerate(ends):
            total = sum(hidden[b, t] * valid[b, t] for t in range(end))
            count = sum(float(valid[b, t]) for t in range(end))
            out[b, j] = total / max(count, 1.0) if pooling == "mean" else total
    return out[:, 0] if decision == "sequence" else out


def force_classes(model, ids, classes: list[int]) -> None:
    """Set every classifier's weight so that sequence b of ``ids`` gets class ``classes[b]`` (logit +1
    for it, -1 for the other class; with causal decisions at every position): solved from the MLP
    inputs the model itself computes, layer by layer (a layer's MLP input depends on the earlier
    layers' decisions only)."""
    config = model.config
    for index in config.classifier_layers:
        pooled = pooled_by_hand(mlp_inputs(model, ids)[index], config.classifier_pooling, config.classifier_decision)
        per_row = pooled.shape[1] if pooled.dim() == 3 else 1
        target = torch.tensor([[1.0, -1.0] if c == 0 else [-1.0, 1.0] for c in classes for _ in range(per_row)])
        # minimum-norm solution of pooled @ W.T = target
        weight = torch.linalg.pinv(pooled.reshape(-1, pooled.shape[-1])) @ target.double()
        model.model.layers[index].mlp.classifier.weight.data.copy_(weight.T.float())


def reference_top_k(logits: torch.Tensor, k: int, normalise: bool):
    """Top-k routing computed by hand: softmax in fp32, top-k, optional renormalisation."""
    probs = torch.softmax(logits.double(), dim=-1)
    weights, index = probs.topk(k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


# --------------------------------------------------------------------------------------------------
# 1. Dense upcycling
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", DENSE)
def test_upcycled_model_computes_the_dense_model(family):
    base = dense_base(family)
    expanded, record = expand_model(base, DENSE_NEW, top_k=3)
    counts = [1, 2, 3, 4]
    assert expanded.config.model_type == f"layermoe_{family}" and record["experts_per_layer"] == counts
    assert expanded.config.num_experts_per_layer == counts and expanded.config.num_original_experts == [1, 1, 1, 1]
    hidden = base.config.hidden_size
    assert type(expanded.model.layers[0].mlp) is type(base.model.layers[0].mlp)  # N_0 = 1: stays dense
    for i in (1, 2, 3):
        block, ffn = expanded.model.layers[i].mlp, base.model.layers[i].mlp
        assert [name for name, _ in block.gate.named_parameters()] == ["weight"]  # bias-free
        assert block.gate.weight.shape == (counts[i], hidden)
        assert block.gate.top_k == min(3, counts[i])
        assert block.classifier is None
        for e in range(counts[i]):  # every expert is the FFN, exactly
            gate, up = block.experts.gate_up_proj[e].chunk(2, dim=0)
            assert torch.equal(gate, ffn.gate_proj.weight) and torch.equal(up, ffn.up_proj.weight)
            assert torch.equal(block.experts.down_proj[e], ffn.down_proj.weight)
    # the routers differ from layer to layer (xavier-normal, not zeros or copies)
    assert not torch.equal(expanded.model.layers[2].mlp.gate.weight[:2], expanded.model.layers[1].mlp.gate.weight)
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second sequence
    for kwargs in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(logits_of(expanded, ids, **kwargs), logits_of(base, ids, **kwargs),
                                   atol=1e-5, rtol=0)
    # k < N_i with weights that do not sum to 1 before renormalising: a missing renormalisation would show
    with torch.no_grad():
        router_logits = mlp_inputs(expanded, ids)[3].reshape(-1, hidden) @ expanded.model.layers[3].mlp.gate.weight.T
        probs = torch.softmax(router_logits, dim=-1)
    assert float(probs.topk(3, dim=-1).values.sum(-1).min()) < 0.999


def test_default_top_k_is_two_and_the_same_seed_gives_the_same_model():
    base = dense_base()
    first, _ = expand_model(base, DENSE_NEW, seed=3)
    again, _ = expand_model(base, DENSE_NEW, seed=3)
    other, _ = expand_model(base, DENSE_NEW, seed=4)
    assert first.config.num_experts_per_tok == 2 and first.config.norm_topk_prob is True
    assert [first.model.layers[i].mlp.gate.top_k for i in (1, 2, 3)] == [2, 2, 2]
    state, state_again, state_other = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[name], state_again[name]) for name in state)
    assert not torch.equal(state["model.layers.1.mlp.gate.weight"], state_other["model.layers.1.mlp.gate.weight"])


def test_noise_makes_the_new_experts_differ_and_keeps_expert_zero():
    base = dense_base()
    expanded, _ = expand_model(base, DENSE_NEW, noise=0.05)
    for i in (1, 2, 3):
        experts, ffn = expanded.model.layers[i].mlp.experts, base.model.layers[i].mlp
        gate, up = experts.gate_up_proj[0].chunk(2, dim=0)
        assert torch.equal(gate, ffn.gate_proj.weight) and torch.equal(up, ffn.up_proj.weight)
        assert torch.equal(experts.down_proj[0], ffn.down_proj.weight)
        for name in ("gate_up_proj", "down_proj"):
            tensor = getattr(experts, name).detach()
            for e in range(1, experts.num_experts):
                # relative size: noise x the original's standard deviation; each copy its own noise
                assert 0.02 < float((tensor[e] - tensor[0]).std() / tensor[0].std()) < 0.1
                assert not any(torch.equal(tensor[e], tensor[other]) for other in range(1, e))
    ids = token_ids()
    assert not torch.allclose(logits_of(expanded, ids), logits_of(base, ids), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 2. Saving and reloading
# --------------------------------------------------------------------------------------------------

def expanded_of(family: str, classifier_layers=()):
    if family in DENSE:
        return expand_model(dense_base(family), DENSE_NEW, classifier_layers=classifier_layers)[0]
    return expand_model(tiny_model(family).eval(), GROWN_NEW, sources=GROWN_SOURCES,
                        classifier_layers=classifier_layers)[0]


@pytest.mark.parametrize("family", DENSE + GROWN)
def test_save_and_reload_through_the_auto_classes(family, tmp_path):
    classifier_layers = [2, 3] if family in DENSE else [1]
    expanded = expanded_of(family, classifier_layers)
    expanded.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".py"))]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"layermoe_{family}"
    assert saved["num_experts_per_layer"] == expanded.config.num_experts_per_layer
    assert saved["num_original_experts"] == ([1, 1, 1, 1] if family in DENSE else [8, 8])
    assert saved["num_experts_per_tok"] == 2 and saved["classifier_layers"] == classifier_layers
    assert "auto_map" not in saved  # no remote code
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(expanded)
    before, after = expanded.state_dict(), reloaded.state_dict()
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)
    ids = token_ids()
    # the same weights; float-level differences only (the kernels see differently laid out tensors)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(expanded, ids), atol=1e-6, rtol=0)


def test_an_upcycled_model_loads_with_each_experts_implementation(tmp_path):
    from moelang.models import load_model

    expanded, _ = expand_model(dense_base(), DENSE_NEW, noise=0.3)
    expanded.save_pretrained(tmp_path)
    ids = token_ids()
    results = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model = load_model(tmp_path, experts_implementation=implementation)
        assert model.config._experts_implementation == implementation
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), model.model.layers[3].mlp.experts.gate_up_proj.grad)
    logits, grad = results["eager"]
    for implementation in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(results[implementation][0], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[implementation][1], grad, atol=1e-5, rtol=1e-4)


def test_a_fresh_process_loads_expanded_models_after_importing_moelang_models(tmp_path, repo):
    ids = token_ids()
    expected = {}
    for family in ("llama", "olmoe"):
        model = expanded_of(family, [3] if family == "llama" else [0, 1])
        model.save_pretrained(tmp_path / family)
        expected[family] = logits_of(model, ids)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import transformers
        import moelang.models  # registers the expanded families; nothing else of moelang is imported here
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        for family in ("llama", "olmoe"):
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family).eval()
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, {str(tmp_path)!r} + f"/{{family}}.logits.pt")
            print(type(model).__name__)
    """)
    env = {"PYTHONPATH": str(repo / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LayerMoELlamaForCausalLM", "LayerMoEOlmoeForCausalLM"]
    for family in ("llama", "olmoe"):
        torch.testing.assert_close(torch.load(tmp_path / f"{family}.logits.pt"), expected[family], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# 3. Growing an MoE model
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", GROWN)
def test_grown_layers_keep_the_base_and_copy_the_sources(family):
    base = tiny_model(family).eval()
    expanded, record = expand_model(base, GROWN_NEW, sources=GROWN_SOURCES)
    assert expanded.config.num_experts_per_layer == [11, 9] and expanded.config.num_original_experts == [8, 8]
    assert record["sources"] == {"0": [5, 5, 2], "1": [7]} and record["new_experts"] == 4
    base_state, state = base.state_dict(), expanded.state_dict()
    for name, tensor in base_state.items():  # attention, norms, embeddings, shared experts: equal
        if ".mlp.experts." in name or ".mlp.gate." in name:
            continue
        assert torch.equal(state[name], tensor), name
    for i, layer in enumerate(expanded.model.layers):
        block, base_block = layer.mlp, base.model.layers[i].mlp
        ids = list(range(8)) + GROWN_SOURCES[i]
        assert block.gate.weight.shape == (len(ids), base.config.hidden_size)
        assert block.gate.top_k == base_block.gate.top_k == 2
        assert bool(block.gate.norm_topk_prob) == bool(getattr(base.config, "norm_topk_prob", True))
        for e, source in enumerate(ids):
            assert torch.equal(block.gate.weight[e], base_block.gate.weight[source])
            for name in ("gate_up_proj", "down_proj"):
                assert getattr(block.experts, name).shape[0] == len(ids)
                assert torch.equal(getattr(block.experts, name)[e], getattr(base_block.experts, name)[source])
    if family == "qwen2_moe":
        assert any(".shared_expert." in name for name in base_state)


@pytest.mark.parametrize("family", GROWN)
def test_grown_model_restricted_to_the_original_experts_computes_the_base(family):
    base = tiny_model(family).eval()
    expanded, _ = expand_model(base, GROWN_NEW, sources=GROWN_SOURCES, classifier_layers=[0, 1])
    ids = token_ids(seed=1)
    # the grown router's copied rows tie with their sources: unrestricted, the routing changes
    assert not torch.allclose(logits_of(expanded, ids), logits_of(base, ids), atol=1e-5)
    force_classes(expanded, ids, [0, 0])
    torch.testing.assert_close(logits_of(expanded, ids), logits_of(base, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", GROWN)
def test_a_grown_model_with_no_new_expert_prior_computes_the_base(family, tmp_path):
    base = tiny_model(family).eval()
    expanded, _ = expand_model(base, GROWN_NEW, sources=GROWN_SOURCES)
    expanded.config.new_expert_prior = 0.0
    expanded.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = token_ids(seed=2)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(base, ids), atol=1e-6, rtol=0)
    assert all(bool((index < 8).all()) for index, _ in routing_of(reloaded, ids).values())


@pytest.mark.parametrize("prior", [0.0, 0.3, 1.0])
def test_the_new_expert_prior_scales_the_new_experts_softmax_mass(prior):
    base = tiny_model("olmoe").eval()
    expanded, _ = expand_model(base, GROWN_NEW, sources=GROWN_SOURCES)
    router = expanded.model.layers[0].mlp.gate
    router.new_expert_prior = prior
    with torch.no_grad():  # copied rows tie with their sources; break the ties so the top-k is unique
        router.weight[8:] += 0.1 * torch.randn(router.weight[8:].shape, generator=torch.Generator().manual_seed(5))
    hidden = torch.randn(5, expanded.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, weights, index = router(hidden)
        raw = (hidden.double() @ router.weight.double().T).exp()
    # unnormalised probabilities: exp(logit) for the 8 original experts, prior x exp(logit) for the new
    raw[:, 8:] *= prior
    probs = raw / raw.sum(dim=-1, keepdim=True)
    expected_weights, expected_index = probs.topk(router.top_k, dim=-1)
    if router.norm_topk_prob:
        expected_weights = expected_weights / expected_weights.sum(dim=-1, keepdim=True)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(weights.double(), expected_weights, atol=1e-6, rtol=0)
    assert torch.isfinite(logits).all()


def test_random_sources_are_seeded_and_inside_the_layer():
    base = tiny_model("olmoe").eval()
    _, first = expand_model(base, [5, 2], seed=7)
    _, again = expand_model(base, [5, 2], seed=7)
    assert first["sources"] == again["sources"]
    assert [len(first["sources"][k]) for k in ("0", "1")] == [5, 2]
    assert all(0 <= e < 8 for s in first["sources"].values() for e in s)


def test_most_used_experts_ranks_by_count_ties_to_lower_id_and_cycles():
    counts = [3, 9, 9, 1, 0]
    assert most_used_experts(counts, 2) == [1, 2]
    assert most_used_experts(np.array(counts, dtype=np.int64), 7) == [1, 2, 0, 3, 4, 1, 2]
    assert most_used_experts([0.5, 0.5], 3) == [0, 1, 0]
    assert most_used_experts(counts, 0) == []


# --------------------------------------------------------------------------------------------------
# 4. Router classifier
# --------------------------------------------------------------------------------------------------

def test_upcycled_classifier_sends_an_old_sequence_to_expert_zero_only():
    base = dense_base()
    expanded, _ = expand_model(base, DENSE_NEW, classifier_layers=[1, 2, 3], noise=0.5)
    ids = token_ids(seed=2)
    force_classes(expanded, ids, [0, 1])
    seq = ids.shape[1]
    inputs = mlp_inputs(expanded, ids)
    routing = routing_of(expanded, ids)
    assert sorted(routing) == [1, 2, 3]
    new_used = False
    for i, (index, weights) in routing.items():
        old_index, old_weights = index[:seq], weights[:seq]  # sequence 0: called old
        weight_on = torch.zeros(seq, 4).scatter_add_(1, old_index, old_weights)
        assert torch.equal(weight_on[:, 0], torch.ones(seq)) and not weight_on[:, 1:].any()
        # sequence 1, called new: normal top-2 over all experts, from the router applied by hand
        logits = inputs[i][1] @ expanded.model.layers[i].mlp.gate.weight.T
        expect_weights, expect_index = reference_top_k(logits, 2, True)
        assert torch.equal(index[seq:], expect_index)
        torch.testing.assert_close(weights[seq:].double(), expect_weights, atol=1e-6, rtol=0)
        new_used |= bool((index[seq:] > 0).any())
    assert new_used
    # every upcycled layer has a classifier: the old sequence computes exactly what the dense model does
    out, dense = logits_of(expanded, ids), logits_of(base, ids)
    torch.testing.assert_close(out[0], dense[0], atol=1e-5, rtol=0)
    assert not torch.allclose(out[1], dense[1], atol=1e-3)


def test_grown_classifier_keeps_an_old_sequence_on_the_original_experts():
    base = tiny_model("olmoe").eval()
    expanded, _ = expand_model(base, GROWN_NEW, sources=GROWN_SOURCES, classifier_layers=[1])
    ids = token_ids(seed=3)
    seq = ids.shape[1]
    # make the new experts attractive, so that only the classifier keeps the old sequence off them
    inputs = mlp_inputs(expanded, ids)
    gate = expanded.model.layers[1].mlp.gate
    gate.weight.data[8:] = inputs[1].reshape(-1, inputs[1].shape[-1]).mean(0) * 5.0
    force_classes(expanded, ids, [1, 0])
    inputs = mlp_inputs(expanded, ids)
    index, weights = routing_of(expanded, ids)[1]
    logits = inputs[1].reshape(-1, inputs[1].shape[-1]) @ gate.weight.T  # [2 * seq, 9]
    # sequence 0 (new): top-2 over all 9 experts; olmoe does not renormalise the top-k weights
    expect_weights, expect_index = reference_top_k(logits[:seq], 2, False)
    assert torch.equal(index[:seq], expect_index) and bool((index[:seq] == 8).any())
    torch.testing.assert_close(weights[:seq].double(), expect_weights, atol=1e-6, rtol=0)
    # sequence 1 (old): top-2 among the 8 original experts, as the base router would choose
    expect_weights, expect_index = reference_top_k(logits[seq:, :8], 2, False)
    assert torch.equal(index[seq:], expect_index) and bool((index[seq:] < 8).all())
    torch.testing.assert_close(weights[seq:].double(), expect_weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling,decision", [("sum", "sequence"), ("mean", "sequence"), ("mean", "causal"),
                                              ("sum", "causal")])
def test_classifier_logits_pool_as_documented_and_router_logits_cover_every_token(pooling, decision):
    expanded, _ = expand_model(dense_base(), DENSE_NEW)
    add_classifiers(expanded, [2, 3], pooling=pooling, decision=decision)
    ids = token_ids(seed=4, batch=3, seq=7)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # padding: the authors' sum counts it, the mean leaves it out
    inputs = mlp_inputs(expanded, ids, attention_mask=mask)
    with torch.no_grad():
        out = expanded(input_ids=ids, attention_mask=mask, output_classifier_logits=True, output_router_logits=True)
    assert len(out.classifier_logits) == 2
    for logits, layer in zip(out.classifier_logits, (2, 3)):
        weight = expanded.model.layers[layer].mlp.classifier.weight
        expect = pooled_by_hand(inputs[layer], pooling, decision, mask) @ weight.double().T
        assert logits.shape == ((3, 2) if decision == "sequence" else (3, 7, 2))
        torch.testing.assert_close(logits.double(), expect, atol=1e-5, rtol=1e-5)
    assert [tuple(r.shape) for r in out.router_logits] == [(21, 2), (21, 3), (21, 4)]
    for logits, layer in zip(out.router_logits, (1, 2, 3)):
        expect = inputs[layer].reshape(-1, inputs[layer].shape[-1]) @ expanded.model.layers[layer].mlp.gate.weight.T
        torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = expanded(input_ids=ids, attention_mask=mask)
    assert plain.classifier_logits is None and plain.router_logits is None


def flipping_classifier(model, layer: int, ids_a, ids_b, pooling: str) -> None:
    """A classifier weight at ``layer`` under which the whole-sequence pools of ``ids_a`` and
    ``ids_b`` (one row each) get different classes: w orthogonal to their midpoint, along their
    difference, so w.p_a < 0 < w.p_b."""
    pools = [pooled_by_hand(mlp_inputs(model, ids)[layer], pooling, "sequence")[0] for ids in (ids_a, ids_b)]
    diff, mid = pools[1] - pools[0], (pools[0] + pools[1]) / 2
    w = diff - (diff @ mid) / (mid @ mid) * mid
    w = w / w.norm() * 50
    model.model.layers[layer].mlp.classifier.weight.data.copy_(torch.stack([-w, w]).float())


@pytest.mark.parametrize("family", ["llama", "olmoe"])
def test_causal_scores_see_neither_later_tokens_nor_other_rows(family):
    # noise: the new experts differ from their sources, so a classifier's decision changes the output
    expanded = (expand_model(dense_base(family), DENSE_NEW, noise=0.5)[0] if family in DENSE else
                expand_model(tiny_model(family).eval(), GROWN_NEW, sources=GROWN_SOURCES, noise=0.5)[0])
    layer = 3 if family == "llama" else 1
    add_classifiers(expanded, [layer], pooling="mean", decision="causal")
    ids = token_ids(seed=11, batch=1, seq=12)
    if family not in DENSE:  # make the grown layer's new expert attractive, so the classifier's choice matters
        gate = expanded.model.layers[layer].mlp.gate
        gate.weight.data[8:] = mlp_inputs(expanded, ids)[layer].reshape(-1, gate.weight.shape[1]).mean(0) * 5.0
    changed = ids.clone()
    changed[0, 6:] = token_ids(seed=12, batch=1, seq=6)[0]  # the same first 6 tokens, another future
    flipping_classifier(expanded, layer, ids, changed, "mean")
    base, other = logits_of(expanded, ids), logits_of(expanded, changed)
    torch.testing.assert_close(base[0, :6], other[0, :6], atol=1e-5, rtol=0)
    # in a right-padded batch beside a longer and a shorter row, the row's real positions score the same
    batch = torch.cat([torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1), token_ids(seed=13, batch=1, seq=16),
                       torch.cat([ids[:, :5], torch.zeros(1, 11, dtype=ids.dtype)], 1)])
    mask = torch.tensor([[1] * 12 + [0] * 4, [1] * 16, [1] * 5 + [0] * 11])
    batched = logits_of(expanded, batch, attention_mask=mask)
    torch.testing.assert_close(batched[0, :12], base[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[2, :5], base[0, :5], atol=1e-5, rtol=0)
    # the authors' whole-sequence decision does see the future: the same check fails for it
    add_classifiers(expanded, [layer], pooling="sum", decision="sequence")
    flipping_classifier(expanded, layer, ids, changed, "sum")
    base, other = logits_of(expanded, ids), logits_of(expanded, changed)
    assert not torch.allclose(base[0, :6], other[0, :6], atol=1e-3)


def test_add_classifiers_adds_and_removes_and_the_config_follows(tmp_path):
    expanded, _ = expand_model(dense_base(), DENSE_NEW)
    ids = token_ids(seed=5)
    logits_of(expanded, ids)  # a forward first: the output recorders are installed by then
    add_classifiers(expanded, [1, 3], seed=1)
    assert expanded.config.classifier_layers == [1, 3]
    assert [getattr(layer.mlp, "classifier", None) is not None for layer in expanded.model.layers] == [False, True,
                                                                                                     False, True]
    with torch.no_grad():
        out = expanded(input_ids=ids, output_classifier_logits=True)
    assert out.classifier_logits is not None and len(out.classifier_logits) == 2
    add_classifiers(expanded, [2], seed=1)
    assert expanded.config.classifier_layers == [2]
    assert [getattr(layer.mlp, "classifier", None) is not None for layer in expanded.model.layers] == [False, False,
                                                                                                     True, False]
    with torch.no_grad():
        out = expanded(input_ids=ids, output_classifier_logits=True)
    assert len(out.classifier_logits) == 1
    expanded.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.classifier_layers == [2]
    assert torch.equal(reloaded.model.layers[2].mlp.classifier.weight, expanded.model.layers[2].mlp.classifier.weight)
    assert reloaded.model.layers[1].mlp.classifier is None
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(expanded, ids), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# 5. Load balancing
# --------------------------------------------------------------------------------------------------

def balance_by_hand(router_logits, top_k, mask=None) -> float:
    """Per layer N * sum_e f_e P_e over the valid tokens, with a loop over tokens; mean over layers."""
    losses = []
    for logits in router_logits:
        logits = logits.double()
        tokens, n = logits.shape
        valid = [t for t in range(tokens) if mask is None or mask.reshape(-1)[t]]
        k = min(top_k, n)
        chosen = np.zeros(n)
        probs = np.zeros(n)
        for t in valid:
            p = torch.softmax(logits[t], dim=0).numpy()
            for e in np.argsort(-p, kind="stable")[:k]:
                chosen[e] += 1
            probs += p
        losses.append(n * float((chosen / len(valid) * probs / len(valid)).sum()))
    return float(np.mean(losses))


def test_load_balancing_loss_per_layer_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(12, n, generator=generator) for n in (2, 3, 5)]
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    for top_k in (1, 2, 4):
        assert float(load_balancing_loss(logits, top_k)) == pytest.approx(balance_by_hand(logits, top_k), rel=1e-6)
        assert float(load_balancing_loss(logits, top_k, mask)) == pytest.approx(balance_by_hand(logits, top_k, mask),
                                                                                rel=1e-6)
    # one layer: transformers' Mixtral function agrees; a balanced router gives k
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    mixtral = float(load_balancing_loss_func((logits[2],), 5, 2))
    assert float(load_balancing_loss(logits[2:], 2)) == pytest.approx(mixtral, rel=1e-6)
    assert float(load_balancing_loss([torch.zeros(8, 4)], 2)) == pytest.approx(2.0)


def test_model_aux_loss_and_loss_are_lm_plus_coefficient_times_balance():
    expanded, _ = expand_model(dense_base(), DENSE_NEW)
    ids = token_ids(seed=6)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = expanded(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        plain = expanded(input_ids=ids, attention_mask=mask, labels=labels)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).double(),
                         labels[:, 1:].reshape(-1), ignore_index=-100)
    aux = balance_by_hand(out.router_logits, 2, mask)
    assert float(out.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert expanded.config.router_aux_loss_coef == 0.01
    assert float(out.loss) == pytest.approx(float(lm) + 0.01 * aux, rel=1e-5)
    assert plain.aux_loss is None and float(plain.loss) == pytest.approx(float(lm), rel=1e-5)


def test_balance_loss_of_a_cached_step_masks_only_the_new_tokens():
    expanded, _ = expand_model(dense_base(), DENSE_NEW)
    ids = token_ids(seed=11, seq=6)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        prefill = expanded(input_ids=ids, attention_mask=mask[:, :6], use_cache=True)
        step = expanded(input_ids=token_ids(seed=12, seq=2), attention_mask=mask,
                        past_key_values=prefill.past_key_values, output_router_logits=True)
    # the mask spans the cache; the router logits cover the 2 new tokens of each sequence
    assert [tuple(r.shape) for r in step.router_logits] == [(4, 2), (4, 3), (4, 4)]
    assert float(step.aux_loss) == pytest.approx(balance_by_hand(step.router_logits, 2, mask[:, 6:]), rel=1e-6)
    expanded.config.output_router_logits = True  # e.g. saved by a training stage: generation still works
    with torch.no_grad():
        out = expanded.generate(ids, attention_mask=mask[:, :6], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


# --------------------------------------------------------------------------------------------------
# 6. The rest of the pipeline
# --------------------------------------------------------------------------------------------------

def test_adapter_and_parameter_count_see_each_layers_experts():
    expanded, _ = expand_model(dense_base(), DENSE_NEW, classifier_layers=[3])
    adapter = ModelAdapter(expanded)
    assert adapter.is_moe and adapter.experts_per_layer == {1: 2, 2: 3, 3: 4}
    assert [layer.top_k for layer in adapter.moe_layers] == [2, 2, 2]
    assert [layer.expert_width for layer in adapter.moe_layers] == [48, 48, 48]
    counted = count_parameters(config=expanded.config)
    assert counted["total"] == sum(p.numel() for p in expanded.parameters())
    assert counted["experts_per_layer"] == [2, 3, 4] and counted["num_experts"] is None
    assert counted["per_expert"] == 3 * 32 * 48
    grown, _ = expand_model(tiny_model("qwen2_moe").eval(), GROWN_NEW, sources=GROWN_SOURCES)
    assert ModelAdapter(grown).experts_per_layer == {0: 11, 1: 9}
    counted = count_parameters(config=grown.config)
    assert counted["total"] == sum(p.numel() for p in grown.parameters()) and counted["experts_per_layer"] == [11, 9]


def test_routing_profile_of_a_saved_expanded_model_counts_its_new_experts(tmp_path):
    from moelang.routing import profile_model
    from test_train import write_tokens

    expanded, _ = expand_model(dense_base(), DENSE_NEW, noise=0.1)
    expanded.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 97, rng.integers(4, 15)).tolist() for _ in range(12)]
    tokens = {"xx": write_tokens(tmp_path / "xx.parquet", docs, splits=["dev"] * len(docs))}
    options = {"seq_len": 16, "batch_tokens": 64, "tokens_per_language": None, "device": "cpu"}
    profile_model(tmp_path / "m", tokens, options, tmp_path / "routing", "m", 0)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "routing" / "xx.parquet").to_pylist()
    assert [(r["layer"], r["expert"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2),
                                                         (3, 0), (3, 1), (3, 2), (3, 3)]
    # by hand: each document alone through the model, top-2 of each layer's router logits
    expect = {(i, e): 0 for i in (1, 2, 3) for e in range(i + 1)}
    for doc in docs:
        with torch.no_grad():
            out = expanded(input_ids=torch.tensor([doc]), output_router_logits=True)
        for i, logits in zip((1, 2, 3), out.router_logits):
            for e in logits.topk(2, dim=-1).indices.reshape(-1).tolist():
                expect[(i, e)] += 1
    assert {(r["layer"], r["expert"]): r["count"] for r in rows} == expect
    assert all(r["n_tokens"] == sum(map(len, docs)) for r in rows)
    assert all(expect[(3, e)] > 0 for e in (1, 2, 3))  # the new experts are used


def test_similarity_capture_sees_every_layer_of_an_upcycled_model():
    from moelang.similarity import layer_experts, token_unit_means

    base = dense_base()
    expanded, _ = expand_model(base, DENSE_NEW)
    ids = token_ids(seed=7, batch=3)
    mask = torch.ones_like(ids)
    mask[2, :6] = 0
    batches = [(ids, mask)]
    means, count = token_unit_means(ModelAdapter(expanded), batches, "expanded")
    base_means, base_count = token_unit_means(ModelAdapter(base), batches, "base")
    assert layer_experts(ModelAdapter(expanded)) == [1, 2, 3, 4]
    assert means.shape == (4, 32) and count == base_count == int(mask.sum())
    # the upcycled model's MLP inputs are the dense model's
    torch.testing.assert_close(means, base_means, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "olmoe"])
def test_generate_with_a_kv_cache(family):
    expanded = expanded_of(family)
    ids = token_ids(seed=8, seq=5)
    with torch.no_grad():
        cached = expanded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = expanded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 11) and torch.equal(cached[:, :5], ids)
    assert torch.equal(cached, uncached)
    add_classifiers(expanded, [3] if family == "llama" else [1])
    for layer in expanded.config.classifier_layers:  # large weights: decisions change along the sequence
        weight = expanded.model.layers[layer].mlp.classifier.weight
        weight.data.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 20)
    with torch.no_grad():
        classified = expanded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True)
        again = expanded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        whole = expanded(input_ids=classified.sequences).logits
    # causal decisions carried over the cache: generating step by step is one forward over the text
    assert classified.sequences.shape == (2, 11) and torch.equal(classified.sequences, again)
    torch.testing.assert_close(torch.stack(classified.logits, 1), whole[:, 4:10], atol=1e-4, rtol=0)


def test_split_experts_of_an_upcycled_layer():
    expanded, _ = expand_model(dense_base(), DENSE_NEW, noise=0.3)
    reference, _ = expand_model(dense_base(), DENSE_NEW, noise=0.3)
    ids = token_ids(seed=9)
    expanded.requires_grad_(False)
    layer = ModelAdapter(expanded).moe_layer(3)
    chosen = split_experts(layer, [1, 3])
    assert [n for n, p in expanded.named_parameters() if p.requires_grad] == [
        "model.layers.3.mlp.experts.chosen.gate_up_proj", "model.layers.3.mlp.experts.chosen.down_proj"]
    out = expanded(input_ids=ids, labels=ids)
    ref = reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    out.loss.backward()
    ref.loss.backward()
    experts = reference.model.layers[3].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        grad = getattr(chosen, name).grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, getattr(experts, name).grad[[1, 3]], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for n, p in expanded.named_parameters() if ".chosen." not in n)


def test_expanding_an_expanded_model():
    first, _ = expand_model(dense_base(), DENSE_NEW, classifier_layers=[2, 3], noise=0.2)
    second, record = expand_model(first, [1, 1, 0, 2], sources={1: [1], 3: [3, 0]})
    assert second.config.model_type == "layermoe_llama" and second.config.expanded_from == "llama"
    assert second.config.num_experts_per_layer == [2, 3, 3, 6]
    assert second.config.num_original_experts == record["original_experts_per_layer"] == [1, 2, 3, 4]
    assert second.config.classifier_layers == [] and all(
        getattr(layer.mlp, "classifier", None) is None for layer in second.model.layers)
    for i in (1, 2, 3):
        old, new = first.model.layers[i].mlp, second.model.layers[i].mlp
        ids = list(range(i + 1)) + {1: [1], 2: [], 3: [3, 0]}[i]
        for e, source in enumerate(ids):
            assert torch.equal(new.gate.weight[e], old.gate.weight[source])
            for name in ("gate_up_proj", "down_proj"):
                assert torch.equal(getattr(new.experts, name)[e], getattr(old.experts, name)[source])
    # layer 0 was dense: upcycled now, its FFN as expert 0
    ffn = first.model.layers[0].mlp
    assert torch.equal(second.model.layers[0].mlp.experts.down_proj[1], ffn.down_proj.weight)
    # restricted to its original experts everywhere, it computes the first expansion without classifiers
    add_classifiers(first, [])
    add_classifiers(second, [0, 1, 2, 3])
    ids = token_ids(seed=10)
    force_classes(second, ids, [0, 0])
    torch.testing.assert_close(logits_of(second, ids), logits_of(first, ids), atol=1e-5, rtol=0)


def test_expanding_a_grown_model():
    first, _ = expand_model(tiny_model("olmoe").eval(), GROWN_NEW, sources=GROWN_SOURCES, classifier_layers=[1])
    second, _ = expand_model(first, [1, 2], sources={0: [9], 1: [8, 0]})  # a source may be a first-round expert
    assert second.config.num_experts_per_layer == [12, 11] and second.config.num_original_experts == [11, 9]
    assert second.config.classifier_layers == [] and second.config.expanded_from == "olmoe"
    for i, extra in enumerate(([9], [8, 0])):
        old, new = first.model.layers[i].mlp, second.model.layers[i].mlp
        for e, source in enumerate(list(range(old.gate.num_experts)) + extra):
            assert torch.equal(new.gate.weight[e], old.gate.weight[source])
            assert torch.equal(new.experts.down_proj[e], old.experts.down_proj[source])
    add_classifiers(first, [])
    add_classifiers(second, [0, 1])
    ids = token_ids(seed=13)
    force_classes(second, ids, [0, 0])
    torch.testing.assert_close(logits_of(second, ids), logits_of(first, ids), atol=1e-5, rtol=0)


def test_tied_embeddings_stay_tied(tmp_path):
    base = tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=True).eval()  # as Llama-3.2-3B
    expanded, _ = expand_model(base, DENSE_NEW)
    assert expanded.lm_head.weight is expanded.model.embed_tokens.weight
    expanded.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = token_ids()
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(base, ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# 7. Bad input
# --------------------------------------------------------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_plans_fail_with_one_line_naming_the_fix():
    base = dense_base()
    with pytest.raises(MoelangError) as excinfo:
        expand_model(base, [1, 2, 3])
    assert "3 layers" in one_line(excinfo) and "4" in one_line(excinfo) and "plan" in one_line(excinfo)
    with pytest.raises(MoelangError) as excinfo:
        expand_model(base, [1, -1, 0, 2])
    assert "[1]" in one_line(excinfo) and "negative" in one_line(excinfo) and "0 or more" in one_line(excinfo)
    for layers in ([4], [-1], [0]):  # out of range; layer 0 gets no new expert
        with pytest.raises(MoelangError) as excinfo:
            expand_model(base, [0, 1, 1, 1], classifier_layers=layers)
        assert str(layers) in one_line(excinfo) and "choose among" in one_line(excinfo)
    expanded, _ = expand_model(base, [0, 1, 1, 1])
    with pytest.raises(MoelangError) as excinfo:
        add_classifiers(expanded, [0])
    assert "[0]" in one_line(excinfo)
    with pytest.raises(MoelangError) as excinfo:
        add_classifiers(base, [1])
    assert "expanded models" in one_line(excinfo)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_a_family_without_an_expansion_class_fails(family):
    with pytest.raises(MoelangError) as excinfo:
        expand_model(tiny_model(family), [1] * tiny_model(family).config.num_hidden_layers)
    message = one_line(excinfo)
    assert f"'{family}'" in message and all(base in message for base in EXPANDED)


def test_bad_sources_fail_with_one_line():
    base = tiny_model("olmoe").eval()
    for sources, layer in (({0: [8, 0, 1], 1: [0]}, 0), ({0: [0, 1], 1: [0]}, 0), ({0: [0, 1, 2], 1: [-1]}, 1)):
        with pytest.raises(MoelangError) as excinfo:
            expand_model(base, GROWN_NEW, sources=sources)
        assert f"layer {layer}" in one_line(excinfo) and "0..7" in one_line(excinfo)
    with pytest.raises(MoelangError) as excinfo:  # a layer that does not exist
        expand_model(base, GROWN_NEW, sources={0: [0, 1, 2], 1: [0], 5: [1]})
    assert "5" in one_line(excinfo)


def test_a_partly_dense_moe_base_fails():
    base = tiny_model("qwen2_moe", decoder_sparse_step=2)
    with pytest.raises(MoelangError) as excinfo:
        expand_model(base, [1, 1])
    assert "decoder_sparse_step" in one_line(excinfo)

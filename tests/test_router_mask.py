"""The router mask of expert fine-tuning (moelang.models.router_mask), per MoE family.

The expected routing is computed independently of the module: from the *unmasked* router logits of
the layer's captured MLP input, in float64, by each family's rule applied to the chosen experts
alone (as if the others did not exist), and compared as dense [tokens, experts] weight tables, so
that the order of the top-k slots does not matter.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from families import MOE_FAMILIES, tiny_model
from moelang.errors import MoelangError
from moelang.models import ModelAdapter
from moelang.models.methods import ExpertSubset
from moelang.models.router_mask import MASKED_ROUTING, router_mask

SOFTMAX_FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
CHOSEN = [0, 1, 2, 4, 6]  # DeepSeek-V3's tiny config: groups {0,1} {2,3} {4,5} {6,7}; its groups matter here


def random_batch(model, seed=0, batch=3, seq=11):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)


def family_model(family, seed=0):
    """A tiny model; DeepSeek-V3 with a random correction bias, so that grouped selection departs
    from the plain order of the scores."""
    model = tiny_model(family, seed=seed)
    if family == "deepseek_v3":
        generator = torch.Generator().manual_seed(seed + 7)
        for layer in ModelAdapter(model).moe_layers:
            layer.router.e_score_correction_bias.copy_(torch.randn(layer.num_experts, generator=generator) * 0.5)
    return model


def run(model, adapter, batch, backward=False):
    """Forward (and backward) over ``batch``: the routing each MoE layer used, its MLP inputs, the output."""
    routing, inputs = {}, {}
    with adapter.record_routing(lambda i, idx, w: routing.__setitem__(i, (idx.detach().clone(), w.detach().clone()))), \
            adapter.capture_mlp_inputs(lambda i, h: inputs.__setitem__(i, h.detach().clone()),
                                       layers=[layer.index for layer in adapter.moe_layers]):
        out = model(input_ids=batch, labels=batch)
        if backward:
            out.loss.backward()
    return routing, inputs, out


def dense(index, weights, num_experts):
    """Top-k slots as a [tokens, experts] table of weights (float64)."""
    table = torch.zeros(index.shape[0], num_experts, dtype=torch.float64)
    return table.scatter_add_(1, index, weights.double())


def expected_weights(family, router, hidden, chosen, grouped=True):
    """Independent reference: the family's routing over ``chosen`` alone, from the unmasked logits
    (float64), as a [tokens, experts] table. ``grouped=False``: DeepSeek-V3 without its groups."""
    hidden = hidden.reshape(-1, hidden.shape[-1]).double()
    logits = hidden @ router.weight.detach().double().T
    if family == "gpt_oss":
        logits = logits + router.bias.detach().double()
    num_tokens, num_experts = logits.shape
    ids = torch.tensor(chosen)
    k = min(router.top_k, len(chosen))
    table = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    if family in SOFTMAX_FAMILIES:
        probs = torch.softmax(logits[:, ids], dim=-1)  # softmax over the chosen subset
        top = probs.topk(k, dim=-1)
        weights = top.values
        if family == "mixtral" or router.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return table.scatter_(1, ids[top.indices], weights)
    if family == "gpt_oss":
        top = logits[:, ids].topk(k, dim=-1)  # top-k of the chosen logits, softmax over those k
        return table.scatter_(1, ids[top.indices], torch.softmax(top.values, dim=-1))
    assert family == "deepseek_v3"
    scores = torch.sigmoid(logits)
    choice = scores + router.e_score_correction_bias.double()
    group_size = num_experts // router.num_group
    for t in range(num_tokens):
        members: dict[int, list[int]] = {}
        for e in chosen:
            members.setdefault(e // group_size, []).append(e)
        if grouped:  # a group's score: its best two chosen experts (one if it holds one)
            group_score = {g: sum(sorted((float(choice[t, e]) for e in m), reverse=True)[:2]) for g, m in members.items()}
            kept = sorted(group_score, key=lambda g: -group_score[g])[:router.topk_group]
            candidates = [e for g in kept for e in members[g]]
        else:
            candidates = list(chosen)
        picked = sorted(candidates, key=lambda e: -float(choice[t, e]))[:router.top_k]
        weights = scores[t, picked]
        if router.norm_topk_prob:
            weights = weights / (weights.sum() + 1e-20)
        table[t, picked] = weights * router.routed_scaling_factor
    return table


def plain_routing(router, hidden):
    """The router class's own forward (no mask) on ``hidden``."""
    _, weights, index = type(router).forward(router, hidden.reshape(-1, hidden.shape[-1]))
    return index, weights


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_training_routing_uses_only_chosen_experts_with_weights_renormalised_over_them(family):
    model = family_model(family).train()
    adapter = ModelAdapter(model)
    masked, *others = adapter.moe_layers
    batch = random_batch(model)
    norms = (False, True) if hasattr(masked.router, "norm_topk_prob") else (None,)
    grouping_bites = False
    for norm in norms:
        if norm is not None:
            for layer in adapter.moe_layers:
                layer.router.norm_topk_prob = norm
        with router_mask(adapter, {masked.index: CHOSEN}):
            routing, inputs, out = run(model, adapter, batch)
        index, weights = routing[masked.index]
        assert set(index.unique().tolist()) <= set(CHOSEN)
        expected = expected_weights(family, masked.router, inputs[masked.index], CHOSEN)
        torch.testing.assert_close(dense(index, weights, masked.num_experts), expected, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(out.loss)
        # the other MoE layers (after the masked one: their input changed) route as their router's own forward
        assert others
        for layer in others:
            expect_index, expect_weights = plain_routing(layer.router, inputs[layer.index])
            assert torch.equal(routing[layer.index][0], expect_index)
            assert torch.equal(routing[layer.index][1], expect_weights)
        if family == "deepseek_v3":
            ungrouped = expected_weights(family, masked.router, inputs[masked.index], CHOSEN, grouped=False)
            grouping_bites |= not torch.allclose(expected, ungrouped)
    if family == "deepseek_v3":  # the groups decided some tokens: the test saw grouped selection under the mask
        assert grouping_bites


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_chosen_set_smaller_than_top_k_leaves_the_extra_slots_at_weight_zero(family):
    model = family_model(family).train()
    adapter = ModelAdapter(model)
    masked = adapter.moe_layers[-1]
    assert masked.top_k == 2
    with router_mask(adapter, {masked.index: [3]}):
        routing, inputs, out = run(model, adapter, random_batch(model), backward=True)
    index, weights = routing[masked.index]
    is_chosen = index == 3
    assert torch.equal(is_chosen.sum(dim=-1), torch.ones(index.shape[0], dtype=torch.long))  # every token: once
    assert torch.equal(weights[~is_chosen], torch.zeros_like(weights[~is_chosen]))  # exactly 0, not NaN
    expected = expected_weights(family, masked.router, inputs[masked.index], [3])
    torch.testing.assert_close(dense(index, weights, masked.num_experts), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_all_experts_chosen_is_the_familys_own_routing_bit_for_bit(family, bf16):
    # the mask's re-statement of each family's router equals the installed transformers code, also
    # in the dtypes of bf16 autocast (the engine's bf16 training)
    model = family_model(family).train()
    adapter = ModelAdapter(model)
    batch = random_batch(model, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        plain, _, plain_out = run(model, adapter, batch)
        with router_mask(adapter, {layer.index: list(range(layer.num_experts)) for layer in adapter.moe_layers}):
            masked, _, masked_out = run(model, adapter, batch)
    for layer in adapter.moe_layers:
        assert torch.equal(plain[layer.index][0], masked[layer.index][0])
        assert torch.equal(plain[layer.index][1], masked[layer.index][1])
    assert torch.equal(plain_out.logits, masked_out.logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_eval_mode_routing_is_the_unmasked_routing(family):
    model = family_model(family).eval()
    adapter = ModelAdapter(model)
    batch = random_batch(model, seed=2)
    experts = {layer.index: [3] for layer in adapter.moe_layers}
    with torch.no_grad():
        plain, _, plain_out = run(model, adapter, batch)
        with router_mask(adapter, experts):
            masked, _, masked_out = run(model, adapter, batch)
            model.train()  # the mask acts the moment the model trains, inside the same block
            trained, _, _ = run(model, adapter, batch)
    for layer in adapter.moe_layers:
        assert torch.equal(plain[layer.index][0], masked[layer.index][0])
        assert torch.equal(plain[layer.index][1], masked[layer.index][1])
        assert not set(plain[layer.index][0].unique().tolist()) <= {3}  # unmasked routing uses other experts
        assert torch.equal(trained[layer.index][1][trained[layer.index][0] != 3].abs().sum(), torch.tensor(0.0))
    assert torch.equal(plain_out.logits, masked_out.logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_nothing_is_left_after_the_context(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = family_model(family)
    adapter = ModelAdapter(model)
    batch = random_batch(model, seed=3)
    routers = [layer.router for layer in adapter.moe_layers]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        original = model.eval()(input_ids=batch).logits
        plain_training = run(model.train(), adapter, batch)[0]
    experts = {layer.index: CHOSEN for layer in adapter.moe_layers}
    with router_mask(adapter, experts):
        run(model, adapter, batch, backward=True)
    with pytest.raises(RuntimeError, match="inside"), router_mask(adapter, experts):
        raise RuntimeError("an error inside the block")  # the routers are restored on the way out too
    for router in routers:
        assert "forward" not in router.__dict__ and "_old_forward" not in router.__dict__
        assert not router._forward_hooks and not router._forward_pre_hooks
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)  # no buffer, no weight
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=batch).logits, original)
        again = run(model.train(), adapter, batch)[0]
    assert all(torch.equal(again[i][0], plain_training[i][0]) and torch.equal(again[i][1], plain_training[i][1])
               for i in plain_training)  # training routing is unmasked again
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, original)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gradients_reach_the_chosen_router_rows_only(family):
    model = family_model(family).train()
    adapter = ModelAdapter(model)
    masked = adapter.moe_layers[-1]
    params = [masked.router.weight] + ([masked.router.bias] if family == "gpt_oss" else [])
    not_chosen = [e for e in range(masked.num_experts) if e not in CHOSEN]
    batch = random_batch(model, seed=4)
    run(model, adapter, batch, backward=True)
    unmasked_grads = [p.grad[not_chosen].clone() for p in params]
    assert any(g.abs().sum() > 0 for g in unmasked_grads)  # without the mask the other rows learn too
    model.zero_grad(set_to_none=True)
    with router_mask(adapter, {masked.index: CHOSEN}):
        run(model, adapter, batch, backward=True)
    for param in params:
        assert torch.isfinite(param.grad).all()
        assert param.grad[CHOSEN].abs().sum() > 0
        assert torch.equal(param.grad[not_chosen], torch.zeros_like(param.grad[not_chosen]))


def test_deepseek_masked_expert_with_a_huge_correction_bias_is_never_selected():
    model = family_model("deepseek_v3").train()
    adapter = ModelAdapter(model)
    masked = adapter.moe_layers[-1]
    chosen = [0, 1, 4, 6]
    pushed = [2, 3, 7]  # non-chosen: a whole group ({2, 3}) and one beside a chosen expert ({6, 7})
    masked.router.e_score_correction_bias[pushed] = 1e4
    batch = random_batch(model, seed=5)
    plain = run(model, adapter, batch)[0][masked.index][0]
    assert set(plain.unique().tolist()) <= set(pushed)  # unmasked, the bias wins every slot
    with router_mask(adapter, {masked.index: chosen}):
        routing, inputs, _ = run(model, adapter, batch)
    index, weights = routing[masked.index]
    assert set(index.unique().tolist()) <= set(chosen)
    expected = expected_weights("deepseek_v3", masked.router, inputs[masked.index], chosen)
    torch.testing.assert_close(dense(index, weights, masked.num_experts), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input: one line, before any router changes
def assert_one_line_and_untouched(error, adapter):
    assert "\n" not in str(error.value)
    assert all("forward" not in layer.router.__dict__ for layer in adapter.moe_layers)


def test_bad_masks_are_refused_in_one_line():
    model = family_model("deepseek_v3")
    adapter = ModelAdapter(model)
    last = adapter.moe_layers[-1].index
    cases = [({0: [1]}, "layer 0 of this deepseek_v3 model is not an MoE layer"),
             ({last: [1], 1: []}, "layer 1 has no chosen expert"),
             ({last: [1, 8]}, r"layer 2 has experts 0..7; \[8\] do not exist")]
    for experts, message in cases:
        with pytest.raises(MoelangError, match=message) as error, router_mask(adapter, experts):
            pass
        assert_one_line_and_untouched(error, adapter)
    with router_mask(adapter, {last: [1]}):
        with pytest.raises(MoelangError, match="already masked") as error, router_mask(adapter, {last: [2]}):
            pass
        assert "\n" not in str(error.value)
        assert "forward" in adapter.moe_layer(last).router.__dict__  # the outer mask is still there
    assert "forward" not in adapter.moe_layer(last).router.__dict__


def test_a_router_the_mask_does_not_know_is_refused_naming_the_family():
    model = family_model("olmoe")
    adapter = ModelAdapter(model)
    layer = adapter.moe_layers[-1]

    class RemoteCodeRouter(torch.nn.Module):  # e.g. a trust_remote_code router of another design
        forward = type(layer.router).forward

    layer.router.__class__ = RemoteCodeRouter
    with pytest.raises(MoelangError, match="RemoteCodeRouter, not the olmoe family's OlmoeTopKRouter") as error, \
            router_mask(adapter, {layer.index: [1, 2]}):
        pass
    assert_one_line_and_untouched(error, adapter)


def test_a_family_without_masked_routing_is_refused_in_one_line(monkeypatch):
    monkeypatch.delitem(MASKED_ROUTING, "mixtral")
    model = family_model("mixtral")
    adapter = ModelAdapter(model)
    method = ExpertSubset(experts={1: [0, 6]}, routers=[1], mask_router=True)
    with pytest.raises(MoelangError, match="router mask: the mixtral family is not supported") as error:
        method.prepare(model)
    assert_one_line_and_untouched(error, adapter)
    assert all(p.requires_grad for p in model.parameters())  # refused before prepare changed anything


# --------------------------------------------------------------------------------------------------
# The training method
def test_expert_subset_masks_its_training_steps_only():
    model = family_model("qwen3_moe")
    adapter = ModelAdapter(model)
    last = adapter.moe_layers[-1].index
    masked = ExpertSubset(experts={last: [0, 6]}, routers=[last], mask_router=True)
    plain = ExpertSubset(experts={last: [0, 6]}, routers=[last])
    assert masked.describe() != plain.describe() and plain.describe().endswith("embeddings False")
    with pytest.raises(RuntimeError, match="before prepare"):
        masked.step_context()
    masked.prepare(model)
    batch = random_batch(model, seed=6)
    model.train()
    with masked.step_context():
        trained = run(model, adapter, batch, backward=True)[0][last][0]
        with torch.no_grad():
            evaluated = run(model.eval(), adapter, batch)[0][last][0]
    assert set(trained.unique().tolist()) <= {0, 6}
    assert not set(evaluated.unique().tolist()) <= {0, 6}
    assert adapter.moe_layer(last).experts.chosen.down_proj.grad is not None  # the split experts learn
    with plain.step_context():  # no mask asked for: the training routing is the plain one
        unmasked = run(model.train(), adapter, batch)[0][last][0]
    assert not set(unmasked.unique().tolist()) <= {0, 6}


def write_tokens(path, seed):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 97, (int(n),), generator=generator).tolist()
            for n in torch.randint(5, 30, (200,), generator=generator)]
    table = pa.table({"doc_id": [f"d{i}" for i in range(len(docs))], "split": ["train"] * len(docs),
                      "input_ids": pa.array(docs, type=pa.list_(pa.int32())),
                      "n_tokens": pa.array([len(d) for d in docs], type=pa.int32())})
    pq.write_table(table, path)
    return path


def test_routing_recorded_during_the_engines_training_steps_uses_only_chosen_experts(tmp_path):
    from moelang.train import PackedStream, TrainSettings, train

    files = {"en": write_tokens(tmp_path / "en.parquet", 0)}
    recorded = {}
    for mask_router in (False, True):
        model = tiny_model("olmoe", seed=3)
        adapter = ModelAdapter(model)
        last = adapter.moe_layers[-1].index
        method = ExpertSubset(experts={last: [0, 6]}, routers=[last], mask_router=mask_router)
        stream = PackedStream(files, {"en": 1}, seq_len=16, eos_id=2, seed=0)
        settings = TrainSettings(steps=3, seq_len=16, micro_batch_size=4, lr=5e-3, mixture={"en": 1})  # aux loss on
        used = set()
        with adapter.record_routing(lambda i, idx, w: used.update(idx.unique().tolist()) if i == last else None):
            result = train(model, stream, settings, tmp_path / f"state-{mask_router}", method=method)
        recorded[mask_router] = used
        assert all(torch.isfinite(torch.tensor([row["loss"], row["aux_loss"]])).all() for row in result.log)
        assert "forward" not in adapter.moe_layer(last).router.__dict__  # the finalized model holds no mask
    assert recorded[True] == {0, 6}
    assert not recorded[False] <= {0, 6}


def test_deepseek_a_slot_that_finds_no_chosen_expert_in_the_kept_groups_has_weight_zero():
    # one group kept per token, one chosen expert in each of two groups: the second slot has no
    # chosen expert left in the kept group, and the chosen expert of the other group must not leak in
    model = family_model("deepseek_v3").train()
    adapter = ModelAdapter(model)
    masked = adapter.moe_layers[-1]
    masked.router.topk_group = 1
    masked.router.e_score_correction_bias.zero_()  # the logits decide which group a token keeps
    chosen = [0, 6]  # (torch's top-k, on this CPU, breaks the -inf ties of the second slot towards 6)
    with router_mask(adapter, {masked.index: chosen}):
        routing, inputs, out = run(model, adapter, random_batch(model, seed=7))
    index, weights = routing[masked.index]
    expected = expected_weights("deepseek_v3", masked.router, inputs[masked.index], chosen)
    assert torch.equal(expected.ne(0).sum(dim=-1), torch.ones(index.shape[0], dtype=torch.long))
    assert expected[:, 0].ne(0).any() and expected[:, 6].ne(0).any()  # either group wins for some tokens
    torch.testing.assert_close(dense(index, weights, masked.num_experts), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.loss)


def test_a_router_wrapped_by_accelerates_dispatch_hook_keeps_its_hook():
    # device_map loading wraps module forwards (accelerate's add_hook_to_module): the mask goes
    # under that wrapper, so its device moves still run, and the wrapper is left as it was
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    model = family_model("olmoe").train()
    adapter = ModelAdapter(model)
    layer = adapter.moe_layers[-1]
    add_hook_to_module(layer.router, CountingHook())
    wrapper, own = layer.router.__dict__["forward"], layer.router.__dict__["_old_forward"]
    with router_mask(adapter, {layer.index: [2, 5]}):
        index = run(model, adapter, random_batch(model))[0][layer.index][0]
    assert set(index.unique().tolist()) <= {2, 5} and CountingHook.calls == 1
    assert layer.router.__dict__["forward"] is wrapper and layer.router.__dict__["_old_forward"] is own
    remove_hook_from_module(layer.router)
    assert layer.router.forward.__func__ is type(layer.router).forward  # the module's own forward, no mask

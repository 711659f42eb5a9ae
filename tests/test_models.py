import pytest
import torch

from families import FAMILY_CONFIGS, MOE_FAMILIES, tiny_model
from moelang.errors import MoelangError
from moelang.models import ModelAdapter, bake, count_parameters, load_config, train_only
from moelang.train import TrainSettings, make_optimizer


def random_batch(model, seed=0, batch=3, seq=11):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_recorded_experts_are_the_ones_the_router_chose(family):
    model = tiny_model(family).eval()
    adapter = ModelAdapter(model)
    assert adapter.is_moe and adapter.family == family
    recorded, inputs = {}, {}
    if family == "deepseek_v3":
        for layer in adapter.moe_layers:  # make grouped routing bite: a bias that reorders the groups
            layer.router.e_score_correction_bias.copy_(torch.randn(layer.num_experts) * 0.5)
    with torch.no_grad(), adapter.record_routing(lambda i, idx, w: recorded.__setitem__(i, (idx.clone(), w.clone()))), \
            adapter.capture_mlp_inputs(lambda i, h: inputs.__setitem__(i, h.clone())):
        out = model(input_ids=random_batch(model), output_router_logits=True)
    assert sorted(recorded) == [layer.index for layer in adapter.moe_layers]
    n_tokens = 3 * 11
    differs_from_logit_topk = False
    for k, layer in enumerate(adapter.moe_layers):
        index, weights = recorded[layer.index]
        assert index.shape == (n_tokens, layer.top_k) and weights.shape == (n_tokens, layer.top_k)
        # independent: the router called on the captured MLP input
        hidden = inputs[layer.index].reshape(-1, inputs[layer.index].shape[-1])
        _, expect_weights, expect_index = layer.router(hidden)
        assert torch.equal(index.sort(dim=-1).values, expect_index.sort(dim=-1).values)
        logit_topk = out.router_logits[k].topk(layer.top_k, dim=-1).indices
        differs_from_logit_topk |= not torch.equal(index.sort(dim=-1).values, logit_topk.sort(dim=-1).values)
    # only DeepSeek-V3's grouped routing departs from top-k of its logits
    assert differs_from_logit_topk == (family == "deepseek_v3")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_training_two_experts_changes_exactly_those_slices(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    target = adapter.moe_layers[-1]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = train_only(adapter, experts={target.index: [1, 5]}, routers=[target.index])
    assert trainable and all("experts" in n or "gate" in n or "router" in n for n in trainable)
    optimizer = make_optimizer(model, TrainSettings(steps=1, lr=1e-2, weight_decay=0.1))
    batch = random_batch(model, seed=1)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    bake(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # baking restores the original parameter names
    experts_prefix = f"model.layers.{target.index}.mlp.experts."
    router_prefix = f"model.layers.{target.index}.mlp.{adapter.spec.router_attr}."
    for name, old in before.items():
        new = after[name].detach()
        if name.startswith(experts_prefix):
            changed = [e for e in range(target.num_experts) if not torch.equal(old[e], new[e])]
            assert changed == [1, 5], name
        elif name.startswith(router_prefix):
            assert not torch.equal(old, new), name
        else:
            assert torch.equal(old, new), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_families_expose_their_mlp_inputs(family):
    model = tiny_model(family).eval()
    adapter = ModelAdapter(model)
    assert not adapter.is_moe and adapter.num_layers == FAMILY_CONFIGS[family]["num_hidden_layers"]
    seen, normed = {}, {}
    handles = [layer.post_attention_layernorm.register_forward_hook(
        lambda module, args, output, i=i: normed.__setitem__(i, output.clone())) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad(), adapter.capture_mlp_inputs(lambda i, h: seen.__setitem__(i, h.clone())):
        model(input_ids=random_batch(model))
    for handle in handles:
        handle.remove()
    # independent: the MLP input is the output of the post-attention norm
    assert sorted(seen) == sorted(normed) == [0, 1]
    for i in seen:
        assert torch.equal(seen[i], normed[i])
    with pytest.raises(MoelangError, match="not an MoE layer"):
        adapter.moe_layer(0)


def test_unsupported_family_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(MoelangError) as info:
        ModelAdapter(model)
    assert "'gpt2' is not supported" in str(info.value) and "olmoe" in str(info.value) and "gpt_oss" in str(info.value)


def test_parameter_count_of_the_real_olmoe_on_the_meta_device():
    config = load_config("allenai/OLMoE-1B-7B-0924")
    counts = count_parameters(config=config)
    h, i, e, layers, vocab = 2048, 1024, 64, 16, 50304
    assert counts["per_expert"] == 3 * h * i == 6_291_456
    per_layer = 4 * h * h + 2 * h + 2 * h + e * h + e * 3 * h * i  # attention, q/k norms, 2 norms, router, experts
    assert counts["total"] == 2 * vocab * h + layers * per_layer + h
    assert counts["num_moe_layers"] == 16 and counts["top_k"] == 8


def test_trainable_fraction_of_expert_subsets_on_meta():
    from transformers import AutoModelForCausalLM

    config = load_config("allenai/OLMoE-1B-7B-0924")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = ModelAdapter(model)
    train_only(adapter, experts={14: [0, 1, 2], 15: [3, 4]}, routers=[14, 15])
    counts = count_parameters(model)
    assert counts["trainable"] == 5 * 6_291_456 + 2 * 64 * 2048
    assert counts["total"] == count_parameters(config=config)["total"]
    assert 0.004 < counts["trainable_fraction"] < 0.005

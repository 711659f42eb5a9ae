"""Adaptation baselines as the authors run them: AEFT with shared experts, Full-FT's own recipe, LoRA
at SSFT's parameter budget (fast unit tests; the runs themselves are in test_adapt.py)."""

import math

import pytest
import torch

from families import tiny_model
from moelang import adapt
from moelang.errors import ConfigError
from moelang.options import AdaptOptions, TrainSettings


def context(model, sets=None, **options):
    from moelang.models import ModelAdapter

    adapter = ModelAdapter(model)
    layers = adapt.final_moe_layers(adapter, 2)
    return adapt.AdaptContext(adapter=adapter, layers=layers, expert_sets=sets or {},
                              options=AdaptOptions(lang="ca", **options))


@pytest.mark.parametrize("family, shared_names", [("qwen2_moe", ("shared_expert.", "shared_expert_gate.")),
                                                  ("deepseek_v3", ("shared_experts.",)), ("olmoe", ())])
def test_aeft_trains_the_final_layers_shared_experts_too(family, shared_names):
    """AEFT trains every expert of the final K layers, the always-on shared ones included: exactly the
    parameters of those layers' MoE blocks (routed experts, router, shared experts), counted by name."""
    model = tiny_model(family)
    ctx = context(model)
    trainable = adapt.method_builder("aeft")(ctx).prepare(model)
    prefixes = tuple(f"model.layers.{layer}.mlp." for layer in ctx.layers)
    expected = {name: p.numel() for name, p in model.named_parameters() if name.startswith(prefixes)}
    assert sum(p.numel() for p in trainable) == sum(expected.values())
    shared = [name for name in expected if any(s in name for s in shared_names)]
    assert bool(shared) == bool(shared_names)  # the tiny families that have shared experts have them here
    assert all(p.requires_grad for name, p in model.named_parameters() if name in shared)
    # a chosen-set method leaves them frozen (the authors' SEFT/SSFT train the chosen experts only)
    model = tiny_model(family)
    ctx = context(model, {"ssft": {str(layer): [0, 1] for layer in ctx.layers}})
    adapt.method_builder("ssft")(ctx).prepare(model)
    assert not any(p.requires_grad for name, p in model.named_parameters() if any(s in name for s in shared_names))


# ---------------------------------------------------------------------------------------------------
# Full-FT


def test_full_ft_takes_the_authors_recipe_by_default():
    train = TrainSettings(steps=30, lr=1e-3, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.1, aux_loss_coef=0.0)
    options = AdaptOptions(lang="ca", train=train)
    got = adapt.full_ft_settings(train, options.full_ft)
    assert (got.aux_loss_coef, got.z_loss_coef, got.decay_norms_and_biases) == (0.01, 0.001, True)
    assert (got.warmup_steps, got.warmup_start_ratio, got.weight_decay, got.lr) == (30, 0.59, 0.1, 1e-3)
    # the rate: linear from 0.59 x lr to lr at the last step, never decaying (the authors' 1e-5 -> 1.7e-5)
    from moelang.train import lr_factor

    factors = [lr_factor(step, got) for step in range(30)]
    assert factors == pytest.approx([0.59 + 0.41 * (step + 1) / 30 for step in range(30)])
    assert factors[-1] == pytest.approx(1.0) and all(b > a for a, b in zip(factors, factors[1:]))
    # ours: the expert methods' recipe, unchanged
    assert adapt.full_ft_settings(train, {"recipe": "expert_methods"}) == train
    assert adapt.full_ft_settings(train, {"warmup_steps": 0, "z_loss_coef": 0.0}).warmup_steps == 0
    with pytest.raises(ConfigError, match="unknown keys \\['z_loss'\\]"):
        adapt.full_ft_settings(train, {"z_loss": 0.001})
    with pytest.raises(ConfigError, match="adapt.full_ft.recipe"):
        adapt.full_ft_settings(train, {"recipe": "olmo"})
    with pytest.raises(ConfigError, match="warmup_steps 40"):
        adapt.full_ft_settings(train, {"warmup_steps": 40})


def test_full_ft_decays_every_parameter_and_adds_both_router_losses(tmp_path):
    """With the authors' recipe every parameter (norms and embeddings too) is in a decayed group, and
    the loss is the LM loss + 0.01 x balancing + 0.001 x z-loss, the z-loss computed here on its own."""
    from moelang.train import configure_loss, make_optimizer

    settings = adapt.full_ft_settings(TrainSettings(steps=4, lr=1e-3, aux_loss_coef=0.0), None)
    model = tiny_model("olmoe", seed=3)
    optimizer = make_optimizer(model, settings)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters()}
    loss_fn = configure_loss(model, settings)
    batch = torch.randint(3, 90, (2, 16))
    outputs = model(input_ids=batch, labels=batch)
    loss, metrics = loss_fn(model, batch, outputs, ["ca", "ca"])
    z = sum(torch.logsumexp(l.detach().double(), -1).pow(2).mean() for l in outputs.router_logits) / len(outputs.router_logits)
    assert float(metrics["z_loss"].detach()) == pytest.approx(float(z), rel=1e-5)
    lm, aux = float(metrics["loss"].detach()), float(metrics["aux_loss"].detach())
    assert float(loss.detach()) == pytest.approx(lm + 0.01 * aux + 0.001 * float(z), rel=1e-5)
    assert math.isfinite(aux) and aux > 0


# ---------------------------------------------------------------------------------------------------
# LoRA at SSFT's budget


def test_matched_lora_rank_rules_by_hand():
    # 100 per rank, a budget of 250: at least -> 3 (300), nearest -> 2 (200 is 50 below, 300 is 50 above: tie -> 3)
    assert adapt.matched_lora_rank(100, 250, "at_least") == 3
    assert adapt.matched_lora_rank(100, 250, "nearest") == 3
    assert adapt.matched_lora_rank(100, 240, "nearest") == 2 and adapt.matched_lora_rank(100, 240, "at_least") == 3
    assert adapt.matched_lora_rank(100, 300, "at_least") == adapt.matched_lora_rank(100, 300, "nearest") == 3
    assert adapt.matched_lora_rank(100, 10, "nearest") == adapt.matched_lora_rank(100, 10, "at_least") == 1


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("rule", ["at_least", "nearest"])
def test_lora_matched_to_ssft_counts_as_an_independent_count(family, rule):
    """adapt.lora.match: ssft: the rank is chosen from SSFT's trainable count on the start model; both
    counts are checked against the prepared methods' own trainable parameters."""
    from moelang.models import count_parameters

    sets = {"ssft": {"0": [1, 2, 5], "1": [0, 3, 6, 7]}}
    lora = {"rank": 4, "alpha": 8.0, "targets": ["experts", "router"], "match": "ssft", "match_rule": rule}
    ctx = context(tiny_model(family), sets, lora=lora)
    method = adapt.method_builder("lora")(ctx)
    # independent: SSFT prepared on its own copy of the model, its trainable parameters counted
    ssft_model = tiny_model(family)
    adapt.method_builder("ssft")(context(ssft_model, sets)).prepare(ssft_model)
    ssft = count_parameters(ssft_model)["trainable"]
    assert adapt.ssft_trainable_parameters(ctx) == ssft
    counts = {}
    for rank in (method.settings.rank - 1, method.settings.rank, method.settings.rank + 1):
        model = tiny_model(family)
        lora_rank = adapt.method_builder("lora")(context(model, sets, lora={**lora, "match": None, "rank": rank}))
        counts[rank] = sum(p.numel() for p in lora_rank.prepare(model))
    rank = method.settings.rank
    assert counts[rank] == rank * counts[rank + 1] // (rank + 1)  # linear in the rank
    if rule == "at_least":
        assert counts[rank] >= ssft > counts[rank - 1]
    else:
        assert abs(counts[rank] - ssft) <= min(abs(counts[rank - 1] - ssft), abs(counts[rank + 1] - ssft))
    with pytest.raises(ConfigError, match="match_rule"):
        adapt.method_builder("lora")(context(tiny_model(family), sets, lora={**lora, "match_rule": "closest"}))

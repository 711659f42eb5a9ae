import json
import subprocess
import sys

import pytest
import torch

from families import MOE_FAMILIES, tiny_model
from moelang.errors import ConfigError, MoelangError
from moelang.models import ModelAdapter, count_parameters, load_config
from moelang.models.lora import (
    ADAPTER,
    LoRASettings,
    LoRATraining,
    _wrappers,
    expected_lora_parameters,
    has_lora,
    lora_parameters,
    target_parameters,
)
from moelang.train import PackedStream, export_model, publish, staged_path, train
from test_train import patterned_docs, write_tokens
from test_train import settings as train_settings

TOKENS = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def formula(model, settings: LoRASettings) -> int:
    """r x (in + out) per expert for each fused expert tensor, r x (H + E) for a router, from the
    config's hidden size and each layer's expert count and width (independent of the tensors' shapes
    and of PEFT's bookkeeping)."""
    adapter = ModelAdapter(model)
    hidden, r = model.config.hidden_size, settings.rank
    total = 0
    for layer in adapter.moe_layers[-settings.layers:]:
        experts, width = layer.num_experts, layer.expert_width
        if "experts" in settings.targets:
            total += experts * r * (hidden + 2 * width)  # gate_up_proj: H -> 2I
            total += experts * r * (width + hidden)  # down_proj: I -> H
        if "router" in settings.targets:
            total += r * (hidden + experts)
    return total


def hand_merged(model, base_state) -> dict[str, torch.Tensor]:
    """The base weights plus each adapter's update, computed here from the factors: expert e of a
    fused tensor gets scale x B_e A_e (A_e: rows e*r..e*r+r-1 of lora_A, B_e: columns e, E+e, ... of
    lora_B as PEFT lays out r x E), in the tensor's own orientation; a router gets scale x B A."""
    state = dict(base_state)
    transposed = ModelAdapter(model).spec.transposed
    for name, wrapper in _wrappers(model).items():
        key = f"{name.replace('.base_layer', '')}.{wrapper.parameter_name}"
        weight = base_state[key]
        a = wrapper.lora_A[ADAPTER].weight.detach()
        b = wrapper.lora_B[ADAPTER].weight.detach()
        scale = wrapper.scaling[ADAPTER]
        if weight.dim() == 2:
            state[key] = weight + scale * b @ a
            continue
        experts = weight.shape[0]
        r = a.shape[0] // experts
        updates = []
        for e in range(experts):
            a_e = a[e * r:(e + 1) * r]  # [r, in]
            b_e = b.reshape(b.shape[0], r, experts)[:, :, e]  # [out, r]
            delta = scale * b_e @ a_e  # [out, in]
            updates.append(delta.T if transposed else delta)  # GPT-OSS stores [E, in, out]
        state[key] = weight + torch.stack(updates)
    return state


def randomise_b(model, seed=1):
    """lora_B starts at zero; give it values so that the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora_parameters(model).items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "'adapt.lora.rank'"), ("rank", 2.5, "'adapt.lora.rank'"),
    ("alpha", 0, "'adapt.lora.alpha'"), ("dropout", 0.1, "'adapt.lora.dropout'.*set 0"),
    ("targets", ["experts", "attention"], "'adapt.lora.targets'.*\\['experts', 'router'\\]"),
    ("targets", [], "'adapt.lora.targets'"), ("targets", "router", "'adapt.lora.targets'"),
    ("layers", 0, "'adapt.lora.layers'"), ("seed", "x", "'adapt.lora.seed'"),
])
def test_bad_settings_fail_in_one_line_naming_the_key_before_the_model_changes(field, value, message):
    model = tiny_model("olmoe")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        LoRATraining(LoRASettings(**{field: value})).prepare(model)
    assert not has_lora(model) and model.state_dict().keys() == start.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_more_layers_than_the_model_has_and_dense_models_are_refused():
    message = "'adapt.lora.layers': 3 final MoE layers .* has 2 \\(\\[0, 1\\]\\); set at most 2"
    with pytest.raises(ConfigError, match=message):
        LoRATraining(LoRASettings(layers=3)).prepare(tiny_model("olmoe"))
    with pytest.raises(MoelangError, match="llama model has no MoE layer"):
        LoRATraining().prepare(tiny_model("llama"))


def test_a_second_prepare_is_refused():
    model = tiny_model("olmoe")
    LoRATraining(LoRASettings(layers=1)).prepare(model)
    with pytest.raises(MoelangError, match="already has LoRA adapters"):
        LoRATraining().prepare(model)


def test_targets_are_the_final_layers_tensors_by_their_full_names():
    model = tiny_model("deepseek_v3")  # layer 0 dense: MoE layers 1 and 2
    assert target_parameters(model, LoRASettings(layers=1)) == [
        "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
        "model.layers.2.mlp.gate.weight"]
    assert target_parameters(model, LoRASettings(layers=2, targets=("router",))) == [
        "model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]
    gpt = target_parameters(tiny_model("gpt_oss"), LoRASettings(layers=1, targets=("experts",)))
    assert gpt == ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]  # no biases


# --------------------------------------------------------------------------------------------------
# Every family: the adapted model is the base at the start, PEFT applies a rank-r update per expert
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_starts_as_the_base_and_adapts_each_expert_with_its_own_rank_r_update(family):
    model = tiny_model(family).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = logits(model)
    settings = LoRASettings(rank=2, alpha=3.0, layers=1)
    trainable = LoRATraining(settings).prepare(model)

    assert torch.equal(logits(model), base_logits)  # B = 0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(lora_parameters(model)) and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {id(p) for p in trainable} == {id(p) for n, p in model.named_parameters() if n in names}
    assert sum(p.numel() for p in trainable) == formula(model, settings)
    assert formula(model, settings) == expected_lora_parameters(tiny_model(family), settings)
    last = ModelAdapter(model).moe_layers[-1].index  # the adapter sees through the wrappers
    assert all(f".layers.{last}.mlp." in n for n in names)

    randomise_b(model)
    expect = hand_merged(model, base_state)
    plain = tiny_model(family).eval()
    plain.load_state_dict(expect)
    assert torch.allclose(logits(model), logits(plain), atol=1e-5, rtol=0)
    for name, wrapper in _wrappers(model).items():
        key = f"{name.replace('.base_layer', '')}.{wrapper.parameter_name}"
        delta = expect[key] - base_state[key]
        per_expert = delta if delta.dim() == 3 else delta[None]
        assert all(torch.linalg.matrix_rank(d) == 2 for d in per_expert), key  # rank r, for every expert

    merged = LoRATraining(settings).finalize(model)
    assert merged is model and type(model) is type(plain) and not has_lora(model)
    assert not hasattr(model, "peft_config")
    final = model.state_dict()
    assert final.keys() == base_state.keys()
    assert all(torch.allclose(final[k], expect[k], atol=1e-6, rtol=0) for k in expect)


# --------------------------------------------------------------------------------------------------
# Training, merging, saving
# --------------------------------------------------------------------------------------------------

def optimise(model, params, steps=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        tokens = torch.randint(3, 97, (4, 16), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("family, settings", [
    ("olmoe", LoRASettings(rank=4, alpha=8.0, layers=1)),
    ("qwen3_moe", LoRASettings(rank=2, alpha=4.0, layers=2)),
    ("mixtral", LoRASettings(rank=3, alpha=3.0, layers=1, targets=("router",))),
])
def test_training_changes_only_the_adapters_and_finalize_gives_the_same_plain_model(family, settings, tmp_path):
    model = tiny_model(family).eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    start_logits = logits(model)
    method = LoRATraining(settings)
    params = method.prepare(model)
    before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    optimise(model, params)
    assert not torch.allclose(logits(model), start_logits, atol=1e-4)
    assert all(not torch.equal(p, before[n]) for n, p in lora_parameters(model).items() if ".lora_B." in n)
    lora_logits = logits(model)
    exported = method.export_state(model)  # while training could go on: the live model keeps its adapters
    assert has_lora(model)

    method.finalize(model)
    final = model.state_dict()
    assert final.keys() == start.keys() == exported.keys()
    assert all(torch.equal(final[k], exported[k]) for k in final)  # the export is the merge, bit for bit
    assert torch.allclose(logits(model), lora_logits, atol=1e-5, rtol=0)
    targets = set(target_parameters(tiny_model(family), settings))
    for name in start:
        if name in targets:
            assert not torch.equal(start[name], final[name]), name
        else:  # other layers, embeddings, norms, shared experts, biases: bit-identical
            assert torch.equal(start[name], final[name]), name
    assert count_parameters(model)["total"] == sum(v.numel() for v in start.values())  # plain again


def test_saved_models_reload_without_peft_with_the_original_keys(tmp_path):
    saved = {}
    for family in ("olmoe", "qwen3_moe"):
        model = tiny_model(family).eval()
        reference = {k: v.shape for k, v in model.state_dict().items()}
        method = LoRATraining(LoRASettings(rank=2, layers=2))
        optimise(model, method.prepare(model))
        method.finalize(model)
        model.save_pretrained(tmp_path / family)
        saved[family] = logits(model)
        assert {k: v.shape for k, v in model.state_dict().items()} == reference
        assert not (tmp_path / family / "adapter_config.json").exists()
    torch.save({"tokens": TOKENS, **saved}, tmp_path / "expected.pt")
    # A fresh interpreter in which peft cannot be imported: loading needs transformers only.
    script = f"""
import json, sys, torch
sys.modules["peft"] = None
from transformers import AutoModelForCausalLM
expected = torch.load({str(tmp_path / 'expected.pt')!r})
report = {{}}
for family in ("olmoe", "qwen3_moe"):
    model, info = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family, output_loading_info=True)
    with torch.no_grad():
        got = model.eval()(input_ids=expected["tokens"]).logits
    report[family] = {{"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                       "max_diff": float((got - expected[family]).abs().max()), "peft": "peft" in sys.modules and
                       sys.modules["peft"] is not None}}
print(json.dumps(report))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for family, r in report.items():
        assert not r["missing"] and not r["unexpected"] and not r["peft"], family
        assert r["max_diff"] == 0.0, family


def test_lora_init_is_seeded_and_leaves_the_global_generator_alone():
    def factors(seed):
        model = tiny_model("olmoe")
        torch.manual_seed(123)
        LoRATraining(LoRASettings(seed=seed, layers=1)).prepare(model)
        after = torch.rand(1)  # the caller's stream continues as if nothing had been drawn
        return {n: p.detach().clone() for n, p in lora_parameters(model).items()}, after

    (a, after_a), (b, _), (c, _) = factors(0), factors(0), factors(1)
    torch.manual_seed(123)
    assert torch.equal(after_a, torch.rand(1))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a if ".lora_A." in n)


# --------------------------------------------------------------------------------------------------
# Through the engine: exports, the run record's counts, resuming
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def token_files(tmp_path):
    return {"en": write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))}


def engine_run(token_files, state, stop_after=None, exports=()):
    model = tiny_model("olmoe", seed=3)
    stream = PackedStream(token_files, {}, seq_len=16, eos_id=2, seed=0)
    export_steps = {step: (lambda m, sd, step=step: export_model(m, None, staged_path(state, f"step-{step}"),
                                                                state_dict=sd)) for step in exports}
    method = LoRATraining(LoRASettings(rank=4, layers=1))
    result = train(model, stream, train_settings(mixture={"en": 1}), state, method=method, stop_after=stop_after,
                   export_steps=export_steps)
    return model, result


def test_the_engine_trains_lora_exports_merged_plain_models_and_resumes_bit_identically(token_files, tmp_path):
    from transformers import AutoModelForCausalLM

    start = tiny_model("olmoe", seed=3).state_dict()
    state = tmp_path / "a"
    whole, result = engine_run(token_files, state, exports=(0, 4, 8))
    assert not has_lora(whole) and whole.state_dict().keys() == start.keys()
    expected = expected_lora_parameters(tiny_model("olmoe"), LoRASettings(rank=4, layers=1))
    assert result.parameters["trainable"] == expected
    assert result.parameters["total"] == sum(v.numel() for v in start.values())
    final = whole.state_dict()
    assert not torch.equal(final["model.layers.1.mlp.gate.weight"], start["model.layers.1.mlp.gate.weight"])
    assert all(torch.equal(final[k], start[k]) for k in start if ".layers.1.mlp." not in k)
    for step, weights in ((0, start), (8, final)):
        loaded, info = AutoModelForCausalLM.from_pretrained(staged_path(state, f"step-{step}"),
                                                            output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        got = loaded.state_dict()
        assert all(torch.equal(got[k], weights[k]) for k in weights), step
    publish(state, {})

    _, first = engine_run(token_files, tmp_path / "b", stop_after=5)  # "killed" after step 5
    resumed, resumed_result = engine_run(token_files, tmp_path / "b")
    assert resumed_result.resumed_from == 3
    again = resumed.state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)


# --------------------------------------------------------------------------------------------------
# The real OLMoE-1B-7B architecture (meta device: no weights)
# --------------------------------------------------------------------------------------------------

def test_lora_rank_8_on_olmoe_1b_7b_layers_14_and_15():
    from transformers import AutoModelForCausalLM

    config = load_config("allenai/OLMoE-1B-7B-0924")  # offline: moelang's copy of its config.json
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = count_parameters(model)["total"]
    settings = LoRASettings(rank=8, layers=2)
    assert target_parameters(model, settings) == [
        f"model.layers.{i}.mlp.{t}" for i in (14, 15)
        for t in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")]
    LoRATraining(settings).prepare(model)
    counts = count_parameters(model)
    # per layer: 64 experts x 8 x (2048 + 2 x 1024) + 64 x 8 x (1024 + 2048) + 8 x (2048 + 64)
    per_layer = 64 * 8 * (2048 + 2048) + 64 * 8 * (1024 + 2048) + 8 * (2048 + 64)
    assert per_layer == 3_686_912
    assert counts["trainable"] == 2 * per_layer == 7_373_824
    assert counts["total"] == total  # the factors are not part of the model's size
    assert 0.00105 < counts["trainable_fraction"] < 0.00108  # 0.107% of 6.92B

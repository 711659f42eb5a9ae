import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from families import FAMILY_CONFIGS, MOE_FAMILIES, tiny_model
from moelang.errors import MoelangError
from moelang.models import FAMILIES, ModelAdapter, bake, count_parameters, load_config, train_only
from moelang.models.methods import ExpertSubset
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


def assert_only_chosen_experts_and_router_changed(before, after, adapter, target, chosen) -> None:
    """In ``target``'s layer exactly the ``chosen`` expert slices and the router changed; every other
    tensor of the model is bit-identical."""
    experts_prefix = f"model.layers.{target.index}.mlp.experts."
    router_prefix = f"model.layers.{target.index}.mlp.{adapter.spec.router_attr}."
    for name, old in before.items():
        new = after[name].detach()
        if name.startswith(experts_prefix):
            changed = [e for e in range(target.num_experts) if not torch.equal(old[e], new[e])]
            assert changed == chosen, name
        elif name.startswith(router_prefix):
            assert not torch.equal(old, new), name
        else:
            assert torch.equal(old, new), name


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
    assert_only_chosen_experts_and_router_changed(before, after, adapter, target, [1, 5])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_experts_change_exactly_those_slices_and_fold_back_to_the_plain_model(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    target = adapter.moe_layers[-1]
    plain_class = type(target.experts)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = ExpertSubset(experts={target.index: [5, 1]}, routers=[target.index]).prepare(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(names) and all(".experts.chosen." in n or ".experts." not in n for n in names)
    chosen = target.experts.chosen
    assert chosen.num_experts == 2 and chosen.down_proj.shape[0] == 2 and type(chosen) is plain_class
    optimizer = make_optimizer(model, TrainSettings(steps=1, lr=1e-2, weight_decay=0.1))
    batch = random_batch(model, seed=1)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    ExpertSubset().finalize(model)
    assert type(target.experts) is plain_class and not hasattr(target.experts, "chosen")
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # the original architecture's names, nothing more
    assert_only_chosen_experts_and_router_changed(before, after, adapter, target, [1, 5])


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_experts_give_the_parametrizations_loss_and_gradients(family, implementation):
    rows_model, split_model = tiny_model(family, seed=1), tiny_model(family, seed=1)
    for model in (rows_model, split_model):
        model.config._experts_implementation = implementation
    rows, split = ModelAdapter(rows_model), ModelAdapter(split_model)
    layers = [layer.index for layer in rows.moe_layers]
    selection = {layers[-1]: [1, 5, 6], layers[0]: [0]}
    train_only(rows, experts=selection, routers=layers)
    ExpertSubset(experts=selection, routers=layers).prepare(split_model)
    batch = random_batch(rows_model, seed=2, batch=4, seq=13)
    losses = []
    for model in (rows_model, split_model):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.detach())
    if implementation == "grouped_mm":  # the same kernel on the same rows, summed over choices in the same order
        assert torch.equal(losses[0], losses[1])
    else:  # eager sums a token's choices in expert order
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    compared = 0
    for index, expert_ids in selection.items():
        rows_experts, split_experts = rows.moe_layer(index).experts, split.moe_layer(index).experts
        for name in rows.moe_layer(index).expert_tensor_names(rows.spec):
            expected = getattr(rows_experts.parametrizations, name)[0].rows.grad
            got = getattr(split_experts.chosen, name).grad
            assert got.abs().max() > 0  # the batch reaches the chosen experts
            # the same sums in another grouping of the rows: equal up to float rounding
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
            compared += 1
        for (name, a), (_, b) in zip(rows.moe_layer(index).router.named_parameters(),
                                     split.moe_layer(index).router.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * float(a.grad.abs().max()), msg=name)
    assert compared == 2 * len(rows.moe_layers[0].expert_tensor_names(rows.spec))


def test_split_experts_unchosen_in_a_batch_get_a_zero_gradient_as_in_full_training():
    # AdamW treats a parameter without gradient as absent from the step (no moment update, no weight
    # decay); the parametrization and full training give a zero gradient instead: so must the split.
    model = tiny_model("olmoe", seed=2)
    layer = ModelAdapter(model).moe_layers[-1]
    ExpertSubset(experts={layer.index: [6, 7]}).prepare(model)
    hidden = torch.randn(5, model.config.hidden_size, requires_grad=True)
    top_k_index = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5], [1, 2]])  # never 6 or 7
    out = layer.experts(hidden, top_k_index, torch.full((5, 2), 0.5))
    out.sum().backward()
    for name in ("gate_up_proj", "down_proj"):
        grad = getattr(layer.experts.chosen, name).grad
        assert grad is not None and not grad.any(), name
    assert hidden.grad.abs().sum() > 0


def test_split_experts_export_is_a_plain_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from moelang.models.adapters import split_export_state

    model = tiny_model("olmoe", seed=2)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    layer = ModelAdapter(model).moe_layers[-1]
    method = ExpertSubset(experts={layer.index: [2, 3]})
    method.prepare(model)
    with torch.no_grad():
        layer.experts.chosen.down_proj.add_(1.0)  # as training would move them
    state = method.export_state(model)
    assert state.keys() == plain.keys()
    model.save_pretrained(tmp_path, state_dict=state)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = loaded.state_dict()
    key = f"model.layers.{layer.index}.mlp.experts.down_proj"
    for name in plain:
        if name == key:
            assert torch.equal(saved[name][[2, 3]], plain[name][[2, 3]] + 1.0)
            keep = [e for e in range(layer.num_experts) if e not in (2, 3)]
            assert torch.equal(saved[name][keep], plain[name][keep])
        else:
            assert torch.equal(saved[name], plain[name]), name
    assert split_export_state(model).keys() == plain.keys()  # training can go on: still split
    assert hasattr(layer.experts, "chosen")


def test_expert_subset_naming_missing_experts_fails_before_any_change():
    model = tiny_model("olmoe")
    with pytest.raises(MoelangError, match="layer 1 has experts 0..7; \\[8\\] do not exist"):
        ExpertSubset(experts={1: [0, 8]}).prepare(model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(MoelangError, match="layer 5 of this olmoe model is not an MoE layer"):
        ExpertSubset(routers=[5]).prepare(model)


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


@pytest.mark.parametrize("mechanism", ["rows", "split"])
def test_trainable_fraction_of_expert_subsets_on_meta(mechanism):
    from transformers import AutoModelForCausalLM

    config = load_config("allenai/OLMoE-1B-7B-0924")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = ModelAdapter(model)
    if mechanism == "rows":
        train_only(adapter, experts={14: [0, 1, 2], 15: [3, 4]}, routers=[14, 15])
    else:
        ExpertSubset(experts={14: [0, 1, 2], 15: [3, 4]}, routers=[14, 15]).prepare(model)
    counts = count_parameters(model)
    assert counts["trainable"] == 5 * 6_291_456 + 2 * 64 * 2048
    assert counts["total"] == count_parameters(config=config)["total"]
    assert 0.004 < counts["trainable_fraction"] < 0.005


def test_parameter_count_with_different_expert_counts_per_layer():
    from families import tiny_olmoe_with_expert_counts

    sizes = [8, 10, 12, 8]
    model, hidden, width = tiny_olmoe_with_expert_counts(sizes)
    by_hand = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert experts == sum(sizes) * 3 * hidden * width
    counts = count_parameters(model)
    assert counts["total"] == by_hand
    assert counts["experts_per_layer"] == sizes and counts["num_experts"] is None
    assert counts["per_expert"] == 3 * hidden * width
    # the same shape from the config alone, on the meta device
    config = model.config
    config.num_experts_per_layer = sizes
    meta = count_parameters(config=config)
    assert meta["total"] == by_hand and meta["experts_per_layer"] == sizes
    # training the routers of two layers: their own widths
    train_only(ModelAdapter(model), experts={1: [9]}, routers=[1, 2])
    assert count_parameters(model)["trainable"] == 3 * hidden * width + (10 + 12) * hidden


def test_experts_per_layer_of_the_wrong_length_is_one_line():
    from families import COMMON, FAMILY_CONFIGS
    from moelang.models import build_config

    config = build_config({"model_type": "olmoe", **COMMON, **FAMILY_CONFIGS["olmoe"]})
    config.num_experts_per_layer = [8, 10, 12]
    with pytest.raises(MoelangError, match="3 entries for 2 decoder layers"):
        count_parameters(config=config)


# --------------------------------------------------------------------------------------------------
# The architecture examples of config/README.md, built; MoE layers from the config alone
# --------------------------------------------------------------------------------------------------

class VocabOnly:
    """What build_config reads from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 97


def readme_architectures() -> dict[str, dict]:
    text = (Path(__file__).resolve().parents[1] / "config" / "README.md").read_text(encoding="utf-8")
    section = text.split("### Architecture examples", 1)[1].split("\n### ", 1)[0]
    blocks = [yaml.safe_load(block)["architecture"] for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    return {arch["model_type"]: arch for arch in blocks}


def test_readme_has_an_architecture_example_per_supported_family():
    assert sorted(readme_architectures()) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_readme_architecture_example_builds_with_its_stated_shape(family, caplog):
    from moelang import config as cfg
    from moelang.errors import ConfigError
    from moelang.models import build_config, init_model

    arch = readme_architectures()[family]
    config = {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4},
              "model": {"base": {"type": "train", "architecture": arch}}}
    dense = family in ("llama", "qwen2")
    if dense:  # no MoE layer for the routing stage: refused at start-up
        with pytest.raises(ConfigError, match="'model.base.architecture.model_type': '.*' is a dense family"):
            cfg.validate(config)
    else:
        cfg.validate(config)
    with caplog.at_level(logging.INFO, logger="moelang"):
        model = init_model(build_config(arch, VocabOnly()), seed=0)
    adapter = ModelAdapter(model)
    # the README's stated scale, read off the built tensors
    assert model.get_input_embeddings().weight.shape == (97, 128)
    assert adapter.num_layers == 4
    if dense:
        assert not adapter.is_moe and adapter.layers[0].mlp.down_proj.in_features == 512
        assert "4 layers (dense, MLP width 512), hidden 128" in caplog.text
        return
    first_moe = arch.get("first_k_dense_replace", 0)
    assert [m.index for m in adapter.moe_layers] == list(range(first_moe, 4))
    for layer in adapter.moe_layers:
        gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
        assert gate_up.shape[0] == down.shape[0] == layer.num_experts == 8
        assert layer.top_k == 2
        # [E, 2 x width, hidden] (gpt_oss stores [E, hidden, 2 x width])
        assert sorted(gate_up.shape[1:]) == sorted((128, 2 * 256)) and sorted(down.shape[1:]) == [128, 256]
        assert layer.expert_width == 256
    total = sum(p.numel() for p in model.parameters())
    assert (f"model built: {family}, 4 layers ({4 - first_moe} MoE), 8 experts, top-2, expert width 256, hidden 128, "
            f"{total / 1e6:.2f}M parameters") in caplog.text


@pytest.mark.parametrize("family, fields, expected", [
    ("qwen3_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}, [1, 3]),
    ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0, 2]}, [1, 3]),
    ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}, [0, 2]),
    ("deepseek_v3", {"num_hidden_layers": 3, "first_k_dense_replace": 2}, [2]),
    ("mixtral", {"num_hidden_layers": 3}, [0, 1, 2]),
])
def test_moe_layers_from_the_config_match_the_built_model(family, fields, expected):
    from families import COMMON

    from moelang.models import build_config, init_model

    config = build_config({"model_type": family, **COMMON, **{**FAMILY_CONFIGS[family], **fields}})
    built = [m.index for m in ModelAdapter(init_model(config, seed=0)).moe_layers]
    assert built == expected
    assert FAMILIES[family].moe_layers(config) == expected


# --------------------------------------------------------------------------------------------------
# A multi-process launch without a GPU per process stops
# --------------------------------------------------------------------------------------------------

def test_several_processes_need_a_gpu_each(monkeypatch):
    from moelang.models.loading import check_process_devices

    torchrun_env = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "RANK": "0"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MoelangError) as info:
        check_process_devices("auto", "cpt", torchrun_env)
    assert str(info.value).startswith("cpt: 8 training processes on this node (torchrun --nproc_per_node 8) but 2 "
                                      "CUDA device(s)")
    with pytest.raises(MoelangError, match="set resources.pretrain_base.gpu to at most 2"):
        check_process_devices("cuda", "pretrain_base", torchrun_env)
    check_process_devices("cpu", "cpt", torchrun_env)  # CPU processes on purpose (the gloo tests)
    check_process_devices("auto", "cpt", {})  # one process
    check_process_devices("auto", "cpt", {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})  # a GPU each


@pytest.mark.parametrize("command, rule", [("cpt", "cpt"), ("pretrain", "pretrain_base")])
def test_training_command_under_torchrun_without_gpus_stops_with_one_line(tmp_path, command, rule):
    # the variables torchrun --nproc_per_node 2 gives each process; no CUDA device visible
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    options = json.dumps({"device": "auto", "base": {"type": "train"}})
    extra = ["--base", str(tmp_path / "base")] if command == "cpt" else ["--tokenizer", str(tmp_path / "tok")]
    proc = subprocess.run([sys.executable, "-m", "moelang", command, "--options", options, *extra,
                           "--tokens", str(tmp_path / "en.parquet"), "--out", str(tmp_path / "out"),
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"moelang: error: {rule}: 2 training processes on this node"), lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()

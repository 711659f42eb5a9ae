"""``activation_checkpointing``: the same loss and gradients as without it, in the engine too, and less
memory kept between the forward and the backward pass."""

import copy

import pytest
import torch

from families import tiny_model
from moelang.options import TrainSettings
from moelang.train import apply_activation_checkpointing, configure_loss

CHECKPOINTED = TrainSettings(steps=1, activation_checkpointing=True)


def loss_and_grads(model, settings, batch, loss_fn=None, langs=None):
    model.train()
    loss_fn = configure_loss(model, settings, loss_fn)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(input_ids=batch, labels=batch)
    loss, metrics = loss_fn(model, batch, out, langs or ["en"] * len(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) or isinstance(v, float)}, grads


def assert_same(plain, checkpointed):
    loss, metrics, grads = plain
    loss_c, metrics_c, grads_c = checkpointed
    assert loss_c == pytest.approx(loss, rel=1e-6, abs=1e-7)
    for name, value in metrics.items():
        if value == value:  # NaN for a term the model has not
            assert metrics_c[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert grads_c.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "qwen2"])
def test_the_same_loss_and_gradients_as_without(family):
    # the MoE families with their load-balancing loss and z-loss on: the router logits that the loss
    # reads come out of the checkpointed layers
    settings = TrainSettings(steps=1, aux_loss_coef=0.01, z_loss_coef=0.001 if family != "qwen2" else 0.0)
    model = tiny_model(family, seed=1, num_hidden_layers=3)
    batch = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = loss_and_grads(copy.deepcopy(model), settings, batch)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, settings.replace(activation_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    assert_same(plain, loss_and_grads(checkpointed, settings, batch))


def test_an_expanded_model_with_router_classifiers_and_the_stage_2_loss():
    # LayerMoE's stage 2: routing prior, classifier logits (recorded by hooks) and a restricted routing
    from moelang.expand import stage2_loss
    from moelang.models.layermoe.build import add_classifiers, expand_model
    from moelang.models.methods import ModuleSubset
    from moelang.options import ExpandOptions

    base = tiny_model("qwen2", seed=2, num_hidden_layers=3)
    expanded, _ = expand_model(base, [1, 2, 1], top_k=2, noise=0.05, seed=0)
    add_classifiers(expanded, [1], seed=0)
    names = [f"model.layers.{i}.mlp.gate" for i in range(3)] + ["model.layers.1.mlp.classifier"]
    ModuleSubset(modules=names).prepare(expanded)
    options = ExpandOptions(old=["en"], new=["el"])
    loss_fn = stage2_loss(["en"], [1, 1, 1], options)
    settings = options.stage2.replace(aux_loss_coef=0.0)
    batch = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    langs = ["en", "el", "el", "en"]
    plain = loss_and_grads(copy.deepcopy(expanded), settings, batch, loss_fn, langs)
    assert "classifier_loss" in plain[1] and "lpr_loss" in plain[1]
    checkpointed = copy.deepcopy(expanded)
    apply_activation_checkpointing(checkpointed, CHECKPOINTED)
    assert_same(plain, loss_and_grads(checkpointed, settings, batch, loss_fn, langs))


def test_the_engine_trains_to_the_same_weights_and_resumes_across_the_switch(tmp_path):
    from test_train import patterned_docs, write_tokens

    from moelang.models.methods import FullTraining
    from moelang.train import PackedStream, train

    files = {"en": write_tokens(tmp_path / "en.parquet", patterned_docs(200, 0))}
    base = tiny_model("olmoe", seed=3)

    def run(name, checkpointing, stop_after=None):
        settings = TrainSettings(steps=4, seq_len=16, micro_batch_size=2, grad_accum=2, lr=1e-3, seed=0,
                                 checkpoint_every=2, z_loss_coef=0.001, activation_checkpointing=checkpointing)
        model = copy.deepcopy(base)
        stream = PackedStream(files, {"en": 1.0}, settings.seq_len, 2, settings.seed)
        result = train(model, stream, settings, tmp_path / name, method=FullTraining(), stop_after=stop_after)
        return model, result

    plain, plain_result = run("plain", False)
    checkpointed, result = run("checkpointed", True)
    assert [r["loss"] for r in result.log] == pytest.approx([r["loss"] for r in plain_result.log], rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    # a run stopped after 2 steps without it resumes with it: a setting that does not change the result
    run("switched", False, stop_after=2)
    switched, switched_result = run("switched", True)
    assert switched_result.resumed_from == 2
    for (name, p), q in zip(plain.named_parameters(), switched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_less_memory_is_kept_between_forward_and_backward():
    # what autograd keeps, read off the saved tensors themselves (parameters excluded): a layer's
    # input instead of its activations
    def kept_bytes(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(3, 97, (2, 32)), labels=torch.randint(3, 97, (2, 32)))
        return sum(seen.values())

    model = tiny_model("olmoe", seed=0, num_hidden_layers=4)
    plain = kept_bytes(model)
    apply_activation_checkpointing(model, CHECKPOINTED)
    # the checkpoints keep each layer's input (2 x 32 tokens x hidden 32 x 4 bytes); the loss's
    # log-softmax output stays (64 x vocab 97 x 4 bytes)
    assert kept_bytes(model) < plain / 3


def test_a_sweep_with_it_ends_as_one_without_it(tmp_path):
    # the sweep's runs checkpoint their own copies of the layers they train (moelang.sweep); the
    # load-balancing loss reads the router logits of every layer, the recomputed ones included
    from test_sweep import LRS, deep, exported, settings, ssft, sweep
    from test_train import patterned_docs, write_tokens

    files = {"en": write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0)),
             "es": write_tokens(tmp_path / "es.parquet", patterned_docs(200, 1))}
    results = {}
    for checkpointing in (False, True):
        states = [tmp_path / f"{checkpointing}-{lr}" for lr in LRS]
        runs = sweep(deep(), files, states, [ssft() for _ in LRS],
                     [settings(lr=lr, activation_checkpointing=checkpointing) for lr in LRS])
        assert all(row["aux_loss"] > 0 for result in runs for row in result.log)
        results[checkpointing] = ([r["loss"] for result in runs for r in result.log],
                                  [exported(state, 6) for state in states])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    for plain, checkpointed in zip(results[False][1], results[True][1]):
        for name, tensor in plain.items():
            torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from safetensors.torch import load_file

from families import COMMON, FAMILY_CONFIGS, tiny_model
from moelang.errors import ConfigError, MoelangError
from moelang.models import ModelAdapter, build_config, init_model, train_only
from moelang.models.methods import ExpertSubset
from moelang.tokenize import TOKENS_SCHEMA
from moelang.train import (
    LOG_SCHEMA,
    PackedStream,
    TrainSettings,
    export_model,
    lm_loss,
    lr_factor,
    packed_windows,
    publish,
    staged_path,
    train,
)

EOS = 2


def write_tokens(path, docs, splits=None):
    splits = splits or ["train"] * len(docs)
    table = pa.table({"doc_id": [f"d{i}" for i in range(len(docs))], "split": splits,
                      "input_ids": pa.array(docs, type=pa.list_(pa.int32())),
                      "n_tokens": pa.array([len(d) for d in docs], type=pa.int32())}, schema=TOKENS_SCHEMA)
    pq.write_table(table, path)
    return path


def patterned_docs(n, seed, vocab=97):
    """Documents with structure a tiny model can learn: arithmetic progressions modulo the vocabulary."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start, stride, length = rng.integers(3, vocab), rng.integers(1, 4), rng.integers(5, 30)
        docs.append([int(3 + (start + stride * k) % (vocab - 3)) for k in range(length)])
    return docs


@pytest.fixture
def token_files(tmp_path):
    return {"en": write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0)),
            "es": write_tokens(tmp_path / "es.parquet", patterned_docs(200, 1))}


def test_packed_windows_equal_a_plain_python_packing(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]
    path = write_tokens(tmp_path / "t.parquet", docs + [[99, 98], [97, 96]], splits=["train"] * 4 + ["dev", "test"])
    windows = packed_windows(path, seq_len=3, eos_id=EOS, seed=4)
    # independent: the same seeded order, then a plain loop
    from moelang.train import _seed_for

    order = np.random.default_rng(_seed_for("doc-order", 4, "t.parquet")).permutation(4)
    stream = [t for i in order for t in docs[i] + [EOS]]
    expect = [stream[k:k + 3] for k in range(0, len(stream) - len(stream) % 3, 3)]
    assert windows.tolist() == expect
    assert 99 not in windows and 97 not in windows  # dev and test documents never enter training


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    s = TrainSettings(steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, s) == 0.5 and lr_factor(1, s) == 1.0
    assert lr_factor(2, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(0.1)
    assert lr_factor(6, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_lr_schedule_warmup_from_a_ratio_and_a_long_cosine_horizon():
    s = TrainSettings(steps=20, warmup_steps=4, warmup_start_ratio=0.1, cosine_horizon_steps=1004, min_lr_ratio=0.1)
    assert [lr_factor(k, s) for k in range(4)] == pytest.approx([0.1 + 0.9 * (k + 1) / 4 for k in range(4)])
    # 1000 steps of cosine after the warm-up: after 15 of them the rate has hardly moved
    assert lr_factor(19, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 999)))
    assert lr_factor(19, s) > 0.999
    assert lr_factor(2000, s) == pytest.approx(0.1)  # and the floor is reached at the horizon


def test_weight_decay_on_norms_and_biases_only_when_asked():
    from moelang.train import make_optimizer

    model = tiny_model("olmoe", seed=3)
    for flag, decayed_vectors in ((False, 0), (True, sum(1 for p in model.parameters() if p.ndim < 2))):
        optimizer = make_optimizer(model, TrainSettings(steps=1, weight_decay=0.1, decay_norms_and_biases=flag))
        decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
        assert sum(1 for p in decayed if p.ndim < 2) == decayed_vectors
        assert {id(p) for p in model.parameters() if p.ndim >= 2} <= {id(p) for p in decayed}


def test_a_submodule_trains_at_its_own_peak_learning_rate():
    from moelang.train import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    settings = TrainSettings(steps=1, lr=0.01, weight_decay=0.0, betas=(0.9, 0.999))
    optimizer = make_optimizer(model, settings, {"1": 0.1})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    # Adam's first step moves each coordinate by its rate (m / sqrt(v) = 1 for a constant gradient)
    moved = [(b - p.detach()).abs() for b, p in zip(before, model.parameters())]
    torch.testing.assert_close(moved[0], torch.full_like(moved[0], 0.01), atol=1e-6, rtol=0)  # layer 0 weight
    torch.testing.assert_close(moved[2], torch.full_like(moved[2], 0.1), atol=1e-6, rtol=0)  # layer 1 weight
    torch.testing.assert_close(moved[3], torch.full_like(moved[3], 0.1), atol=1e-6, rtol=0)  # layer 1 bias
    assert sorted(g["initial_lr"] for g in optimizer.param_groups) == [0.01, 0.1]


def test_router_z_loss_is_added_and_logged(token_files, tmp_path):
    from moelang.train import router_z_loss

    model = tiny_model("olmoe", seed=3)
    model.config.output_router_logits = True
    batch = torch.randint(3, 90, (2, 16))
    logits = model(input_ids=batch).router_logits
    # independent: per layer, mean over tokens of log(sum(exp))^2, then the mean over layers
    by_hand = np.mean([np.mean(np.log(np.exp(l.detach().double().numpy()).sum(-1)) ** 2) for l in logits])
    assert float(router_z_loss(logits).detach()) == pytest.approx(by_hand, rel=1e-5)

    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    with_z = train(tiny_model("olmoe", seed=3), stream, settings(z_loss_coef=1e-3, aux_loss_coef=0.0, steps=3),
                   tmp_path / "z")
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    without = train(tiny_model("olmoe", seed=3), stream, settings(aux_loss_coef=0.0, steps=3), tmp_path / "plain")
    assert all(r["z_loss"] > 0 for r in with_z.log) and "z_loss" not in without.log[0]
    # the first step's language-modelling loss is the same (same weights, same batch), and z-loss with
    # the balancing loss off adds no balancing term
    assert with_z.log[0]["loss"] == pytest.approx(without.log[0]["loss"], rel=1e-6)
    assert math.isnan(with_z.log[0]["aux_loss"])
    assert with_z.log[-1]["loss"] != without.log[-1]["loss"]  # the z-loss gradient changed the weights


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_the_logged_loss_is_the_language_modelling_loss_whatever_the_familys_default_weight(token_files, tmp_path,
                                                                                               family):
    # qwen3_moe's own balancing weight is 0.001, OLMoE's 0.01; ours is 0.05 here
    model = tiny_model(family, seed=3)
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    first = [stream.next_batch(4)[0] for _ in range(2)]  # the first step's two micro-batches
    model.config.output_router_logits = False
    with torch.no_grad():
        lm = float(np.mean([float(model(input_ids=b, labels=b).loss) for b in first]))
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    result = train(model, stream, settings(aux_loss_coef=0.05, steps=1), tmp_path / "s")
    assert result.log[0]["loss"] == pytest.approx(lm, rel=1e-5)


def test_mixture_follows_the_weights(token_files):
    stream = PackedStream(token_files, {"en": 3, "es": 1}, seq_len=8, eos_id=EOS, seed=0)
    _, langs = stream.next_batch(4000)
    assert 0.72 < langs.count("en") / 4000 < 0.78


def settings(**kw):
    base = dict(steps=8, seq_len=16, micro_batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, weight_decay=0.1,
                checkpoint_every=3, seed=0, mixture={"en": 1, "es": 1})
    return TrainSettings(**(base | kw))


def run(token_files, state_dir, partial: bool | str, stop_after=None, loss_fn=None):
    model = tiny_model("olmoe", seed=3)
    method = None
    last = ModelAdapter(model).moe_layers[-1].index
    if partial == "split":  # the same selection as a training method: the chosen experts split out
        method = ExpertSubset(experts={last: [0, 6]}, routers=[last])
    elif partial:  # SSFT-like: two experts and the router of the last layer
        train_only(ModelAdapter(model), experts={last: [0, 6]}, routers=[last])
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    result = train(model, stream, settings(), state_dir, stop_after=stop_after, method=method, loss_fn=loss_fn)
    if stop_after is None:
        publish(state_dir, {})  # nothing staged: removes the state, as the stages do after their exports
    return model, result


@pytest.mark.parametrize("partial", [False, True, "split"])
def test_killed_run_resumes_to_bit_identical_weights(token_files, tmp_path, partial):
    whole, whole_result = run(token_files, tmp_path / "a", partial)
    _, first = run(token_files, tmp_path / "b", partial, stop_after=5)  # "killed" after step 5
    assert first.steps == 5 and (tmp_path / "b" / "step-3").is_dir()
    resumed, resumed_result = run(token_files, tmp_path / "b", partial)  # a fresh process starts over
    assert resumed_result.resumed_from == 3
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(whole_result.log) == strip(resumed_result.log)
    assert not (tmp_path / "b").exists()  # state is removed after success


@pytest.mark.parametrize(("keep_killed", "keep_resumed"), [(1, 1), (2, 1), (5, 3)])
def test_keep_last_states_keeps_the_newest_and_resumes_from_the_last(token_files, tmp_path, keep_killed,
                                                                    keep_resumed):
    # checkpoints at steps 2, 4 and 6 of 8; the run is killed after step 7
    def one(state_dir, keep, stop_after=None):
        model = tiny_model("olmoe", seed=3)
        stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
        result = train(model, stream, settings(checkpoint_every=2, keep_last_states=keep), state_dir,
                       stop_after=stop_after)
        return model, result

    whole, whole_result = one(tmp_path / "whole", 1)
    one(tmp_path / "s", keep_killed, stop_after=7)
    kept = sorted(p.name for p in (tmp_path / "s").glob("step-*"))
    assert kept == ["step-2", "step-4", "step-6"][-keep_killed:]
    assert all((tmp_path / "s" / name / "state.json").is_file() for name in kept)
    # keep_last_states may change between a kill and its resume: it changes no result
    resumed, resumed_result = one(tmp_path / "s", keep_resumed)
    assert resumed_result.resumed_from == 6
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in whole_result.log] == [r["loss"] for r in resumed_result.log]
    # the resumed run wrote no state (the last step has none): the killed run's stay until publishing,
    # which removes them all
    assert sorted(p.name for p in (tmp_path / "s").glob("step-*")) == kept
    publish(tmp_path / "s", {})
    assert not (tmp_path / "s").exists()


def test_pruning_removes_older_and_unfinished_checkpoints(tmp_path):
    from moelang.train import _prune

    for name in ("step-2", "step-4", "step-10"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    (tmp_path / "step-12").mkdir()  # killed while written (no state.json)
    (tmp_path / ".step-14.partial").mkdir()  # a sharded checkpoint killed while its processes wrote it
    (tmp_path / "exports").mkdir()
    _prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "step-10", "step-4"]  # by step, not by name


def test_keep_last_states_below_one_is_refused():
    with pytest.raises(ConfigError, match="keep_last_states: 0 keeps no state"):
        TrainSettings(steps=4, keep_last_states=0)


def test_resume_with_other_settings_is_refused(token_files, tmp_path):
    run(token_files, tmp_path / "s", False, stop_after=4)
    with pytest.raises(MoelangError, match="other training settings \\(lr\\)"):
        model = tiny_model("olmoe", seed=3)
        stream = PackedStream(token_files, {}, seq_len=16, eos_id=EOS, seed=0)
        train(model, stream, settings(lr=1e-4), tmp_path / "s")


def test_loss_goes_down_and_the_log_has_its_schema(token_files, tmp_path):
    model = tiny_model("olmoe", seed=0)
    stream = PackedStream(token_files, {}, seq_len=32, eos_id=EOS, seed=0)
    result = train(model, stream, settings(steps=40, seq_len=32, lr=1e-2, checkpoint_every=0, grad_accum=1), tmp_path / "s")
    table = result.log_table()
    assert table.num_rows == 40 and table.column("step").to_pylist() == list(range(1, 41))
    losses = table.column("loss").to_pylist()
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    assert table.column("tokens").to_pylist()[-1] == 40 * 32 * 4
    assert all(a > 0 for a in table.column("aux_loss").to_pylist())


def test_fsdp_with_a_trained_subset_is_refused(token_files, tmp_path):
    model = tiny_model("olmoe", seed=3)
    adapter = ModelAdapter(model)
    train_only(adapter, experts={adapter.moe_layers[-1].index: [0, 6]})
    stream = PackedStream(token_files, {}, seq_len=16, eos_id=EOS, seed=0)
    with pytest.raises(MoelangError, match="set parallelism: ddp for partial training"):
        train(model, stream, settings(parallelism="fsdp"), tmp_path / "s")


def test_fsdp_with_an_expert_subset_method_is_refused(token_files, tmp_path):
    model = tiny_model("olmoe", seed=3)
    stream = PackedStream(token_files, {}, seq_len=16, eos_id=EOS, seed=0)
    method = ExpertSubset(experts={1: [0, 6]}, routers=[1])
    with pytest.raises(MoelangError, match="set parallelism: ddp for partial training"):
        train(model, stream, settings(parallelism="fsdp"), tmp_path / "s", method=method)


def test_split_training_changes_only_the_chosen_slices_and_exports_plain_models(token_files, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("olmoe", seed=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stream = PackedStream(token_files, {}, seq_len=16, eos_id=EOS, seed=0)
    state = tmp_path / "s"
    exports = {step: (lambda m, sd, step=step: export_model(m, None, staged_path(state, f"step-{step}"), state_dict=sd))
               for step in (0, 4, 8)}
    train(model, stream, settings(), state, method=ExpertSubset(experts={1: [0, 6]}, routers=[1]), export_steps=exports)
    final = model.state_dict()
    assert final.keys() == start.keys()  # finalized: the plain architecture again
    fused = "model.layers.1.mlp.experts."
    for name in start:
        if name.startswith(fused):
            changed = [e for e in range(8) if not torch.equal(start[name][e], final[name][e])]
            assert changed == [0, 6], name
        elif name == "model.layers.1.mlp.gate.weight":
            assert not torch.equal(start[name], final[name])
        else:  # frozen layers, norms, embeddings: bit-identical
            assert torch.equal(start[name], final[name]), name
    for step, expected in ((0, start), (8, final)):
        loaded, info = AutoModelForCausalLM.from_pretrained(staged_path(state, f"step-{step}"), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        got = loaded.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), step
    middle = load_file(str(staged_path(state, "step-4") / "model.safetensors"))  # saved one tensor per expert
    assert not torch.equal(middle[fused + "0.down_proj.weight"], start[fused + "down_proj"][0])
    assert torch.equal(middle[fused + "1.down_proj.weight"], start[fused + "down_proj"][1])


def test_the_default_loss_function_is_the_models_own_loss(token_files, tmp_path):
    _, implicit = run(token_files, tmp_path / "a", False)
    _, explicit = run(token_files, tmp_path / "b", False, loss_fn=lm_loss(settings().aux_loss_coef, True))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(implicit.log) == strip(explicit.log)


class CountingLoss:
    """A loss with metrics of its own: the default loss, the share of Spanish sequences, a constant.
    Records the languages it was given."""

    def __init__(self):
        self.langs, self.default = [], lm_loss(settings().aux_loss_coef, True)

    def __call__(self, model, batch, outputs, langs):
        assert len(langs) == batch.shape[0]
        self.langs.append(list(langs))
        loss, metrics = self.default(model, batch, outputs, langs)
        return loss, metrics | {"es_share": langs.count("es") / len(langs), "two": torch.tensor(2.0)}


def test_a_loss_functions_metrics_become_log_columns_and_see_the_languages(token_files, tmp_path):
    loss_fn = CountingLoss()
    _, result = run(token_files, tmp_path / "s", False, loss_fn=loss_fn)
    # independent: the same stream's draws, micro-batch by micro-batch
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    drawn = [stream.next_batch(4)[1] for _ in range(8 * 2)]
    assert loss_fn.langs == drawn
    table = result.log_table()
    assert table.schema.names[:7] == [f.name for f in LOG_SCHEMA]
    assert table.schema.field("es_share").type == pa.float64() and table.column("two").to_pylist() == [2.0] * 8
    expected = [(drawn[2 * i].count("es") + drawn[2 * i + 1].count("es")) / 8 for i in range(8)]
    assert table.column("es_share").to_pylist() == pytest.approx(expected, abs=1e-12)
    # and the same numbers after a kill and a resume (the checkpoint's log keeps the columns)
    run(token_files, tmp_path / "r", False, stop_after=5, loss_fn=CountingLoss())
    _, resumed = run(token_files, tmp_path / "r", False, loss_fn=CountingLoss())
    assert resumed.resumed_from == 3
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(resumed.log) == strip(result.log)


def test_resume_with_another_process_count_is_refused(token_files, tmp_path):
    import json

    run(token_files, tmp_path / "s", False, stop_after=4)
    meta = tmp_path / "s" / "step-3" / "state.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"processes": 2}))
    with pytest.raises(MoelangError, match="made by 2 process\\(es\\), this run has 1; resume with 2"):
        run(token_files, tmp_path / "s", False)


# --------------------------------------------------------------------------------------------------
# The state directory belongs to its inputs; publishing comes before its removal
# --------------------------------------------------------------------------------------------------

def olmoe(seed=3, **overrides):
    return init_model(build_config({"model_type": "olmoe", **COMMON, **FAMILY_CONFIGS["olmoe"], **overrides}), seed=seed)


def run_with(model, token_files, state_dir, inputs, stop_after=None):
    """A run that stages the start model as export "step-0", as CPT does."""
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    export = {0: lambda m, sd: export_model(m, None, staged_path(state_dir, "step-0"), state_dict=sd)}
    return train(model, stream, settings(), state_dir, inputs=inputs, export_steps=export, stop_after=stop_after)


@pytest.mark.parametrize("change", ["token file es", "start model weights", "start model config", "trainable parameters",
                                    "tokenizer"])
def test_a_state_made_from_other_inputs_is_discarded(token_files, tmp_path, caplog, change):
    state = tmp_path / "s"
    run_with(olmoe(), token_files, state, {"tokenizer": "t1"}, stop_after=5)
    assert (state / "step-3" / "state.json").is_file() and staged_path(state, "step-0").is_dir()

    def changed_inputs():
        model, files, inputs = olmoe(), dict(token_files), {"tokenizer": "t1"}
        if change == "token file es":
            files["es"] = write_tokens(tmp_path / "es2.parquet", patterned_docs(200, 9))
        elif change == "start model weights":
            model = olmoe(seed=4)
        elif change == "start model config":  # another architecture: resuming would be a size mismatch
            model = olmoe(hidden_size=48)
        elif change == "trainable parameters":
            adapter = ModelAdapter(model)
            train_only(adapter, routers=[adapter.moe_layers[-1].index])
        else:
            inputs = {"tokenizer": "t2"}
        return model, files, inputs

    model, files, inputs = changed_inputs()
    with caplog.at_level(logging.WARNING, logger="moelang"):
        result = run_with(model, files, state, inputs)
    assert result.resumed_from is None
    lines = [r.getMessage() for r in caplog.records if "discarding the state" in r.getMessage()]
    assert len(lines) == 1 and str(state) in lines[0] and change in lines[0].split("inputs changed (")[1], lines
    # an uninterrupted run with the new inputs: the same staged start model, the same end
    fresh_model, fresh_files, fresh_inputs = changed_inputs()
    fresh = run_with(fresh_model, fresh_files, tmp_path / "fresh", fresh_inputs)
    exported = load_file(str(staged_path(state, "step-0") / "model.safetensors"))
    expected = load_file(str(staged_path(tmp_path / "fresh", "step-0") / "model.safetensors"))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in exported)
    a, b = fresh_model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in fresh.log] == [r["loss"] for r in result.log]


def test_a_state_with_the_same_inputs_is_kept(token_files, tmp_path, caplog):
    state = tmp_path / "s"
    run_with(olmoe(), token_files, state, {"tokenizer": "t1"}, stop_after=5)
    with caplog.at_level(logging.WARNING, logger="moelang"):
        result = run_with(olmoe(), token_files, state, {"tokenizer": "t1"})
    assert result.resumed_from == 3 and "discarding" not in caplog.text


def test_a_state_without_fingerprint_is_discarded(token_files, tmp_path, caplog):
    state = tmp_path / "s"
    run_with(olmoe(), token_files, state, None, stop_after=5)
    (state / "inputs.json").unlink()  # as an older moelang left it
    with caplog.at_level(logging.WARNING, logger="moelang"):
        result = run_with(olmoe(), token_files, state, None)
    assert result.resumed_from is None and "records no inputs" in caplog.text


def test_a_damaged_checkpoint_fails_with_one_line_naming_the_state(token_files, tmp_path):
    state = tmp_path / "s"
    run_with(olmoe(), token_files, state, None, stop_after=4)
    (state / "step-3" / "trainable.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(MoelangError, match=f"cannot resume from {state / 'step-3'} .*; delete {state} to start over"):
        run_with(olmoe(), token_files, state, None)


def test_a_finished_run_keeps_its_state_until_it_is_published(token_files, tmp_path):
    # A job killed after training but before its exports are in place resumes from its last checkpoint
    # (it used to lose the whole state), and publishing puts every export in place before removing it.
    state = tmp_path / "s"
    whole = olmoe()
    run_with(whole, token_files, state, None)
    assert (state / "step-6" / "state.json").is_file() and staged_path(state, "step-0").is_dir()
    again = olmoe()
    result = run_with(again, token_files, state, None)  # the job was killed before publishing
    assert result.resumed_from == 6
    a, b = whole.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "out"
    publish(state, {"step-0": out / "step-0"})
    assert not state.exists()
    export_model(olmoe(), None, tmp_path / "start")
    published, start = (load_file(str(d / "model.safetensors")) for d in (out / "step-0", tmp_path / "start"))
    assert published.keys() == start.keys() and all(torch.equal(published[k], start[k]) for k in start)


def test_publishing_killed_halfway_is_redone_from_the_state(tmp_path, monkeypatch):
    import moelang.train as engine

    state = tmp_path / "s"
    for name in ("step-0", "step-8"):
        staged_path(state, name).mkdir(parents=True)
        (staged_path(state, name) / "model.safetensors").write_text(name)
    (staged_path(state, "log.parquet")).write_text("log")
    outputs = {"step-0": tmp_path / "out" / "step-0", "step-8": tmp_path / "out" / "step-8",
               "log.parquet": tmp_path / "out" / "log.parquet"}
    real, calls = engine._link_or_copy, []

    def dies_on_the_second_output(source, dest):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed here
        real(source, dest)

    monkeypatch.setattr(engine, "_link_or_copy", dies_on_the_second_output)
    with pytest.raises(KeyboardInterrupt):
        publish(state, outputs)
    assert (outputs["step-0"] / "model.safetensors").read_text() == "step-0"
    assert not outputs["step-8"].exists()  # no half-made output
    assert all(staged_path(state, name).exists() for name in outputs)  # the state still has every export
    for path in outputs.values():  # Snakemake deletes a failed job's outputs
        engine.shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    monkeypatch.setattr(engine, "_link_or_copy", real)
    publish(state, outputs)
    assert [(outputs[n] / "model.safetensors").read_text() for n in ("step-0", "step-8")] == ["step-0", "step-8"]
    assert outputs["log.parquet"].read_text() == "log" and not state.exists()


def test_publish_refuses_a_state_without_the_export(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(MoelangError, match="lacks the staged export\\(s\\) step-4; delete .* to train again"):
        publish(tmp_path / "s", {"step-4": tmp_path / "out"})


def test_bf16_weights_train_as_fp32_master_weights_and_export_in_bf16(token_files, tmp_path, bf16_process):
    """A model loaded in bf16 (the paper configs) trains its weights in fp32: the export equals, after
    rounding to bf16, the same run on the model made fp32 by hand; stepping the bf16 weights themselves
    (what AdamW did before) rounds small updates away and ends elsewhere."""
    settings = TrainSettings(steps=6, seq_len=16, micro_batch_size=4, lr=1e-5, warmup_steps=0, min_lr_ratio=1.0,
                             dtype="bf16", weight_decay=0.0, aux_loss_coef=0.01)

    def stream():
        return PackedStream(token_files, {"en": 1.0, "es": 1.0}, settings.seq_len, EOS, seed=0)

    half = tiny_model("olmoe", seed=3).to(torch.bfloat16)
    exported = {}
    train(half, stream(), settings, tmp_path / "a",
          export_steps={settings.steps: lambda m, sd: exported.update(sd or m.state_dict())})
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # given back as it came
    assert all(t.dtype == torch.bfloat16 for t in exported.values() if t.is_floating_point())

    by_hand = tiny_model("olmoe", seed=3).to(torch.bfloat16).float()  # the same bf16 start, in fp32
    train(by_hand, stream(), settings, tmp_path / "b")
    for name, tensor in by_hand.state_dict().items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
        assert torch.equal(half.state_dict()[name], tensor.to(torch.bfloat16)), name

    # the old way: AdamW on the bf16 tensors themselves
    pure = tiny_model("olmoe", seed=3).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(pure.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=0.0)
    batches = stream()
    for _ in range(settings.steps):
        batch, _ = batches.next_batch(settings.micro_batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pure(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # at this rate an update is below half a bf16 step of most weights: AdamW on bf16 leaves them
    # where they were, while the fp32 master weights all move (rounded only when exported)
    start = tiny_model("olmoe", seed=3).to(torch.bfloat16).state_dict()

    def unmoved(state):
        return sum(int((state[k].float() == start[k].float()).sum()) for k in start) / sum(t.numel() for t in start.values())

    assert unmoved(pure.state_dict()) > 0.5 and unmoved(by_hand.state_dict()) < 0.05

"""A learning-rate sweep sharing one pass of the frozen layers (moelang.sweep) against separate runs."""

import os

import pytest
import torch
from safetensors.torch import load_file

from families import COMMON, FAMILY_CONFIGS, MOE_FAMILIES, tiny_model
from moelang.errors import MoelangError
from moelang.models import ModelAdapter, build_config, init_model
from moelang.models.lora import LoRASettings, LoRATraining
from moelang.models.methods import ExpertSubset, FullTraining
from moelang.sweep import SweepRun, train_sweep
from moelang.train import PackedStream, TrainSettings, export_model, staged_path, train
from test_train import EOS, patterned_docs, write_tokens

LRS = (1e-4, 1e-3, 4e-3)
STEPS = 6
EXPORTS = (0, 3, STEPS)


@pytest.fixture
def token_files(tmp_path):
    return {"en": write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0)),
            "es": write_tokens(tmp_path / "es.parquet", patterned_docs(200, 1))}


def deep(family="olmoe", layers=4, seed=3):
    """A tiny model of ``family`` with ``layers`` decoder layers: the final 2 train, 2 lie below them."""
    fields = {**COMMON, **FAMILY_CONFIGS[family], "num_hidden_layers": layers}
    return init_model(build_config({"model_type": family, **fields}), seed=seed)


def settings(**kw):
    base = dict(steps=STEPS, seq_len=16, micro_batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=1,
                weight_decay=0.1, checkpoint_every=2, seed=0, mixture={"en": 1, "es": 1})
    return TrainSettings(**(base | kw))


def ssft():
    """SSFT-like: chosen experts of the last 2 layers (4-layer model), their routers, the router mask."""
    return ExpertSubset(experts={2: [0, 3, 5], 3: [1, 6]}, routers=[2, 3], mask_router=True)


def stream(token_files):
    return PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)


def exports(state, steps=EXPORTS):
    return {s: (lambda m, sd, s=s: export_model(m, None, staged_path(state, f"step-{s}"), state_dict=sd)) for s in steps}


def exported(state, step):
    return load_file(str(staged_path(state, f"step-{step}") / "model.safetensors"))


def alone(model, token_files, state, method, run_settings, steps=EXPORTS, stop_after=None):
    return train(model, stream(token_files), run_settings, state, method=method, export_steps=exports(state, steps),
                 stop_after=stop_after)


def sweep(model, token_files, states, methods, run_settings, steps=EXPORTS, stop_after=None, loss_fn=None):
    runs = [SweepRun(s, m, d, export_steps=exports(d, steps)) for s, m, d in zip(run_settings, methods, states)]
    return train_sweep(model, stream(token_files), runs, stop_after=stop_after, loss_fn=loss_fn)


def strip(rows):
    """Log rows without the timing column, NaN (no balancing loss) as a comparable value."""
    return [{k: "nan" if v != v else v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def assert_same_exports(state_a, state_b, steps=EXPORTS):
    for step in steps:
        a, b = exported(state_a, step), exported(state_b, step)
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        # bit equality is what we observe on CPU; report the size of any difference if it ever fails
        assert not unequal, (step, unequal[:3], max_difference(a, b))


def count_calls(model) -> list[int]:
    """Forward calls of each decoder layer of ``model``; a run's copy of a layer carries the hook, so
    its calls count too."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_a_sweep_ends_as_each_run_alone(token_files, tmp_path, family):
    model = deep(family).eval()  # the sweep trains in training mode and gives the model back as it was
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls = count_calls(model)
    states = [tmp_path / f"sweep-{lr}" for lr in LRS]
    results = sweep(model, token_files, states, [ssft() for _ in LRS], [settings(lr=lr) for lr in LRS])

    # the frozen layers ran once per micro-batch for all three runs, the top layers once per run
    assert calls == [STEPS * 2, STEPS * 2, 3 * STEPS * 2, 3 * STEPS * 2]
    # the start model is as it was given
    after = model.state_dict()
    assert after.keys() == start.keys() and all(torch.equal(after[k], start[k]) for k in start)
    assert all(p.requires_grad for p in model.parameters()) and not any(m.training for m in model.modules())

    for lr, state, result in zip(LRS, states, results):
        single = alone(deep(family), token_files, tmp_path / f"alone-{lr}", ssft(), settings(lr=lr))
        assert_same_exports(state, tmp_path / f"alone-{lr}")
        assert strip(result.log) == strip(single.log)
        assert (result.steps, result.tokens, result.final_loss, result.resumed_from, result.parameters) == \
               (single.steps, single.tokens, single.final_loss, single.resumed_from, single.parameters)
        # the load-balancing loss saw the router logits of all four layers, the shared ones included
        assert all(row["aux_loss"] > 0 for row in result.log)
    # the learning rates made three different models, each from its own copy
    final = [exported(state, STEPS) for state in states]
    router = "model.layers.3.mlp.gate.weight"
    assert not torch.equal(final[0][router], final[2][router])
    assert torch.equal(final[0]["model.layers.1.mlp.gate.weight"], start["model.layers.1.mlp.gate.weight"])


def test_lora_and_expert_runs_with_their_own_losses_share_a_pass(token_files, tmp_path):
    # LoRA on the last 2 layers, an expert run on the last layer only (layer 2 is then frozen in its own
    # copy), each with its own loss weights: z-loss without a balancing loss, and neither
    model = deep()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls = count_calls(model)
    lora = lambda: LoRATraining(LoRASettings(rank=4, alpha=8.0, layers=2, seed=1))
    last = lambda: ExpertSubset(experts={3: [2, 4]}, routers=[3])
    methods = (lora, last, last)
    run_settings = [settings(lr=4e-3, aux_loss_coef=0.0, z_loss_coef=1e-3), settings(lr=4e-3, aux_loss_coef=0.0),
                    settings(lr=1e-3, aux_loss_coef=0.05, checkpoint_every=3)]
    states = [tmp_path / f"sweep-{i}" for i in range(3)]
    results = sweep(model, token_files, states, [m() for m in methods], run_settings)
    assert calls == [STEPS * 2, STEPS * 2, 3 * STEPS * 2, 3 * STEPS * 2]
    # merging LoRA and folding the split experts back wrote into the runs' own copies only
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)
    for i, (method, run_settings_, result) in enumerate(zip(methods, run_settings, results)):
        single = alone(deep(), token_files, tmp_path / f"alone-{i}", method(), run_settings_)
        assert_same_exports(states[i], tmp_path / f"alone-{i}")
        assert strip(result.log) == strip(single.log)
        assert result.parameters == single.parameters
    assert all(r["z_loss"] > 0 for r in results[0].log) and "z_loss" not in results[1].log[0]
    # LoRA merged into a plain model: the keys of the original architecture's checkpoint
    export_model(deep(), None, tmp_path / "plain")
    assert exported(states[0], STEPS).keys() == load_file(str(tmp_path / "plain" / "model.safetensors")).keys()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_sweeps_as_alone(token_files, tmp_path, family):
    model = tiny_model(family, seed=3)
    last = ModelAdapter(model).moe_layers[-1].index  # DeepSeek-V3: a dense layer and an MoE layer below it
    method = lambda: ExpertSubset(experts={last: [0, 3]}, routers=[last], mask_router=True)
    run_settings = [settings(steps=3, lr=lr, checkpoint_every=0) for lr in (1e-3, 4e-3)]
    calls = count_calls(model)
    states = [tmp_path / f"sweep-{i}" for i in range(2)]
    results = sweep(model, token_files, states, [method(), method()], run_settings, steps=(3,))
    assert calls == [3 * 2] * last + [2 * 3 * 2] * (len(calls) - last)
    for i, (state, result) in enumerate(zip(states, results)):
        single = alone(tiny_model(family, seed=3), token_files, tmp_path / f"alone-{i}", method(), run_settings[i],
                       steps=(3,))
        assert_same_exports(state, tmp_path / f"alone-{i}", steps=(3,))
        assert strip(result.log) == strip(single.log)


def test_a_stopped_sweep_resumes_bit_identical(token_files, tmp_path):
    run_settings = [settings(lr=lr) for lr in LRS]
    whole_states = [tmp_path / f"whole-{lr}" for lr in LRS]
    whole = sweep(deep(), token_files, whole_states, [ssft() for _ in LRS], run_settings)

    states = [tmp_path / f"stopped-{lr}" for lr in LRS]
    first = sweep(deep(), token_files, states, [ssft() for _ in LRS], run_settings, stop_after=3)  # "killed"
    assert [r.steps for r in first] == [3] * 3 and all((s / "step-2").is_dir() for s in states)
    resumed = sweep(deep(), token_files, states, [ssft() for _ in LRS], run_settings)
    assert [r.resumed_from for r in resumed] == [2] * 3
    for a, b, ra, rb in zip(whole_states, states, whole, resumed):
        assert_same_exports(a, b)
        assert strip(ra.log) == strip(rb.log)


def test_runs_resuming_from_different_steps_join_the_sweep_at_their_own(token_files, tmp_path):
    # Run 0 starts over (no state), run 1 resumes from a state that train() alone left at step 4, run 2
    # from the sweep's own checkpoint at step 2: each ends as an uninterrupted run.
    run_settings = [settings(lr=lr) for lr in LRS]
    whole_states = [tmp_path / f"whole-{lr}" for lr in LRS]
    whole = sweep(deep(), token_files, whole_states, [ssft() for _ in LRS], run_settings)

    states = [tmp_path / f"mixed-{lr}" for lr in LRS]
    sweep(deep(), token_files, states[2:], [ssft()], run_settings[2:], stop_after=3)
    alone(deep(), token_files, states[1], ssft(), run_settings[1], stop_after=5)
    assert (states[1] / "step-4").is_dir() and (states[2] / "step-2").is_dir() and not states[0].exists()
    calls = count_calls(model := deep())
    resumed = sweep(model, token_files, states, [ssft() for _ in LRS], run_settings)
    assert [r.resumed_from for r in resumed] == [None, 4, 2]
    assert calls[0] == STEPS * 2  # one pass for all, from step 0
    for a, b, ra, rb in zip(whole_states, states, whole, resumed):
        assert_same_exports(a, b)
        assert strip(ra.log) == strip(rb.log)


def test_a_finished_run_is_not_trained_again(token_files, tmp_path):
    states = [tmp_path / "a", tmp_path / "b"]
    [done] = sweep(deep(), token_files, states[:1], [ssft()], [settings(lr=1e-3)])
    assert (states[0] / f"step-{STEPS}" / "state.json").is_file()  # the state holds the last step
    final = staged_path(states[0], f"step-{STEPS}") / "model.safetensors"
    written = final.stat().st_mtime_ns
    calls = count_calls(model := deep())
    again, other = sweep(model, token_files, states, [ssft(), ssft()], [settings(lr=1e-3), settings(lr=4e-3)])
    assert again.resumed_from == STEPS and strip(again.log) == strip(done.log) and again.tokens == done.tokens
    assert final.stat().st_mtime_ns == written  # its export was not made again
    assert other.resumed_from is None and calls[0] == STEPS * 2
    single = alone(deep(), token_files, tmp_path / "b-alone", ssft(), settings(lr=4e-3))
    assert_same_exports(states[1], tmp_path / "b-alone")
    assert strip(other.log) == strip(single.log)
    # train() alone reads the finished state the same way: nothing left to train
    result = alone(deep(), token_files, states[0], ssft(), settings(lr=1e-3))
    assert result.resumed_from == STEPS and strip(result.log) == strip(done.log)


@pytest.mark.parametrize("method", [FullTraining(), ExpertSubset(experts={3: [1]}, routers=[3], embeddings=True)],
                         ids=["full-ft", "embeddings"])
def test_a_method_training_outside_the_final_layers_is_refused(token_files, tmp_path, method):
    model = deep()
    with pytest.raises(MoelangError, match="cannot share a pass for this method .*train it alone with "
                                           "moelang.train.train") as error:
        sweep(model, token_files, [tmp_path / "a", tmp_path / "b"], [ssft(), method], [settings(), settings()])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any state is written
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("change, message", [
    ({"grad_accum": 1}, "training option grad_accum differs \\(\\[2, 1\\]\\)"),
    ({"seed": 1}, "training option seed differs"),
    ({"parallelism": "fsdp"}, "set parallelism: ddp for partial training"),
])
def test_runs_that_cannot_share_their_batches_are_refused(token_files, tmp_path, change, message):
    with pytest.raises(MoelangError, match=message):
        sweep(deep(), token_files, [tmp_path / "a", tmp_path / "b"], [ssft(), ssft()],
              [settings(), settings(**change)])


def test_a_sweep_runs_in_one_process_with_one_state_per_run(token_files, tmp_path, monkeypatch):
    with pytest.raises(MoelangError, match="sweep: runs share the state directory .*; give each run its own"):
        sweep(deep(), token_files, [tmp_path / "a", tmp_path / "a"], [ssft(), ssft()], [settings(), settings()])
    method = ssft()
    with pytest.raises(MoelangError, match="runs share one training method object"):
        sweep(deep(), token_files, [tmp_path / "a", tmp_path / "b"], [method, method], [settings(), settings()])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MoelangError, match="sweep: 2 processes .* start it without torchrun"):
        sweep(deep(), token_files, [tmp_path / "a"], [ssft()], [settings()])


def test_frozen_layers_with_dropout_are_refused(token_files, tmp_path):
    model = deep()
    model.config.attention_dropout = 0.1  # every attention draws a dropout mask in training
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(MoelangError, match="below decoder layer 2 draw random numbers in training"):
        sweep(model, token_files, [tmp_path / "a"], [ssft()], [settings()])


def with_top_dropout(model):
    """Attention dropout in the trained layers 2 and 3 only: each training forward draws random numbers there."""
    for layer in model.model.layers[2:]:
        layer.self_attn.attention_dropout = 0.2
    return model


def test_each_run_draws_its_own_random_numbers_above_the_boundary(token_files, tmp_path):
    # Alone, a run's dropout masks come from its own seeded generator; in the sweep the runs take turns,
    # and each must still draw the masks it would alone (also across a stop and a resume).
    run_settings = [settings(lr=lr, steps=4) for lr in LRS[1:]]
    states = [tmp_path / f"sweep-{i}" for i in range(2)]
    sweep(with_top_dropout(deep()), token_files, states, [ssft(), ssft()], run_settings, steps=(4,), stop_after=3)
    results = sweep(with_top_dropout(deep()), token_files, states, [ssft(), ssft()], run_settings, steps=(4,))
    assert [r.resumed_from for r in results] == [2, 2]
    for i, result in enumerate(results):
        single = alone(with_top_dropout(deep()), token_files, tmp_path / f"alone-{i}", ssft(), run_settings[i],
                       steps=(4,))
        assert_same_exports(states[i], tmp_path / f"alone-{i}", steps=(4,))
        assert strip(result.log) == strip(single.log)
    # the dropout is real: without it the same run ends elsewhere
    plain = alone(deep(), token_files, tmp_path / "plain", ssft(), run_settings[0], steps=(4,))
    assert strip(plain.log) != strip(results[0].log)


def test_the_log_reports_each_runs_loss(token_files, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="moelang"):
        sweep(deep(), token_files, [tmp_path / "lr-1e-4", tmp_path / "lr-4e-3"], [ssft(), ssft()],
              [settings(lr=1e-4), settings(lr=4e-3)])
    plan = [r.getMessage() for r in caplog.records if "share one pass" in r.getMessage()]
    assert plan and "decoder layers 0-1 (of 4)" in plan[0] and "layers 2-3" in plan[0]
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"sweep: step {STEPS}/{STEPS}")]
    assert last and "lr-1e-4 " in last[0] and "lr-4e-3 " in last[0]  # two runs: the best and the worst


def test_the_progress_line_is_compact_whatever_the_number_of_runs():
    """The step, the run count, the best and the worst run with their losses, the rate, the time left:
    one short line with 14 runs (the per-run numbers stay in the train logs)."""
    from moelang.sweep import best_and_worst, progress_line

    losses = [(f"{m}/lr-{lr:g}", 4.0 + i * 0.1) for i, (m, lr) in enumerate(
        (m, lr) for m in ("ssft", "seft", "seft_top4", "random", "random_hr", "aeft", "lora") for lr in (1e-3, 4e-3))]
    losses[5] = ("random/lr-0.004", 3.25)
    losses[9] = ("aeft/lr-0.004", 7.5)
    line = progress_line(12, 30, losses, 1234.5, 42.4)
    assert line == ("sweep: step 12/30, 14 runs, best random/lr-0.004 3.250, worst aeft/lr-0.004 7.500, "
                    "1,234 tokens/s each, about 42 s left")
    assert len(line) < 160 and line.count("/lr-") == 2
    # a diverged run (NaN) is the worst; ties go to the first; one run names itself
    assert best_and_worst([("a", 2.0), ("b", float("nan")), ("c", 2.0)]) == "best a 2.000, worst b nan"
    assert best_and_worst([("a", 2.0), ("c", 2.0)]) == "best a 2.000, worst a 2.000"
    assert best_and_worst([("a", 2.5)]) == "a 2.500"


def test_a_bf16_sweep_ends_as_each_run_alone(token_files, tmp_path, bf16_process):
    # bf16 autocast: the shared pass runs under the same autocast as each run's forward
    run_settings = [settings(steps=3, lr=lr, dtype="bf16", checkpoint_every=0) for lr in LRS[1:]]
    states = [tmp_path / f"sweep-{i}" for i in range(2)]
    results = sweep(deep(), token_files, states, [ssft(), ssft()], run_settings, steps=(3,))
    for i, result in enumerate(results):
        single = alone(deep(), token_files, tmp_path / f"alone-{i}", ssft(), run_settings[i], steps=(3,))
        assert_same_exports(states[i], tmp_path / f"alone-{i}", steps=(3,))
        assert strip(result.log) == strip(single.log)

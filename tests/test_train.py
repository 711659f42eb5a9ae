import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from families import tiny_model
from moelang.errors import MoelangError
from moelang.models import ModelAdapter, train_only
from moelang.tokenize import TOKENS_SCHEMA
from moelang.train import PackedStream, TrainSettings, lr_factor, packed_windows, train

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
    path = write_tokens(tmp_path / "t.parquet", docs + [[99, 98]], splits=["train"] * 4 + ["heldout"])
    windows = packed_windows(path, seq_len=3, eos_id=EOS, seed=4)
    # independent: the same seeded order, then a plain loop
    from moelang.train import _seed_for

    order = np.random.default_rng(_seed_for("doc-order", 4, "t.parquet")).permutation(4)
    stream = [t for i in order for t in docs[i] + [EOS]]
    expect = [stream[k:k + 3] for k in range(0, len(stream) - len(stream) % 3, 3)]
    assert windows.tolist() == expect
    assert 99 not in windows  # held-out documents never enter training


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    s = TrainSettings(steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, s) == 0.5 and lr_factor(1, s) == 1.0
    assert lr_factor(2, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(0.1)
    assert lr_factor(6, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_mixture_follows_the_weights(token_files):
    stream = PackedStream(token_files, {"en": 3, "es": 1}, seq_len=8, eos_id=EOS, seed=0)
    _, langs = stream.next_batch(4000)
    assert 0.72 < langs.count("en") / 4000 < 0.78


def settings(**kw):
    base = dict(steps=8, seq_len=16, micro_batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, weight_decay=0.1,
                checkpoint_every=3, seed=0, mixture={"en": 1, "es": 1})
    return TrainSettings(**(base | kw))


def run(token_files, state_dir, partial: bool, stop_after=None):
    model = tiny_model("olmoe", seed=3)
    if partial:  # SSFT-like: two experts and the router of the last layer
        adapter = ModelAdapter(model)
        last = adapter.moe_layers[-1].index
        train_only(adapter, experts={last: [0, 6]}, routers=[last])
    stream = PackedStream(token_files, {"en": 1, "es": 1}, seq_len=16, eos_id=EOS, seed=0)
    result = train(model, stream, settings(), state_dir, stop_after=stop_after)
    return model, result


@pytest.mark.parametrize("partial", [False, True])
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


def test_resume_with_another_process_count_is_refused(token_files, tmp_path):
    import json

    run(token_files, tmp_path / "s", False, stop_after=4)
    meta = tmp_path / "s" / "step-3" / "state.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"processes": 2}))
    with pytest.raises(MoelangError, match="made by 2 process\\(es\\), this run has 1; resume with 2"):
        run(token_files, tmp_path / "s", False)

"""The training engine under torchrun with 2 CPU processes (gloo): the launch path of multi-GPU rules.

Two processes with half the micro-batch each see the same global batches as one process, and DDP
averages their gradients (FSDP reduce-scatters them onto the shards): the weights must match the
single-process run up to float reduction order.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from moelang import config as cfg
from test_resume_cli import make_base
from test_train import patterned_docs, write_tokens

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("torchrun_train.py")


def options(micro_batch_size, parallelism="ddp"):
    # no load-balancing loss: it is not linear in the batch, so per-process halves would differ;
    # two micro-batches per step (gradient sync skipped on the first) and a clip norm below the
    # gradient norm, so that accumulation and clipping of sharded gradients are exercised
    return {"base": {"type": "train"}, "dtype": "float32", "device": "cpu", "experts_implementation": None, "seed": 0,
            "steps": [0, 12], "train": {"steps": 12, "seq_len": 16, "micro_batch_size": micro_batch_size, "lr": 0.005,
                                        "grad_accum": 2, "clip_norm": 0.5, "aux_loss_coef": 0.0, "checkpoint_every": 5,
                                        "parallelism": parallelism}}


def torchrun(*args, nproc=2):
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *map(str, args)],
                          capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, parallelism):
    from transformers import AutoModelForCausalLM

    make_base(tmp_path / "base")
    tokens = [str(write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))),
              str(write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1)))]
    common = ["--base", str(tmp_path / "base"), "--tokens", *tokens]
    one = subprocess.run([sys.executable, "-m", "moelang", "cpt", "--options", json.dumps(options(8)), *common,
                          "--out", str(tmp_path / "one"), "--state-dir", str(tmp_path / "s1")],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun("-m", "moelang", "cpt", "--options", json.dumps(options(4, parallelism)), *common,
                   "--out", tmp_path / "two", "--state-dir", tmp_path / "s2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert not (tmp_path / "s2").exists()  # checkpoints at steps 5 and 10 were written, then removed
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "step-12").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "step-12").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "step-0").state_dict()
    start_two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "step-0").state_dict()
    assert all(torch.equal(start[k], start_two[k]) for k in start)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and gap < 1e-4, (moved, gap)

    log_one = pq.read_table(tmp_path / "one" / "train_log.parquet").to_pylist()
    log_two = pq.read_table(tmp_path / "two" / "train_log.parquet").to_pylist()
    assert [r["tokens"] for r in log_one] == [r["tokens"] for r in log_two]
    assert [r["loss"] for r in log_one] == pytest.approx([r["loss"] for r in log_two], rel=1e-4)
    assert [r["grad_norm"] for r in log_one] == pytest.approx([r["grad_norm"] for r in log_two], rel=1e-4)
    assert max(r["grad_norm"] for r in log_one) > 0.5  # clipping took place


# --------------------------------------------------------------------------------------------------
# Resuming under FSDP: the engine under torchrun through tests/torchrun_train.py, which can stop a
# run right after a checkpoint (stop_after) as a killed job would.
# --------------------------------------------------------------------------------------------------

def run_engine(tmp_path, name, parallelism, stop_after=None, state=None, nproc=2):
    spec = {"tokens": {"en": str(tmp_path / "en.parquet"), "es": str(tmp_path / "es.parquet")},
            "settings": {"steps": 12, "seq_len": 16, "micro_batch_size": 4, "grad_accum": 2, "lr": 0.005,
                         "clip_norm": 0.5, "checkpoint_every": 5, "seed": 0, "mixture": {"en": 1, "es": 1},
                         "parallelism": parallelism},
            "state_dir": str(tmp_path / (state or f"state-{name}")), "out": str(tmp_path / name),
            "stop_after": stop_after}
    (tmp_path / f"{name}.spec.json").write_text(json.dumps(spec))
    done = torchrun(WORKER, tmp_path / f"{name}.spec.json", nproc=nproc)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp_path / f"{name}.json").read_text()) if stop_after is None else None


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    """Token files and an uninterrupted 2-process FSDP run (with the load-balancing loss)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))
    write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1))
    result = run_engine(tmp_path, "whole", "fsdp")
    return tmp_path, result, load_file(str(tmp_path / "whole" / "model.safetensors"))


def strip(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_sharded_layout(checkpoint, processes=2):
    """An FSDP checkpoint is written by every process: its own shard of each tensor (FSDP2 cuts along
    the first dimension as torch.chunk does), and no whole-tensor file."""
    from families import tiny_model

    from moelang.train import read_whole_tensors, shard_file

    names = sorted(p.name for p in checkpoint.iterdir())
    shards = [shard_file(kind, rank, processes) for kind in ("optimizer", "trainable") for rank in range(processes)]
    assert names == sorted(shards + ["rng.safetensors", "state.json", "train_log.parquet"]), names
    model = dict(tiny_model("olmoe", seed=3).named_parameters())
    for rank in range(processes):
        part = load_file(str(checkpoint / shard_file("trainable", rank, processes)))
        assert part.keys() == model.keys()
        for name, param in model.items():  # an independent computation of this process's rows
            assert part[name].shape == torch.chunk(torch.empty(param.shape), processes)[rank].shape, name
        share = sum(t.numel() for t in part.values()) / sum(p.numel() for p in model.values())
        assert abs(share - 1 / processes) < 0.02, share
        moments = load_file(str(checkpoint / shard_file("optimizer", rank, processes)))
        assert all(moments[f"{name}.exp_avg"].shape == part[name].shape for name in model)
    whole = read_whole_tensors(checkpoint, "trainable")
    assert {k: v.shape for k, v in whole.items()} == {k: p.shape for k, p in model.items()}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_killed_fsdp_run_resumes_to_bit_identical_weights(fsdp_reference):
    tmp_path, whole, weights = fsdp_reference
    run_engine(tmp_path, "killed", "fsdp", stop_after=7)
    assert_sharded_layout(tmp_path / "state-killed" / "step-5")
    assert not (tmp_path / "killed").exists()
    shutil.copytree(tmp_path / "state-killed", tmp_path / "state-to-ddp")
    resumed = run_engine(tmp_path, "killed", "fsdp")
    assert resumed["resumed_from"] == 5
    again = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert strip(whole["log"]) == strip(resumed["log"])
    assert not (tmp_path / "state-killed").exists()
    # the shards join into whole tensors: the same checkpoint resumes under DDP (equal up to the order
    # of float sums; wrongly joined shards would differ by the size of the weights)
    to_ddp = run_engine(tmp_path, "to-ddp", "ddp", state="state-to-ddp")
    assert to_ddp["resumed_from"] == 5
    under_ddp = load_file(str(tmp_path / "to-ddp" / "model.safetensors"))
    assert max(float((weights[k] - under_ddp[k]).abs().max()) for k in weights) < 1e-5
    assert [r["loss"] for r in whole["log"]] == pytest.approx([r["loss"] for r in to_ddp["log"]], rel=1e-5)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_a_ddp_checkpoint_resumes_under_fsdp(fsdp_reference):
    # checkpoints hold whole tensors keyed by parameter name under either parallelism
    tmp_path, whole, weights = fsdp_reference
    run_engine(tmp_path, "ddp", "ddp", stop_after=7, state="state-mixed")
    resumed = run_engine(tmp_path, "mixed", "fsdp", state="state-mixed")
    assert resumed["resumed_from"] == 5
    again = load_file(str(tmp_path / "mixed" / "model.safetensors"))
    assert max(float((weights[k] - again[k]).abs().max()) for k in weights) < 1e-5
    assert [r["loss"] for r in whole["log"]] == pytest.approx([r["loss"] for r in resumed["log"]], rel=1e-5)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_four_processes_resume_to_bit_identical_weights(tmp_path, parallelism):
    # With more than 2 processes the all-reduce (DDP) or reduce-scatter (FSDP) sums each element in an
    # order that depends on its place in the communication buffer; a resumed run must lay the buffers out
    # as the uninterrupted run does at that step (DDP: no bucket rebuild after the first iteration).
    write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))
    write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1))
    whole = run_engine(tmp_path, "whole", parallelism, nproc=4)
    run_engine(tmp_path, "killed", parallelism, stop_after=7, nproc=4)
    resumed = run_engine(tmp_path, "killed", parallelism, nproc=4)
    assert resumed["resumed_from"] == 5
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap == 0.0, gap
    assert strip(whole["log"]) == strip(resumed["log"])


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not TORCHRUN.exists() or not Path("/proc/self/stat").exists(),
                    reason="torchrun is not installed, or no /proc to find its workers")
def test_workers_die_with_their_launcher(tmp_path):
    # torch elastic starts each worker in a session of its own: killing the job's process group kills the
    # launcher only. The workers must not go on training (and writing the state) without it.
    write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))
    spec = {"tokens": {"en": str(tmp_path / "en.parquet")},
            "settings": {"steps": 1_000_000, "seq_len": 16, "micro_batch_size": 4, "checkpoint_every": 0, "seed": 0},
            "state_dir": str(tmp_path / "state"), "out": str(tmp_path / "out"), "stop_after": None}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launcher = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER),
                                 str(tmp_path / "spec.json")], stdout=subprocess.DEVNULL,
                                stderr=(tmp_path / "stderr.txt").open("w"), env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    workers = []
    try:
        lock = tmp_path / "state.lock"
        deadline = time.time() + 180
        while time.time() < deadline and launcher.poll() is None:
            workers = children(launcher.pid)
            if len(workers) == 2 and lock.is_file() and lock.read_text().startswith("pid"):
                break  # both workers started, the first one is training
            time.sleep(0.1)
        if launcher.poll() is not None:
            pytest.skip(f"torchrun could not start its workers here (exit {launcher.returncode}): "
                        f"{(tmp_path / 'stderr.txt').read_text()[-300:]}")
        assert len(workers) == 2 and lock.is_file(), "the workers did not start training in 180 s"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 5
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "workers outlived their launcher"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_launcher_uses_torchrun_for_several_gpus():
    config = cfg.validate({"languages": {"high_resource": ["en"], "targets": {"ca": "en"}},
                           "allocation": {"new_experts": 2}, "resources": {"cpt": {"gpu": 4}}})
    assert cfg.launcher(config, "cpt") == "torchrun --standalone --nproc_per_node 4 -m moelang"
    assert cfg.launcher(config, "pretrain_base") == "python -m moelang"

"""The training engine under torchrun with 2 CPU processes (gloo): the launch path of multi-GPU rules.

Two processes with half the micro-batch each see the same global batches as one process, and DDP
averages their gradients: the weights must match the single-process run up to float reduction order.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moelang import config as cfg
from test_resume_cli import make_base
from test_train import patterned_docs, write_tokens

TORCHRUN = Path(sys.executable).with_name("torchrun")


def options(micro_batch_size):
    # no load-balancing loss: it is not linear in the batch, so per-process halves would differ
    return {"base": {"type": "train"}, "dtype": "float32", "device": "cpu", "experts_implementation": None, "seed": 0,
            "steps": [0, 12], "train": {"steps": 12, "seq_len": 16, "micro_batch_size": micro_batch_size, "lr": 0.005,
                                        "aux_loss_coef": 0.0, "checkpoint_every": 5}}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_process_ddp_equals_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    make_base(tmp_path / "base")
    tokens = [str(write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))),
              str(write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1)))]
    common = ["--base", str(tmp_path / "base"), "--tokens", *tokens]
    one = subprocess.run([sys.executable, "-m", "moelang", "cpt", "--options", json.dumps(options(8)), *common,
                          "--out", str(tmp_path / "one"), "--state-dir", str(tmp_path / "s1")],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "moelang", "cpt",
                          "--options", json.dumps(options(4)), *common, "--out", str(tmp_path / "two"),
                          "--state-dir", str(tmp_path / "s2")], capture_output=True, text=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "step-12").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "step-12").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "step-0").state_dict()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and gap < 1e-4, (moved, gap)
    import pyarrow.parquet as pq

    log_one = pq.read_table(tmp_path / "one" / "train_log.parquet").to_pylist()
    log_two = pq.read_table(tmp_path / "two" / "train_log.parquet").to_pylist()
    assert [r["tokens"] for r in log_one] == [r["tokens"] for r in log_two]
    assert [r["loss"] for r in log_one] == pytest.approx([r["loss"] for r in log_two], rel=1e-4)


def test_launcher_uses_torchrun_for_several_gpus():
    config = cfg.validate({"languages": {"high_resource": ["en"]}, "allocation": {"new_experts": 2},
                           "resources": {"cpt": {"gpu": 4}}})
    assert cfg.launcher(config, "cpt") == "torchrun --standalone --nproc_per_node 4 -m moelang"
    assert cfg.launcher(config, "pretrain_base") == "python -m moelang"

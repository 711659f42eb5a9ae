"""A CPT job killed mid-run (SIGKILL) and started again ends with the weights of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from families import tiny_model
from moelang.tokenize import EOS_TOKEN, PAD_TOKEN
from test_train import patterned_docs, write_tokens


def make_base(path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("olmoe", seed=5)
    vocab = {PAD_TOKEN: 0, "t1": 1, EOS_TOKEN: 2} | {f"t{i}": i for i in range(3, model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def cpt_command(base, tokens, out, state, steps):
    options = {"base": {"type": "train"}, "dtype": "float32", "device": "cpu", "experts_implementation": None,
               "seed": 0, "steps": [0, steps // 2, steps],
               "train": {"steps": steps, "seq_len": 16, "micro_batch_size": 4, "lr": 0.005, "checkpoint_every": 5}}
    return [sys.executable, "-m", "moelang", "cpt", "--options", json.dumps(options), "--base", str(base),
            "--tokens", *map(str, tokens), "--out", str(out), "--state-dir", str(state)]


def test_killed_cpt_job_resumes_to_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    make_base(tmp_path / "base")
    tokens = [write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0)),
              write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1))]
    steps = 200
    subprocess.run(cpt_command(tmp_path / "base", tokens, tmp_path / "whole", tmp_path / "s1", steps), check=True,
                   capture_output=True)

    proc = subprocess.Popen(cpt_command(tmp_path / "base", tokens, tmp_path / "killed", tmp_path / "s2", steps),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "s2").glob("step-*/state.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not list((tmp_path / "s2").glob("step-*/state.json")):
        pytest.fail("the job finished or failed before its first checkpoint")
    assert not (tmp_path / "killed" / f"step-{steps}").exists()
    rerun = subprocess.run(cpt_command(tmp_path / "base", tokens, tmp_path / "killed", tmp_path / "s2", steps),
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stderr
    for step in (0, steps // 2, steps):
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / f"step-{step}").state_dict()
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / f"step-{step}").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), step

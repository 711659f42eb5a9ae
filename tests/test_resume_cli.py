"""A CPT job killed mid-run (SIGKILL) and started again ends with the weights of an uninterrupted run;
after a change of its inputs it starts over; a second job on the same training state stops at once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from families import tiny_model
from moelang.tokenize import EOS_TOKEN, PAD_TOKEN
from test_train import patterned_docs, write_tokens


def make_base(path, seed=5):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("olmoe", seed=seed)
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


def kill_after_first_checkpoint(command, state):
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(state.glob("step-*/state.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not list(state.glob("step-*/state.json")):
        pytest.fail("the job finished or failed before its first checkpoint")


def test_killed_cpt_job_resumes_to_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    make_base(tmp_path / "base")
    tokens = [write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0)),
              write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1))]
    steps = 200
    subprocess.run(cpt_command(tmp_path / "base", tokens, tmp_path / "whole", tmp_path / "s1", steps), check=True,
                   capture_output=True)

    kill_after_first_checkpoint(cpt_command(tmp_path / "base", tokens, tmp_path / "killed", tmp_path / "s2", steps),
                                tmp_path / "s2")
    assert not (tmp_path / "killed" / f"step-{steps}").exists()
    rerun = subprocess.run(cpt_command(tmp_path / "base", tokens, tmp_path / "killed", tmp_path / "s2", steps),
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stderr
    for step in (0, steps // 2, steps):
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / f"step-{step}").state_dict()
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / f"step-{step}").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), step


def test_a_killed_cpt_job_whose_base_changed_starts_over(tmp_path):
    # The user's case: killed during CPT, an input changed (here the base model's weights), run again.
    from transformers import AutoModelForCausalLM

    make_base(tmp_path / "base")
    tokens = [write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0)),
              write_tokens(tmp_path / "es.parquet", patterned_docs(300, 1))]
    steps = 100
    kill_after_first_checkpoint(cpt_command(tmp_path / "base", tokens, tmp_path / "out", tmp_path / "s", steps),
                                tmp_path / "s")
    make_base(tmp_path / "base", seed=6)  # rebuilt from other inputs
    rerun = subprocess.run(cpt_command(tmp_path / "base", tokens, tmp_path / "out", tmp_path / "s", steps),
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" not in rerun.stderr
    discarded = [line for line in rerun.stderr.splitlines() if "discarding the state" in line]
    assert len(discarded) == 1 and "inputs changed (start model weights)" in discarded[0], discarded
    new_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    step0 = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "step-0").state_dict()
    assert all(torch.equal(new_base[k], step0[k]) for k in new_base)
    assert not (tmp_path / "s").exists()


def test_a_second_job_on_the_same_state_stops_at_once(tmp_path):
    make_base(tmp_path / "base")
    tokens = [write_tokens(tmp_path / "en.parquet", patterned_docs(300, 0))]
    command = cpt_command(tmp_path / "base", tokens, tmp_path / "out", tmp_path / "s", 100_000)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "s.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().startswith("pid")) and time.time() < deadline:
            assert first.poll() is None, "the first job ended"
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("moelang: error:")]
        assert len(errors) == 1 and f"training state {tmp_path / 's'} is being written by pid {first.pid}" in errors[0]
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first job goes on
    finally:
        first.kill()
        first.wait()


def test_a_hub_base_is_fingerprinted_by_the_commit_it_resolved_to(tmp_path):
    # a branch such as main moves; the snapshot's commit in the hub cache names the files exactly
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    code = "from moelang.basemodel import _source; print(_source('org/tiny', None), _source('org/none', 'v1'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert done.stdout.split("} {") == ["{'start model hub id': 'org/tiny@default branch (commit 0123abcd)'",
                                        "'start model hub id': 'org/none@v1 (commit unknown)'}\n"]

"""The workflow's fast stages on a real (single-node) SLURM cluster.

Run by tests/cluster/run.sh, which brings the cluster up (tests/cluster/slurm.sh) and sets
MOELANG_SLURM_STATE; without it these tests are skipped.
"""

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STATE = os.environ.get("MOELANG_SLURM_STATE")
pytestmark = pytest.mark.skipif(not STATE, reason="no SLURM cluster (tests/cluster/run.sh starts one)")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: .*/rule_(\w+?)/")


def make_workdir(path: Path) -> Path:
    rng = random.Random(0)
    words = "el gat menja peix la casa és gran però avui plou molt al carrer de la ciutat".split()
    (path / "ca.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                                           for _ in range(400)))
    config = {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
              "corpus": {"min_chars": 2000, "builtin": {"packages": ["Django"], "english_prose": []},
                         "sources": {"ca": {"type": "local", "path": str(path / "ca.txt")}}},
              "tokenizer": {"vocab_size": 500}, "allocation": {"new_experts": 3},
              "resources": {"gpus": False, "default": {"mem_mb": 1000, "runtime": 10}}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def command(work: Path, *extra: str) -> list[str]:
    return ["timeout", "--foreground", "-s", "INT", "-k", "60", "600", SNAKEMAKE,
            "--profile", str(REPO / "workflow" / "profiles" / "slurm"), "--snakefile", str(REPO / "workflow" / "Snakefile"),
            "--directory", str(work), "--configfile", str(work / "config.yaml"),
            "--slurm-init-seconds-before-status-checks", "5", "--seconds-between-status-checks", "3",
            *extra, "results/overlap/overlap.parquet"]


def completed_slurm_jobs() -> dict[str, str]:
    """SLURM job id -> final state, from the job-completion log (accounting is off)."""
    states = {}
    path = Path(STATE) / "log" / "jobcomp.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        states[fields.get("JobId")] = fields.get("JobState")
    return states


def test_every_job_goes_through_sbatch_and_completes(tmp_path):
    work = make_workdir(tmp_path)
    proc = subprocess.run(command(work), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted = SUBMITTED.findall(proc.stdout + proc.stderr)
    rules = sorted(rule for _, rule in submitted)
    assert rules == sorted(["corpus"] * 3 + ["corpus_summary", "tokenizer"] + ["tokenize"] * 3 + ["overlap"])
    time.sleep(2)
    states = completed_slurm_jobs()
    assert all(states.get(job_id) == "COMPLETED" for job_id, _ in submitted), states
    assert (work / "results" / "overlap" / "overlap.parquet").is_file()


def test_cancelled_job_is_redone_and_nothing_else(tmp_path):
    work = make_workdir(tmp_path)
    proc = subprocess.Popen(command(work, "--retries", "0"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancelled = None
    output = []
    for line in proc.stdout:
        output.append(line)
        match = SUBMITTED.search(line)
        if match and match.group(2) == "tokenize" and cancelled is None:
            # two-CPU tokenize jobs run one at a time here: a newly submitted one is still pending
            seen = sum(1 for l in output if "rule_tokenize/" in l and "submitted" in l)
            if seen == 3:
                cancelled = match.group(1)
                subprocess.run(["scancel", cancelled], check=True)
    proc.wait()
    assert cancelled is not None, "".join(output)[-3000:]
    assert proc.returncode != 0  # the cancelled job failed the run
    assert not (work / "results" / "overlap" / "overlap.parquet").exists()
    subprocess.run([SNAKEMAKE, "--unlock", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(work),
                    "--configfile", str(work / "config.yaml")], capture_output=True)
    rerun = subprocess.run(command(work, "--rerun-incomplete"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rules = sorted(rule for _, rule in SUBMITTED.findall(rerun.stdout + rerun.stderr))
    assert "corpus" not in rules and "tokenizer" not in rules  # finished work is kept
    assert rules.count("tokenize") >= 1 and rules.count("overlap") == 1
    assert (work / "results" / "overlap" / "overlap.parquet").is_file()

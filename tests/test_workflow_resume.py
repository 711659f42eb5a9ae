"""The workflow as a user starts it from another directory: the local profile is found next to the
Snakefile, and a run killed in the middle of a training job resumes when started again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_test_config

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SNAKEFILE = str(REPO / "workflow" / "Snakefile")


def tiny_config(work: Path) -> Path:
    """.test/config-resume.yaml in ``work``, under a name with a space (every path is quoted)."""
    return copy_test_config("resume", work, dest="my config.yaml")


def run(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, env=env, **kw)


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == directory:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_the_local_profile_is_found_from_the_clone_and_from_elsewhere(tmp_path):
    config = tiny_config(tmp_path)
    for cwd, extra in ((REPO, ["--directory", str(tmp_path)]), (tmp_path, [])):
        proc = run(cwd, "--snakefile", SNAKEFILE, "--configfile", str(config), "--dry-run", *extra, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"workflow specific profile {REPO / 'workflow' / 'profiles' / 'default'}" in proc.stdout + proc.stderr


def test_a_workflow_profile_that_does_not_exist_is_an_error_not_ignored(tmp_path):
    config = tiny_config(tmp_path)
    proc = run(tmp_path, "--snakefile", SNAKEFILE, "--configfile", str(config), "--workflow-profile",
               "workflow/profiles/default", "--dry-run", timeout=120)
    assert proc.returncode != 0
    line = [l for l in proc.stderr.splitlines() if l.startswith("moelang: error:")]
    assert line and "--workflow-profile 'workflow/profiles/default' does not exist" in line[0]


@pytest.mark.slow
def test_a_run_killed_during_training_resumes_from_another_directory(tmp_path):
    config = tiny_config(tmp_path)
    args = [SNAKEMAKE, "--snakefile", SNAKEFILE, "--configfile", str(config), "--cores", "2", "results/models/base"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        state = tmp_path / "results" / "state" / "pretrain"
        deadline = time.time() + 300
        while time.time() < deadline and not any(state.glob("step-*/state.json")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        assert any(state.glob("step-*/state.json")), "no training checkpoint appeared"
        os.killpg(proc.pid, signal.SIGKILL)  # what a node failure or `kill -9` of the job does
        proc.wait()
    time.sleep(1)
    assert not processes_in(tmp_path), "a job of the killed run is still running"
    assert not (tmp_path / "results" / "models" / "base" / "config.json").exists()
    # A killed Snakemake leaves its lock (it says so and how to remove it); the killed job's output is
    # marked incomplete, which the profile's rerun-incomplete redoes.
    assert run(tmp_path, *args[1:], "--unlock", timeout=120).returncode == 0
    again = run(tmp_path, *args[1:], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "results" / "logs" / "models" / "pretrain.log").read_text()
    assert "training: resuming from" in log
    assert (tmp_path / "results" / "models" / "base" / "model.safetensors").is_file()

"""The workflow held to Snakemake's own standards: `snakemake --lint` finds nothing and snakefmt
would change nothing (.ci/run runs both too; these tests make `make test` catch a regression)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, copy_test_config

BIN = Path(sys.executable).parent


def lint(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(BIN / "snakemake"), "--lint", "--snakefile", str(REPO / "workflow" / "Snakefile"),
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", ["config/config.yaml", ".test/config-tiny.yaml"])
def test_snakemake_lint_reports_nothing(config, tmp_path):
    # the default (one job per stage) and the tiny config (the sharded rules) define different rules;
    # the tiny one runs in a work directory that holds its data files, as the tests run it
    if config.startswith(".test/"):
        path = copy_test_config(Path(config).stem.removeprefix("config-"), tmp_path)
        proc = lint("--configfile", str(path), "--directory", str(tmp_path))
    else:
        proc = lint("--configfile", config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in out


def test_snakefmt_would_change_nothing():
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", "--diff", "workflow/"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

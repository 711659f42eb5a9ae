"""The workflow's start-up memory check: a paper config that cannot fit its GPUs stops before any job,
in one line naming the stage, the estimate, the limit and the settings to change."""

import os
import subprocess

import yaml

from conftest import REPO, SNAKEMAKE


def test_a_config_that_cannot_fit_stops_before_any_job(tmp_path):
    config = yaml.safe_load((REPO / "config" / "olmoe-m7.yaml").read_text())
    # CPT as a DDP replica on one GPU: 6.9B parameters with bf16 gradients and AdamW moments
    config["model"]["cpt"]["train"].update(parallelism="ddp", activation_checkpointing=False)
    config["resources"]["cpt"] = {"gpu": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # the config check reads no weights; without the offline switch a hub id missing from the cache is
    # left for the jobs, as on a cluster node that reaches the hub
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "-n"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("moelang: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    line = errors[0]
    assert "stage cpt" in line and "its GPU's 80 GB" in line and "GB per GPU" in line
    assert "micro_batch_size" in line and "activation_checkpointing" in line and "resources.cpt.gpu" in line
    assert not (tmp_path / "results").exists()  # nothing ran

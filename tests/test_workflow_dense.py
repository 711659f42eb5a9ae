"""The whole DAG on a tiny dense Llama-family base: no routing stage, LayerMoE upcycles it (paper B's setting)."""

import json

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from conftest import copy_test_config
from test_workflow import snakemake

VARIANTS = ["layermoe", "uniform", "layermoe-no-classifier"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dense")
    copy_test_config("dense", work)  # the variants in the file's order
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_a_dense_base_is_upcycled_trained_and_evaluated(dense_run):
    from transformers import AutoModelForCausalLM

    import moelang.models  # noqa: F401 (registers the expanded classes)
    from moelang.expand import RUNS_SCHEMA

    work = dense_run
    results = work / "results"
    assert not (results / "routing").exists()  # nothing to profile in a dense model
    plan = json.loads((results / "allocation" / "plan.json").read_text())
    assert "routing" in plan["_meta"]["failed"]  # no specialisation scores without the routing stage
    runs = pl.read_parquet(results / "expand" / "runs.parquet")
    assert pq.read_schema(results / "expand" / "runs.parquet").equals(RUNS_SCHEMA)
    assert runs["variant"].to_list() == VARIANTS
    for row in runs.iter_rows(named=True):
        entry = plan[row["plan"]]
        assert row["experts_per_layer"] == entry["experts_per_layer"]  # LayerMoE counts the original FFN
        assert row["new_experts"] == sum(entry["new_experts_per_layer"]) == 32
        assert row["classifier_layers"] == ([0, 2] if row["variant"] == "layermoe" else [])
    # the ablation's stage 2 starts from layermoe's stage 1 (trained once)
    assert not (results / "expand" / "layermoe-no-classifier" / "stage1").exists()
    start = json.loads((results / "expand" / "layermoe" / "stage0" / "expansion.json").read_text())["start_ref"]
    dense = AutoModelForCausalLM.from_pretrained(work / start).state_dict()
    stage2 = AutoModelForCausalLM.from_pretrained(results / "expand" / "layermoe" / "stage2")
    assert stage2.config.model_type == "layermoe_llama" and stage2.config.classifier_layers == [0, 2]
    weights = stage2.state_dict()
    for i, count in enumerate(plan["layermoe"]["experts_per_layer"]):
        if count == 1:  # a dense layer stays the dense FFN
            assert torch.equal(weights[f"model.layers.{i}.mlp.down_proj.weight"],
                               dense[f"model.layers.{i}.mlp.down_proj.weight"])
            continue
        fused = torch.cat([dense[f"model.layers.{i}.mlp.gate_proj.weight"], dense[f"model.layers.{i}.mlp.up_proj.weight"]])
        assert torch.equal(weights[f"model.layers.{i}.mlp.experts.gate_up_proj"][0], fused)  # expert 0: the FFN
        assert torch.equal(weights[f"model.layers.{i}.mlp.experts.down_proj"][0],
                           dense[f"model.layers.{i}.mlp.down_proj.weight"])
    evaluated = set(pl.read_parquet(results / "eval" / "results.parquet")["model"])
    assert {f"expand-{v}" for v in VARIANTS} <= evaluated
    expansion = pl.read_parquet(results / "eval" / "expansion.parquet")
    assert set(expansion["variant"]) == set(VARIANTS)


def test_a_finished_run_with_the_expansion_has_nothing_to_do(dense_run):
    """A finished run is a fixed point, the stages after the corpus and allocation checkpoints included:
    the expansion's gather, the summary and the report once ran again on every call (a job whose params
    read a checkpoint, with the checkpoint named as a plain path among its inputs, was marked changed in
    Snakemake's first pass, and the jobs after it kept the mark; common.smk's corpus_checkpoint)."""
    proc = snakemake(dense_run, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

"""The whole DAG on a tiny dense Llama-family base: no routing stage, LayerMoE upcycles it (paper B's setting)."""

import json

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import write_lines
from test_workflow import snakemake

VARIANTS = ["layermoe", "uniform", "layermoe-no-classifier"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dense")
    words = "el gat menja peix la casa és gran però avui plou molt al carrer de la ciutat".split()
    rng = __import__("random").Random(1)
    ca = write_lines(work / "data" / "ca.txt", [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                                                for _ in range(400)])
    train = {"seq_len": 32, "micro_batch_size": 4, "lr": 0.01}
    config = {
        "languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
        "corpus": {"min_chars": 2000, "builtin": {"packages": ["Django"], "english_prose": []},
                   "sources": {"ca": {"type": "local", "path": str(ca)}}},
        "tokenizer": {"vocab_size": 500},
        "model": {
            "base": {"type": "train", "architecture": {
                "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}},
            "pretrain": {"steps": 6, **train},
            "cpt": {"n_checkpoints": 2, "train": {"steps": 4, **train}},
        },
        "routing": {"enabled": False},
        "allocation": {"new_experts": 6, "classifier_layers": [0, 2]},
        "adapt": {"enabled": False},
        "expand": {"enabled": True,
                   "variants": {"layermoe": {"plan": "layermoe", "classifier": True},
                                "uniform": {"plan": "uniform", "classifier": False},
                                "layermoe-no-classifier": {"plan": "layermoe", "classifier": False}},
                   "stage1": {"steps": 3, **train}, "stage2": {"steps": 3, **train}},
        "evaluation": {"tasks": ["synthetic_blimp"], "max_items": 20, "min_items": 5, "batch_size": 8,
                       "max_words": 12},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # variants in this order
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
        assert row["new_experts"] == sum(entry["new_experts_per_layer"]) == 6
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

"""The paper-scale rehearsals cut down far enough to run in CI (the issue's "a layer or two, a few
hundred tokens"): ``rehearsal/<name>.yaml`` with the overrides below, on stand-ins of one decoder layer
at the real widths (OLMoE-1B-7B: hidden 2,048, 64 experts of width 1,024, top-8, vocabulary 50,304;
Qwen1.5-1.8B: hidden 2,048, FFN 5,504, vocabulary 151,936; bf16, sharded safetensors), through
Snakemake up to the stages whose code depends on those shapes. ``make rehearse`` runs the whole DAG
at two and four layers; this catches a break at these shapes on every CI run.

What each cut-down run must still do, and is checked here: route a 2,048-token stream window over 64
experts, choose expert sets over 64 experts and train one method of each training path (an expert
subset with the router mask, every expert of the layer, the whole model, LoRA) from bf16 weights with
fp32 master weights, upcycle the Qwen1.5-width dense layer into a LayerMoE layer and train both
stages with the router classifier, and score a model with lm-eval on the Belebele and MultiBLiMP
mirrors laid out like the hub datasets.
"""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors import safe_open

from conftest import REPO, snakemake

# name -> (the paper config the stand-ins copy, dotted overrides of rehearsal/<name>.yaml, targets)
CI_FORMS = {
    "olmoe": ("config/olmoe-m7.yaml", {
        "languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}, "base": "en"},
        "corpus.sources": {lang: {"type": "local", "path": f"inputs/corpus/{lang}.parquet", "format": "parquet",
                                  "text_column": "text"} for lang in ("en", "es", "ca")},
        # the CPT and the expansion of the full rehearsal are left out here: full training at this width
        # is full-ft's, and the Qwen form below upcycles and trains both LayerMoE stages
        "model.cpt.enabled": False, "expand.enabled": False,
        "routing.final_layers": 1,           # one layer: it is the final one
        # one method per training path: an expert subset with the router mask, every expert of the
        # layer, the whole model, LoRA (seft, random and random_hr are subsets chosen otherwise)
        "adapt.methods": ["ssft", "aeft", "full-ft", "lora"],
        "adapt.learning_rates": [0.0001], "adapt.train.steps": 1, "adapt.train.seq_len": 128,
        "adapt.job_per": "target",           # one job: the model is loaded once for all the methods
        "evaluation.tokens_per_language": 256, "evaluation.limit": 1,
    }, ["results/adapt/runs.parquet",
        *(f"results/eval/adapt-ca-ssft/{f}" for f in ("belebele.json", "multiblimp.json", "perplexity.parquet"))]),
    "qwen": ("config/layermoe-qwen.yaml", {
        # the base and the target (zh's SkyPile layout is checked in tests/test_rehearsal.py)
        "languages": {"high_resource": ["en"], "targets": {"el": "en"}, "base": "en"},
        "corpus.sources": {lang: {"type": "local", "path": f"inputs/corpus/{lang}.parquet", "format": "parquet",
                                  "text_column": "text"} for lang in ("en", "el")},
        "allocation.new_experts": 2, "allocation.classifier_layers": [0],
        "similarity.tokens_per_language": 256,
        "expand.variants": {"layermoe": {"plan": "layermoe", "classifier": True}},
        "expand.stage1.steps": 1, "expand.stage1.seq_len": 128,
        "expand.stage2.steps": 1, "expand.stage2.seq_len": 128,
        "evaluation.tokens_per_language": 256, "evaluation.limit": 1,
    }, [f"results/eval/expand-layermoe/{f}" for f in ("belebele.json", "perplexity.parquet")]),
}


# overrides of keys the rehearsal leaves at the workflow's default
ADDED = ("expand.variants",)


def set_dotted(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    if last not in config and key not in ADDED:
        raise KeyError(f"{key}: not a key of the rehearsal config (a stale override)")
    config[last] = value


@pytest.fixture(scope="module", params=sorted(CI_FORMS))
def cut_run(request, tmp_path_factory):
    from moelang.rehearsal import make_standins, read_paper_config

    name = request.param
    paper, overrides, targets = CI_FORMS[name]
    work = tmp_path_factory.mktemp(f"rehearsal-{name}")
    config = yaml.safe_load((REPO / "rehearsal" / f"{name}.yaml").read_text())
    for key, value in overrides.items():
        set_dotted(config, key, value)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    standin_config = read_paper_config(REPO / paper)
    standin_config["languages"] = config["languages"]  # stand-ins for the languages run only
    make_standins(standin_config, work / "inputs", layers=1)
    proc = snakemake(work, "--printshellcmds", *targets, timeout=900)  # (an option ends --configfile's list)
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield name, work
    shutil.rmtree(work)  # 5 to 6 GB of models at these widths: not left for pytest's kept temporary dirs


def test_the_cut_down_rehearsal_runs_at_the_real_widths(cut_run):
    name, work = cut_run
    model_config = json.loads((work / "inputs" / "model" / "config.json").read_text())
    assert model_config["hidden_size"] == 2048 and model_config["num_hidden_layers"] == 1
    with open(work / "inputs" / "model" / "model.safetensors.index.json") as f:  # sharded, as on the hub
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1
    if name == "olmoe":
        assert model_config["num_experts"] == 64 and model_config["num_experts_per_tok"] == 8
        runs = pq.read_table(work / "results" / "adapt" / "runs.parquet").to_pylist()
        assert {r["method"] for r in runs} == {"ssft", "aeft", "full-ft", "lora"}
        for run in runs:
            assert run["layers"] == [0] and all(0 <= n <= 64 for n in run["experts_per_layer"])
        aeft = next(r for r in runs if r["method"] == "aeft")
        assert aeft["experts_per_layer"] == [64] and aeft["trained"]
        full = next(r for r in runs if r["method"] == "full-ft")
        assert full["trainable_params"] == full["total_params"]
        # the selected model is exported in the loaded dtype (bf16), not the fp32 of its master weights
        selected = work / "results" / "adapt" / "ca" / "ssft" / "selected"
        dtypes = set()
        for shard in selected.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dtypes == {"BF16"}
        eval_dir = work / "results" / "eval" / "adapt-ca-ssft"
    else:
        assert model_config["intermediate_size"] == 5504 and model_config["vocab_size"] == 151936
        eval_dir = work / "results" / "eval" / "expand-layermoe"
        expanded = json.loads((work / "results" / "expand" / "layermoe" / "stage2" / "config.json").read_text())
        assert expanded["hidden_size"] == 2048 and expanded["intermediate_size"] == 5504
    ppl = pq.read_table(eval_dir / "perplexity.parquet").to_pylist()
    assert ppl and all(r["n_tokens"] > 0 for r in ppl)
    belebele = json.loads((eval_dir / "belebele.json").read_text())
    assert belebele  # lm-eval scored the mirror laid out like facebook/belebele

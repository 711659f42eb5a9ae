"""The paper-scale rehearsals (rehearsal/*.yaml, `make rehearse`): each is its paper config with only
the depth, data sizes, steps and hub inputs cut or stood in for, and its stand-in inputs have the real
architecture's shapes."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from moelang.errors import MoelangError
from moelang.models.loading import KNOWN_CONFIGS

# Keys (dotted prefixes) a rehearsal may set differently from its paper config; each is a cut of
# depth, data, steps or languages, or a stand-in for a hub input (the YAML says why, line by line).
# cuts both rehearsals make: languages, their local sources and split sizes, the stand-in model,
# similarity tokens, the budget with the depth, the expansion's steps and batches, evaluation sizes
COMMON_CUTS = ("languages.high_resource", "languages.targets", "corpus.default_source", "corpus.sources",
               "corpus.dev_fraction", "corpus.test_fraction", "corpus.min_chars", "model.base.name_or_path",
               "similarity.tokens_per_language", "allocation.new_experts", "expand.stage1.steps",
               "expand.stage1.micro_batch_size", "expand.stage1.grad_accum", "expand.stage1.checkpoint_every",
               "expand.stage2.steps", "expand.stage2.micro_batch_size", "expand.stage2.grad_accum",
               "expand.classifier_eval_sequences", "evaluation.tokens_per_language", "evaluation.mirror",
               "evaluation.limit", "resources.gpus")
CUTS = {
    "olmoe": COMMON_CUTS + ("model.cpt.n_checkpoints", "model.cpt.train.steps", "model.cpt.train.micro_batch_size",
                            "model.cpt.train.grad_accum", "model.cpt.train.checkpoint_every",
                            "routing.tokens_per_language", "adapt.learning_rates", "adapt.train.steps", "adapt.train.seq_len",
                            "adapt.train.micro_batch_size", "adapt.train.grad_accum", "adapt.train.checkpoint_every",
                            "adapt.sweep_group_size"),
    "qwen": COMMON_CUTS + ("allocation.classifier_layers",),
}
PAPER = {"olmoe": "config/olmoe-m7.yaml", "qwen": "config/layermoe-qwen.yaml"}


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out |= flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_a_rehearsal_is_its_paper_config_but_for_the_cuts(repo, name):
    # as written (a rehearsal spells out every key of its paper config; its inputs exist only in its run)
    paper = flat(yaml.safe_load((repo / PAPER[name]).read_text()))
    rehearsal = flat(yaml.safe_load((repo / "rehearsal" / f"{name}.yaml").read_text()))
    differing = sorted(k for k in set(paper) | set(rehearsal) if paper.get(k, "<absent>") != rehearsal.get(k, "<absent>"))
    unexplained = [k for k in differing if not k.startswith(CUTS[name])]
    assert not unexplained, f"rehearsal/{name}.yaml differs from {PAPER[name]} beyond its cuts: {unexplained}"
    # and every listed cut is one (a stale entry would hide a future difference)
    assert all(any(k.startswith(cut) for k in differing) for cut in CUTS[name])
    # the languages kept are the paper's, in their roles
    assert set(rehearsal["languages.high_resource"]) <= set(paper["languages.high_resource"])
    targets = {k: v for k, v in rehearsal.items() if k.startswith("languages.targets.")}
    assert targets and all(paper.get(k) == v for k, v in targets.items())


def test_known_configs_give_the_published_sizes():
    from moelang.models import count_parameters
    from moelang.models.loading import load_config

    olmoe = count_parameters(config=load_config("allenai/OLMoE-1B-7B-0924", known_first=True))
    qwen = count_parameters(config=load_config("Qwen/Qwen1.5-1.8B", known_first=True))
    assert olmoe["total"] == pytest.approx(6.9e9, rel=0.01) and olmoe["experts_per_layer"] == [64] * 16
    assert qwen["total"] == pytest.approx(1.84e9, rel=0.01)  # "1.8B"


def test_standins_keep_the_architecture_cut_only_in_depth(tmp_path):
    """A stand-in model (on the meta device: no weights) of each paper architecture: every
    config.json field as shipped but the depth and the special-token ids."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from moelang.rehearsal import standin_config

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<|padding|>": 1, "a": 2}, unk_token="a"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|padding|>")
    for hub_id, layers in (("allenai/OLMoE-1B-7B-0924", 2), ("Qwen/Qwen1.5-1.8B", 4)):
        shipped = json.loads((KNOWN_CONFIGS / (hub_id.replace("/", "--") + ".json")).read_text())
        config = standin_config(hub_id, layers, tokenizer).to_dict()
        assert config["num_hidden_layers"] == layers and config["eos_token_id"] == 0 and config["pad_token_id"] == 1
        for key, value in shipped.items():
            if key.startswith("_") or key in ("num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id",
                                                "max_window_layers", "architectures"):
                continue
            if key == "sliding_window" and not shipped.get("use_sliding_window"):
                continue  # transformers drops an unused window (None)
            # transformers 5 keeps rope_theta in rope_parameters
            have = config["rope_parameters"]["rope_theta"] if key == "rope_theta" else config[key]
            assert have == value, (hub_id, key)
    with pytest.raises(MoelangError, match="no shipped architecture for 'org/none'"):
        standin_config("org/none", 1, tokenizer)
    with pytest.raises(MoelangError, match="layers 17; choose 1 to 16"):
        standin_config("allenai/OLMoE-1B-7B-0924", 17, tokenizer)


def test_standin_corpus_and_mirrors_have_the_hub_datasets_columns(tmp_path):
    from moelang.evaluate import BELEBELE_COLUMNS, BLIMP_COLUMNS
    from moelang.rehearsal import read_paper_config, write_corpus, write_mirror

    config = read_paper_config("config/layermoe-qwen.yaml")
    config["languages"] = {"high_resource": ["en", "zh"], "targets": {"el": "en"}, "base": "en"}
    config["evaluation"]["tasks"] = ["belebele", "multiblimp"]
    written = write_corpus(config, tmp_path / "corpus")
    assert {lang: w["layout"] for lang, w in written.items()} == {"en": "slimpajama", "zh": "skypile", "el": "culturax"}
    assert pq.read_schema(tmp_path / "corpus" / "el.parquet").names == ["text", "timestamp", "url", "source"]
    assert pq.read_schema(tmp_path / "corpus" / "en.parquet").names == ["text", "meta"]
    assert pq.read_schema(tmp_path / "corpus" / "zh.parquet").names == ["text"]
    mirror = write_mirror(config, tmp_path / "corpus", tmp_path / "mirror", seed=0)
    assert sorted(mirror["belebele"]) == ["ell_Grek", "eng_Latn", "zho_Hans"]
    assert sorted(mirror["multiblimp"]) == ["ell", "eng"]  # MultiBLiMP has no Chinese
    belebele = pq.read_table(tmp_path / "mirror" / "belebele" / "ell_Grek.parquet").to_pylist()
    assert list(belebele[0]) == BELEBELE_COLUMNS and len(belebele) == 8
    for row in belebele:  # the correct answer is the start of the passage
        assert row["flores_passage"].startswith(row[f"mc_answer{row['correct_answer_num']}"])
    blimp = pq.read_table(tmp_path / "mirror" / "multiblimp" / "ell.parquet").to_pylist()
    assert list(blimp[0]) == BLIMP_COLUMNS and all(r["sen"] != r["wrong_sen"] for r in blimp)


def test_usage_records_each_job_and_the_table_sums_a_torchrun_jobs_processes(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from moelang.usage import USAGE_SCHEMA, markdown, usage_table

    usage = tmp_path / "usage"
    env = {**os.environ, "MOELANG_USAGE_DIR": str(usage)}
    (tmp_path / "plan.json").write_text(json.dumps({"x": {"new_experts_per_layer": [1]}}))
    ok = subprocess.run([sys.executable, "-m", "moelang", "options", "expand"], env=env, capture_output=True, cwd=tmp_path)
    bad = subprocess.run([sys.executable, "-m", "moelang", "usage", "--dir", str(tmp_path / "none"), "--out",
                          str(tmp_path / "out" / "u.parquet")], env=env, capture_output=True, cwd=tmp_path)
    assert ok.returncode == 0
    # two processes of one torchrun job (same launcher: the parent pid), written as the CLI writes them
    import time

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.bin").write_bytes(b"\0" * 2**19)
    os.utime(tmp_path / "model" / "old.bin", (time.time() - 3600, time.time() - 3600))  # another job's file
    (tmp_path / "model" / "w.bin").write_bytes(b"\0" * 2**20)
    os.link(tmp_path / "model" / "w.bin", tmp_path / "model" / "w-link.bin")  # a hard link is no second MiB
    now = time.time()
    for rank, rss in ((0, 100.0), (1, 300.0)):
        record = {"stage": "cpt", "argv": ["cpt", "--options", "{}", "--out", "model"], "cwd": str(tmp_path),
                  "wall_s": 10.0 + rank, "peak_rss_mib": rss, "rank": rank, "job_key": "run7", "ok": True,
                  "ended": now + rank}
        (usage / f"cpt-{rank}.json").write_text(json.dumps(record))
    table = usage_table(usage)
    assert table.schema == USAGE_SCHEMA
    rows = {r["stage"]: r for r in table.to_pylist()}
    assert rows["options"]["processes"] == 1 and rows["options"]["peak_rss_mib"] > 10 and rows["options"]["ok"]
    assert rows["usage"]["ok"] == (bad.returncode == 0)
    assert rows["cpt"] == {"stage": "cpt", "job": "--out model", "processes": 2, "wall_s": 11.0, "peak_rss_mib": 300.0,
                           "total_peak_rss_mib": 400.0, "output_mib": 1.0, "ok": True}
    assert "| cpt | 1 | 2 | 11 | 11 | 300 | 1.0 | yes |" in markdown(table)

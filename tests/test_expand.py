"""The expansion stage (moelang.expand): a variant's model grown by its plan, stage 1, stage 2, the runs table."""

import json
import math
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moelang import expand
from moelang.errors import MoelangError
from moelang.options import ExpandOptions, TrainSettings
from test_resume_cli import kill_after_first_checkpoint, make_base
from test_train import patterned_docs, write_tokens

PLAN = {"layermoe": {"experts_per_layer": [2, 1], "new_experts_per_layer": [2, 1], "classifier_layers": [1]},
        "uniform": {"experts_per_layer": [2, 1], "new_experts_per_layer": [1, 2], "classifier_layers": []},
        "_meta": {"failed": {"routing": "no specialisation scores"}}}
NEW, OLD = ["ca", "uk"], ["es", "ru"]


def profile_rows(lang, usage):
    rows = [{"model": "start", "checkpoint_step": 0, "lang": lang, "layer": layer, "expert": e, "count": int(c),
             "weight_sum": float(c), "n_tokens": 100} for layer, counts in usage.items() for e, c in enumerate(counts)]
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("expand")
    make_base(root / "start")
    for i, lang in enumerate(NEW + OLD):
        write_tokens(root / f"{lang}.parquet", patterned_docs(60, seed=10 + i),
                     splits=["train"] * 40 + ["dev"] * 10 + ["test"] * 10)
    (root / "plan.json").write_text(json.dumps(PLAN))
    (root / "profile").mkdir()
    # parents es and ru: summed, layer 0 ranks 5, 3, ...; layer 1 ranks 7 first
    pq.write_table(profile_rows("es", {0: [0, 1, 0, 9, 0, 4, 0, 0], 1: [0] * 7 + [3]}), root / "profile" / "es.parquet")
    pq.write_table(profile_rows("ru", {0: [0, 0, 0, 0, 0, 8, 0, 0], 1: [1] + [0] * 7}), root / "profile" / "ru.parquet")
    return root


def options(setup, **overrides) -> ExpandOptions:
    train = TrainSettings(steps=4, seq_len=16, micro_batch_size=4, lr=1e-2, warmup_steps=0, min_lr_ratio=0.0,
                          betas=(0.9, 0.999), weight_decay=0.0, aux_loss_coef=0.01, checkpoint_every=2)
    values = dict(ref=str(setup / "start"), device="cpu", variant="layermoe", plan="layermoe", classifier=True,
                  start="cpt-step4", old=OLD, new=NEW, parents={"ca": "es", "uk": "ru"}, profile_model="cpt-step4",
                  stage1=train, stage2=train.replace(aux_loss_coef=0.0))
    return ExpandOptions(**values | overrides)


def tokens(setup, langs):
    return {lang: setup / f"{lang}.parquet" for lang in langs}


@pytest.fixture(scope="module")
def stages(setup):
    out = setup / "out"
    opts = options(setup)
    record = expand.expand_variant(opts, setup / "plan.json", out / "stage0", setup / "profile")
    expand.train_stage(1, opts, out / "stage0", tokens(setup, NEW), out / "stage1", setup / "state1")
    expand.train_stage(2, opts, out / "stage1", tokens(setup, NEW + OLD), out / "stage2", setup / "state2",
                       setup / "plan.json")
    return out, record


def weights(directory):
    """The model's tensors as loaded (the base OLMoE checkpoint stores experts one by one; loading fuses them)."""
    from transformers import AutoModelForCausalLM

    import moelang.models  # noqa: F401 (registers the expanded classes)

    model = AutoModelForCausalLM.from_pretrained(directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_expansion_copies_the_parents_most_used_experts(setup, stages):
    out, record = stages
    assert record["experts_per_layer"] == [10, 9] and record["original_experts_per_layer"] == [8, 8]
    assert record["sources"] == {"0": [5, 3], "1": [7]}  # es + ru counts: layer 0 5 (12), 3 (9); layer 1 7 (3)
    base, grown = weights(setup / "start"), weights(out / "stage0")
    for layer, sources in ((0, [5, 3]), (1, [7])):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            assert torch.equal(grown[key][:8], base[key])
            assert torch.equal(grown[key][8:], base[key][sources])
        router = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(grown[router][8:], base[router][sources])
    config = json.loads((out / "stage0" / "config.json").read_text())
    assert config["model_type"] == "layermoe_olmoe" and config["classifier_layers"] == []


def test_stage1_trains_only_new_experts_and_routers(stages):
    out, _ = stages
    before, after = weights(out / "stage0"), weights(out / "stage1")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "stage 1 changed nothing"
    for key in before:
        if ".mlp.experts." in key:
            assert torch.equal(before[key][:8], after[key][:8]), key  # original experts frozen
            assert not torch.equal(before[key][8:], after[key][8:]), key  # new experts trained
        elif ".mlp.gate." not in key:
            assert key not in changed, key  # attention, norms, embeddings
    log = pl.read_parquet(out / "stage1" / "train_log.parquet")
    assert log.height == 4 and log["aux_loss"].is_finite().all()
    run = json.loads((out / "stage1" / expand.RUN_FILE).read_text())
    new_params = sum(before[k][8:].numel() for k in before if ".mlp.experts." in k)
    routers = sum(before[k].numel() for k in before if ".mlp.gate." in k)
    assert run["stage1_trainable_params"] == new_params + routers


def test_stage2_trains_only_routers_and_classifiers(stages):
    out, _ = stages
    before, after = weights(out / "stage1"), weights(out / "stage2")
    assert set(after) - set(before) == {"model.layers.1.mlp.classifier.weight"}
    for key in before:
        assert (".mlp.gate." in key) or torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if ".mlp.gate." in k)
    log = pl.read_parquet(out / "stage2" / "train_log.parquet")
    assert {"lpr_loss", "classifier_loss", "classifier_accuracy"} <= set(log.columns)
    assert log["aux_loss"].is_nan().all()
    config = json.loads((out / "stage2" / "config.json").read_text())
    assert config["classifier_layers"] == [1]
    from transformers import AutoModelForCausalLM

    import moelang.models  # noqa: F401 (registers the expanded classes)

    model = AutoModelForCausalLM.from_pretrained(out / "stage2")
    assert model.model.layers[1].mlp.classifier is not None and model.model.layers[0].mlp.classifier is None


def test_stage2_loss_against_its_definition():
    opts = ExpandOptions(old=["es"], new=["ca"], lpr_weight=0.1, classifier_weight=0.1)
    torch.manual_seed(0)
    logits = (torch.randn(6, 5), torch.randn(6, 4))  # 2 sequences x 3 tokens
    classifier = (torch.randn(2, 2),)
    lm = torch.tensor(2.0)
    outputs = type("Out", (), {"loss": lm, "router_logits": logits, "classifier_logits": classifier})()
    batch = torch.zeros(2, 3, dtype=torch.long)
    langs = ["es", "ca"]  # the first sequence (tokens 0-2) is old
    for form in ("probabilities", "logits"):
        loss_fn = expand.stage2_loss(["es"], [3, 2], opts.replace(lpr_form=form))
        loss, metrics = loss_fn(None, batch, outputs, langs)
        terms = []
        for layer, n_orig in zip(logits, (3, 2)):
            for t in range(3):
                row = layer[t].double()
                q = torch.exp(torch.softmax(row, 0) if form == "probabilities" else row)
                terms.append(-math.log(q[:n_orig].sum() / q.sum()))
        lpr = float(np.mean(terms))
        cls = float(torch.nn.functional.cross_entropy(classifier[0], torch.tensor([0, 1])))
        assert float(metrics["lpr_loss"]) == pytest.approx(lpr, rel=1e-5)
        assert float(metrics["classifier_loss"]) == pytest.approx(cls, rel=1e-5)
        assert float(loss) == pytest.approx(2.0 + 0.1 * lpr + 0.1 * cls, rel=1e-5)


def test_stage2_loss_of_causal_decisions_classifies_every_prefix():
    opts = ExpandOptions(old=["es"], new=["ca"], lpr_weight=0.0, classifier_weight=0.5)
    classifier = (torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1)),)  # [batch, positions, groups]
    outputs = type("Out", (), {"loss": torch.tensor(1.0), "router_logits": (), "classifier_logits": classifier})()
    loss, metrics = expand.stage2_loss(["es"], [], opts)(None, torch.zeros(2, 3, dtype=torch.long), outputs,
                                                          ["ca", "es"])
    groups = [1, 0]  # ca new, es old: every position of a sequence carries its group
    by_hand = np.mean([-torch.log_softmax(classifier[0][b, t].double(), 0)[groups[b]].item()
                       for b in range(2) for t in range(3)])
    hits = np.mean([int(classifier[0][b, t].argmax()) == groups[b] for b in range(2) for t in range(3)])
    assert float(metrics["classifier_loss"]) == pytest.approx(by_hand, rel=1e-6)
    assert float(metrics["classifier_accuracy"]) == pytest.approx(hits)
    assert float(loss) == pytest.approx(1.0 + 0.5 * by_hand, rel=1e-6)


def test_balanced_classifier_loss_weighs_each_group_equally():
    classifier = (torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(2)),)
    outputs = type("Out", (), {"loss": torch.tensor(0.0), "router_logits": (), "classifier_logits": classifier})()
    langs, groups = ["ca", "es", "ca"], [1, 0, 1]  # two new sequences, one old
    per_sequence = [np.mean([-torch.log_softmax(classifier[0][b, t].double(), 0)[groups[b]].item() for t in range(4)])
                    for b in range(3)]
    for balance, expect in ((True, 0.5 * (per_sequence[0] + per_sequence[2]) / 2 + 0.5 * per_sequence[1]),
                            (False, np.mean(per_sequence))):
        opts = ExpandOptions(old=["es"], new=["ca"], lpr_weight=0.0, classifier_balance=balance)
        _, metrics = expand.stage2_loss(["es"], [], opts)(None, torch.zeros(3, 4, dtype=torch.long), outputs, langs)
        assert float(metrics["classifier_loss"]) == pytest.approx(expect, rel=1e-6)


def test_the_larger_class_is_cut_to_the_smaller_spread_over_its_languages():
    rows = [np.full((3, 2), 1), np.full((1, 2), 2), np.full((2, 2), 3)]  # old a (3 windows), old b (1), new c (2)
    kept = expand._balance_classes(list(zip([0, 0, 1], rows)))
    labels = [g for g, r in kept for _ in range(len(r))]
    kept = [r for _, r in kept]
    assert labels == [0, 0, 1, 1]
    assert [r[:, 0].tolist() for r in kept] == [[1], [2], [3, 3]]  # a's first and b's first, then c whole


def test_held_out_classifier_accuracy_against_a_direct_computation(setup, stages):
    from test_layermoe import mlp_inputs, pooled_by_hand
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelang.train import packed_windows

    out, _ = stages
    model = AutoModelForCausalLM.from_pretrained(out / "stage2").eval()
    eos = AutoTokenizer.from_pretrained(out / "stage2").eos_token_id  # the training stream's separator
    config = model.config
    assert (config.classifier_pooling, config.classifier_decision) == ("mean", "causal")
    hits, decisions, groups = 0, 0, []
    for group, langs in ((0, OLD), (1, NEW)):
        for lang in langs:
            rows = packed_windows(setup / f"{lang}.parquet", 16, eos, 0, "test")[:3]
            assert set(map(tuple, rows.tolist())).isdisjoint(map(tuple, packed_windows(
                setup / f"{lang}.parquet", 16, eos, 0, "train").tolist()))
            ids = torch.from_numpy(rows.astype(np.int64))
            pooled = pooled_by_hand(mlp_inputs(model, ids)[1], "mean", "causal")
            logits = pooled @ model.model.layers[1].mlp.classifier.weight.double().T
            hits += int((logits.argmax(-1) == group).sum())
            decisions += logits.shape[0] * logits.shape[1]
            groups += [group] * len(rows)
    measured = expand.classifier_heldout_accuracy(out / "stage2", tokens(setup, NEW + OLD), OLD, NEW, 16, 3, 0)
    assert measured["classifier_heldout_accuracy"] == [pytest.approx(hits / decisions)]
    assert measured["classifier_majority_baseline"] == pytest.approx(max(groups.count(0), groups.count(1)) / len(groups))
    assert measured["classifier_heldout_sequences"] == len(groups)
    with pytest.raises(MoelangError, match="no held-out .* old languages"):
        expand.classifier_heldout_accuracy(out / "stage2", tokens(setup, NEW), OLD, NEW, 16, 3, 0)


def test_gather_runs_writes_one_row_per_variant(stages, tmp_path):
    out, _ = stages
    table = expand.gather_runs([out / "stage2"], tmp_path / "runs.parquet")
    assert pq.read_schema(tmp_path / "runs.parquet") == expand.RUNS_SCHEMA
    row = table.row(0, named=True)
    assert row["variant"] == "layermoe" and row["new_experts"] == 3 and row["classifier_layers"] == [1]
    assert row["experts_per_layer"] == [10, 9] and row["classifier"] is True
    assert 0 < row["stage2_trainable_fraction"] < row["stage1_trainable_fraction"] < 1
    assert math.isfinite(row["stage1_aux_loss"]) and math.isfinite(row["stage2_lpr_loss"])
    assert (row["classifier_pooling"], row["classifier_decision"]) == ("mean", "causal")
    assert len(row["classifier_heldout_accuracy"]) == 1 and 0 <= row["classifier_heldout_accuracy"][0] <= 1
    assert 0.5 <= row["classifier_majority_baseline"] < 1 and row["classifier_heldout_sequences"] > 0


def test_bad_input_stops_with_one_line(setup, tmp_path):
    opts = options(setup)
    with pytest.raises(MoelangError, match="left it out: no specialisation scores"):
        expand.expand_variant(opts.replace(plan="routing"), setup / "plan.json", tmp_path / "x")
    (tmp_path / "short.json").write_text(json.dumps({"layermoe": {"new_experts_per_layer": [1, 1, 1]}}))
    with pytest.raises(MoelangError, match="has 3 layers and the model 'cpt-step4' 2"):
        expand.expand_variant(opts, tmp_path / "short.json", tmp_path / "x")
    with pytest.raises(MoelangError, match="is not an expanded model"):
        expand.train_stage(2, opts, setup / "start", tokens(setup, NEW + OLD), tmp_path / "y", tmp_path / "s",
                           setup / "plan.json")
    with pytest.raises(MoelangError, match="no token file of the old language\\(s\\) es, ru"):
        expand.stage_settings(opts, 2, NEW)
    with pytest.raises(MoelangError, match="no token file of the new language\\(s\\) uk"):
        expand.stage_settings(opts, 1, ["ca"])
    with pytest.raises(MoelangError, match="stage2.aux_loss_coef: 0.01; stage 2 trains"):
        expand.check_options(opts.replace(stage2=opts.stage1))
    with pytest.raises(MoelangError, match="init most_used .* set expand.init: random"):
        expand.expand_variant(opts.replace(profile_model=None), setup / "plan.json", tmp_path / "x")
    with pytest.raises(MoelangError, match="init: 'copy'"):
        expand.check_options(opts.replace(init="copy"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def stage1_command(setup, opts, out, state):
    return [sys.executable, "-m", "moelang", "expand-train", "--stage", "1", "--options", opts.to_json(),
            "--model", str(setup / "out" / "stage0"), "--tokens", *(str(p) for p in tokens(setup, NEW).values()),
            "--out", str(out), "--state-dir", str(state)]


def test_stage1_killed_and_resumed_ends_bit_identical(setup, stages, tmp_path):
    # long enough to be killed; the admission schedule spans the kill, so the resumed run must set it
    # from the step it resumes at
    opts = options(setup, stage1=options(setup).stage1.replace(steps=60, checkpoint_every=2), admit_steps=40)
    kill_after_first_checkpoint(stage1_command(setup, opts, tmp_path / "a", tmp_path / "sa"), tmp_path / "sa")
    subprocess.run(stage1_command(setup, opts, tmp_path / "a", tmp_path / "sa"), check=True, capture_output=True)
    subprocess.run(stage1_command(setup, opts, tmp_path / "b", tmp_path / "sb"), check=True, capture_output=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "sa").exists()


def test_stage2_with_the_classifiers_own_rate_killed_and_resumed_ends_bit_identical(setup, stages, tmp_path):
    """Stage 2's optimizer has a group per rate (routers at lr, classifiers at classifier_lr): a
    resumed run restores each group's rate and state."""
    opts = options(setup, classifier_lr=0.05, stage2=options(setup).stage2.replace(steps=60, checkpoint_every=2))

    def command(out, state):
        return [sys.executable, "-m", "moelang", "expand-train", "--stage", "2", "--options", opts.to_json(),
                "--model", str(setup / "out" / "stage1"), "--tokens",
                *(str(p) for p in tokens(setup, NEW + OLD).values()), "--plan", str(setup / "plan.json"),
                "--out", str(out), "--state-dir", str(state)]

    kill_after_first_checkpoint(command(tmp_path / "a", tmp_path / "sa"), tmp_path / "sa")
    subprocess.run(command(tmp_path / "a", tmp_path / "sa"), check=True, capture_output=True)
    subprocess.run(command(tmp_path / "b", tmp_path / "sb"), check=True, capture_output=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    classifier = "model.layers.1.mlp.classifier.weight"
    assert not torch.equal(a[classifier], weights(setup / "out" / "stage2")[classifier])  # its rate mattered


def test_a_dense_llama_upcycles_through_the_whole_stage(setup, tmp_path):
    """The paper's setting: a dense model upcycled (logits unchanged), stage 1 keeps expert 0 (the FFN)
    and everything but the new experts and routers, stage 2 only routers and classifiers."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from families import tiny_model

    dense = tiny_model("llama", seed=3)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, dense.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        eos_token="</s>", pad_token="<pad>")
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    (tmp_path / "plan.json").write_text(json.dumps({"layermoe": {"experts_per_layer": [3, 1],
                                                                  "new_experts_per_layer": [2, 0],
                                                                  "classifier_layers": [0]}}))
    opts = options(setup, ref=str(tmp_path / "dense"), profile_model=None)
    expand.expand_variant(opts, tmp_path / "plan.json", tmp_path / "s0")
    ids = torch.tensor([patterned_docs(1, seed=4)[0][:12]])
    upcycled = AutoModelForCausalLM.from_pretrained(tmp_path / "s0").eval()
    assert torch.allclose(upcycled(ids).logits, dense.eval()(ids).logits, atol=1e-5)
    expand.train_stage(1, opts, tmp_path / "s0", tokens(setup, NEW), tmp_path / "s1", tmp_path / "st1")
    expand.train_stage(2, opts, tmp_path / "s1", tokens(setup, NEW + OLD), tmp_path / "s2", tmp_path / "st2",
                       tmp_path / "plan.json")
    s0, s1, s2 = weights(tmp_path / "s0"), weights(tmp_path / "s1"), weights(tmp_path / "s2")
    for key in s0:
        if ".mlp.experts." in key:
            assert torch.equal(s0[key][0], s1[key][0]) and not torch.equal(s0[key][1:], s1[key][1:]), key
        elif ".mlp.gate." not in key:
            assert torch.equal(s0[key], s1[key]), key
    assert set(s2) - set(s1) == {"model.layers.0.mlp.classifier.weight"}
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if ".mlp.gate." not in k)
    assert not torch.equal(s1["model.layers.0.mlp.gate.weight"], s2["model.layers.0.mlp.gate.weight"])


def test_each_stage_takes_the_model_of_the_stage_before(setup, stages, tmp_path):
    out, _ = stages
    opts = options(setup)
    with pytest.raises(MoelangError, match="is the model after stage 0; give the stage-1 model"):
        expand.train_stage(2, opts, out / "stage0", tokens(setup, NEW + OLD), tmp_path / "y", tmp_path / "s",
                           setup / "plan.json")
    with pytest.raises(MoelangError, match="is the model after stage 1; give the expanded model"):
        expand.train_stage(1, opts, out / "stage1", tokens(setup, NEW), tmp_path / "y", tmp_path / "s")
    (tmp_path / "plan.json").write_text(json.dumps({**PLAN, "layermoe": {**PLAN["layermoe"], "classifier_layers": []}}))
    with pytest.raises(MoelangError, match="classifier: true, but the layermoe plan has no classifier layers"):
        expand.train_stage(2, opts, out / "stage1", tokens(setup, NEW + OLD), tmp_path / "y", tmp_path / "s",
                           tmp_path / "plan.json")
    assert not (tmp_path / "y").exists()


def test_exported_models_carry_no_training_output_flags(stages):
    out, _ = stages
    for stage in ("stage1", "stage2"):
        config = json.loads((out / stage / "config.json").read_text())
        assert config["output_router_logits"] is False and config["output_classifier_logits"] is False


def test_an_admitted_expansion_starts_as_its_base_and_stage1_admits_and_trains_the_new_experts(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    import moelang.models  # noqa: F401 (registers the expanded classes)

    opts = options(setup, admit_steps=3)
    record = expand.expand_variant(opts, setup / "plan.json", tmp_path / "stage0", setup / "profile")
    assert record["admit_steps"] == 3
    base = AutoModelForCausalLM.from_pretrained(setup / "start").eval()
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "stage0").eval()
    assert grown.config.new_expert_prior == 0.0
    ids = torch.randint(3, base.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)
        # without the prior the copied router rows tie with their sources and the output moves
        grown.config.new_expert_prior = 1.0
        plain = AutoModelForCausalLM.from_config(grown.config).eval()
        plain.load_state_dict(grown.state_dict())
        assert not torch.allclose(plain(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
    expand.train_stage(1, opts, tmp_path / "stage0", tokens(setup, NEW), tmp_path / "stage1", tmp_path / "state")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "stage1")
    assert after.config.new_expert_prior == 1.0  # fully admitted: stage 2 and evaluation route without a prior
    assert all(m.new_expert_prior == 1.0 for m in after.modules() if hasattr(m, "new_expert_prior"))
    before, trained = weights(tmp_path / "stage0"), weights(tmp_path / "stage1")
    for layer, first_new in ((0, 8), (1, 8)):
        key = f"model.layers.{layer}.mlp.experts.down_proj"
        assert torch.equal(before[key][:first_new], trained[key][:first_new])
        assert not torch.equal(before[key][first_new:], trained[key][first_new:])  # admitted, so trained
    with pytest.raises(MoelangError, match="admit_steps: 5; admit the new experts within stage 1 \\(0 to 4 steps"):
        expand.check_options(opts.replace(admit_steps=5))


def test_admission_sets_the_prior_of_each_step_on_every_router():
    from families import tiny_model
    from moelang.models.layermoe.admission import AdmittedExpertSubset, admission_prior
    from moelang.models.layermoe.build import expand_model

    assert [admission_prior(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert admission_prior(0, 0) == 1.0
    grown, _ = expand_model(tiny_model("olmoe", seed=1), [2, 1], sources={0: [5, 3], 1: [7]})
    method = AdmittedExpertSubset(experts={0: [8, 9], 1: [8]}, routers=[0, 1], admit_steps=4)
    for step, prior in ((0, 0.25), (2, 0.75), (7, 1.0)):
        method.before_step(grown, step)
        assert [layer.mlp.gate.new_expert_prior for layer in grown.model.layers] == [prior, prior]
        assert grown.config.new_expert_prior == prior
    assert "admitted over 4 steps" in method.describe()
    assert "admitted" not in AdmittedExpertSubset(experts={0: [8]}, routers=[0]).describe()


def test_noise_perturbs_only_the_new_experts_of_a_grown_model():
    from families import tiny_model
    from moelang.models.layermoe.build import expand_model

    base = tiny_model("olmoe", seed=1)
    grown, record = expand_model(base, [2, 1], sources={0: [5, 3], 1: [7]}, noise=0.5)
    exact, _ = expand_model(base, [2, 1], sources={0: [5, 3], 1: [7]})
    for layer in range(2):
        for name in ("gate_up_proj", "down_proj"):
            noisy = getattr(grown.model.layers[layer].mlp.experts, name)
            plain = getattr(exact.model.layers[layer].mlp.experts, name)
            assert torch.equal(noisy[:8], plain[:8]) and not torch.equal(noisy[8:], plain[8:])
    assert record["noise"] == 0.5


def test_stage2_provenance_hashes_the_stage1_model_not_its_logs(setup, stages, tmp_path):
    import shutil

    out, _ = stages
    opts = options(setup)
    copy = tmp_path / "stage1"
    shutil.copytree(out / "stage1", copy)
    log = pl.read_parquet(copy / "train_log.parquet").with_columns(pl.col("tokens_per_s") * 1.5)
    log.write_parquet(copy / "train_log.parquet")  # another run's speed: the same weights
    record = json.loads((out / "stage2" / expand.RUN_FILE).read_text())
    again = expand.train_stage(2, opts, copy, tokens(setup, NEW + OLD), tmp_path / "a", setup / "state2",
                               setup / "plan.json")
    assert again["made_from"] == record["made_from"]  # the finished stage 2 is reused, not trained again
    with open(copy / "model.safetensors", "r+b") as f:  # other weights: another fingerprint
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    from moelang.train import tree_digest

    assert tree_digest(copy, skip_suffixes=expand.RECORD_FILES) != record["made_from"]["model"]


def test_a_leftover_finished_state_from_other_inputs_is_trained_again(setup, stages, tmp_path):
    """A job killed after its stage finished but before publishing leaves a finished state; if an
    input changed since, the rerun must not publish the stale result."""
    import shutil

    out, _ = stages
    opts = options(setup)
    state = tmp_path / "state"
    expand.train_stage(1, opts, out / "stage0", tokens(setup, NEW), tmp_path / "a", state)
    # the state as a kill during publishing leaves it: the staged model and its record, not yet removed
    from moelang.train import staged_path

    staged_path(state, "model").parent.mkdir(parents=True)
    shutil.copytree(tmp_path / "a", staged_path(state, "model"))
    changed = opts.replace(stage1=opts.stage1.replace(lr=5e-3))
    record = expand.train_stage(1, changed, out / "stage0", tokens(setup, NEW), tmp_path / "b", state)
    assert json.loads(record["made_from"]["options"])["stage1"]["lr"] == 5e-3
    assert not torch.equal(weights(tmp_path / "a")["model.layers.0.mlp.experts.down_proj"],
                           weights(tmp_path / "b")["model.layers.0.mlp.experts.down_proj"])


# --------------------------------------------------------------------------------------------------
# Variants whose plans coincide share one trained model
# --------------------------------------------------------------------------------------------------

DEFAULT_VARIANTS = {"layermoe": {"plan": "layermoe", "classifier": True},
                    "uniform": {"plan": "uniform", "classifier": False},
                    "mola": {"plan": "mola", "classifier": False},
                    "routing-informed": {"plan": "routing", "classifier": True},
                    "layermoe-no-classifier": {"plan": "layermoe", "classifier": False}}


def all_ones_plan(layers: int = 4) -> dict:
    """A budget of one new expert per layer: every method's plan is all ones (as plan.json has it)."""
    entry = {"experts_per_layer": [9] * layers, "new_experts_per_layer": [1] * layers,
             "classifier_layers": list(range(layers))}
    return {method: dict(entry) for method in ("layermoe", "uniform", "mola", "routing")} | {"_meta": {}}


def test_variants_with_identical_plans_share_one_model_per_classifier_setting():
    sharing = expand.shared_training(DEFAULT_VARIANTS, all_ones_plan())
    # one expansion and stage 1 for all five, one stage 2 per classifier setting
    assert {v: s["stage1"] for v, s in sharing.items()} == dict.fromkeys(DEFAULT_VARIANTS, "layermoe")
    assert {v: s["model"] for v, s in sharing.items()} == {
        "layermoe": "layermoe", "uniform": "uniform", "mola": "uniform", "routing-informed": "layermoe",
        "layermoe-no-classifier": "uniform"}
    assert expand.coinciding_variants(sharing) == [["layermoe", "routing-informed"],
                                                   ["uniform", "mola", "layermoe-no-classifier"]]
    note = expand.sharing_note(sharing, all_ones_plan(), DEFAULT_VARIANTS)
    assert "layermoe, routing-informed (new experts per layer [1, 1, 1, 1], classifier yes: trained once as " \
           "layermoe)" in note
    assert "uniform, mola, layermoe-no-classifier (new experts per layer [1, 1, 1, 1], classifier no" in note
    assert "\n" not in note


def test_variants_with_different_plans_or_classifier_layers_share_only_what_they_have_in_common():
    plan = all_ones_plan()
    plan["uniform"] = plan["uniform"] | {"new_experts_per_layer": [2, 2, 2, 2]}
    plan["routing"] = plan["routing"] | {"classifier_layers": [3]}  # same numbers, other classifier layers
    sharing = expand.shared_training(DEFAULT_VARIANTS, plan)
    assert {v: s["stage1"] for v, s in sharing.items()} == {
        "layermoe": "layermoe", "uniform": "uniform", "mola": "layermoe", "routing-informed": "layermoe",
        "layermoe-no-classifier": "layermoe"}
    assert {v: s["model"] for v, s in sharing.items()} == {
        "layermoe": "layermoe", "uniform": "uniform", "mola": "mola", "routing-informed": "routing-informed",
        "layermoe-no-classifier": "mola"}
    # the default-like case: every plan different, the ablation shares layermoe's stage 1 only
    distinct = {m: {"new_experts_per_layer": [i + 1, 1, 1, 1], "classifier_layers": [1]}
                for i, m in enumerate(("layermoe", "uniform", "mola", "routing"))}
    sharing = expand.shared_training(DEFAULT_VARIANTS, distinct)
    assert sharing["layermoe-no-classifier"] == {"stage1": "layermoe", "model": "layermoe-no-classifier"}
    assert all(s == {"stage1": v, "model": v} for v, s in sharing.items() if v != "layermoe-no-classifier")
    assert expand.sharing_note(sharing, distinct, DEFAULT_VARIANTS) is None
    # a method the allocation left out shares nothing (its own job stops with read_plan's line)
    missing = {k: v for k, v in all_ones_plan().items() if k != "mola"}
    assert expand.shared_training(DEFAULT_VARIANTS, missing)["mola"] == {"stage1": "mola", "model": "mola"}


def test_gather_runs_gives_the_variants_sharing_a_model_its_row(tmp_path):
    plan = all_ones_plan()
    dirs = []
    for owner, classifier, loss in (("layermoe", True, 2.5), ("uniform", False, 3.5)):
        directory = tmp_path / owner / "stage2"
        directory.mkdir(parents=True)
        run = {"variant": owner, "plan": owner, "base": "cpt-step800", "classifier": classifier,
               "experts_per_layer": [9] * 4, "new_experts": 4, "classifier_layers": [0, 1, 2, 3] if classifier else [],
               "total_params": 1000, "stage2_loss": loss}
        (directory / expand.RUN_FILE).write_text(json.dumps(run))
        dirs.append(directory)
    table = expand.gather_runs(dirs, tmp_path / "runs.parquet", DEFAULT_VARIANTS, plan)
    assert pq.read_schema(tmp_path / "runs.parquet") == expand.RUNS_SCHEMA
    assert table.select("variant", "plan", "trained_as", "classifier", "stage2_loss").rows() == [
        ("layermoe", "layermoe", "layermoe", True, 2.5), ("uniform", "uniform", "uniform", False, 3.5),
        ("mola", "mola", "uniform", False, 3.5), ("routing-informed", "routing", "layermoe", True, 2.5),
        ("layermoe-no-classifier", "layermoe", "uniform", False, 3.5)]
    # without the variants: one row per directory, each its own model
    alone = expand.gather_runs(dirs, tmp_path / "alone.parquet")
    assert alone.select("variant", "trained_as").rows() == [("layermoe", "layermoe"), ("uniform", "uniform")]
    # a shared model whose directory is not given stops with one line
    with pytest.raises(MoelangError, match="trained as 'uniform', whose stage-2 directory is not among --runs"):
        expand.gather_runs(dirs[:1], tmp_path / "bad.parquet", DEFAULT_VARIANTS, plan)


def test_a_budget_of_one_new_expert_per_layer_forces_the_plans_before_the_allocation_runs():
    plan = expand.forced_plan(4, 4, None)
    assert {m: e["new_experts_per_layer"] for m, e in plan.items()} == {
        m: [1, 1, 1, 1] for m in ("layermoe", "uniform", "mola", "increasing", "routing")}
    sharing = expand.shared_training(DEFAULT_VARIANTS, plan)
    assert expand.coinciding_variants(sharing) == [["layermoe", "routing-informed"],
                                                   ["uniform", "mola", "layermoe-no-classifier"]]
    # uniform's own per-layer budget keeps it apart; the others still coincide
    apart = expand.shared_training(DEFAULT_VARIANTS, expand.forced_plan(4, 4, 3))
    assert expand.coinciding_variants(apart) == [["layermoe", "routing-informed"], ["mola", "layermoe-no-classifier"]]
    # a larger budget, or a layer count not known before a model is read, forces nothing
    assert expand.forced_plan(8, 4, None) is None and expand.forced_plan(4, None, None) is None

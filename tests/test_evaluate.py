
import json

import numpy as np
import polars as pl
import pytest
import torch

from families import tiny_model
from moelang import evaluate as ev
from moelang.errors import MoelangError
from test_train import write_tokens

WORDS = [f"w{i}" for i in range(3, 97)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<|endoftext|>": 2} | {w: i for i, w in enumerate(WORDS, start=3)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, rng.integers(4, 14))) for _ in range(120)]
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(120)], "lang": ["es"] * 120, "text": docs,
                  "split": ["test"] * 120}).write_parquet(root / "es.parquet")
    options = {"tasks": ["synthetic_blimp", "synthetic_belebele"], "belebele_shots": 1, "max_items": 30,
               "min_items": 5}
    tasks = ev.build_tasks({"es": root / "es.parquet"}, options, root / "tasks")
    model = tiny_model("olmoe", seed=1).eval()
    model.config.eos_token_id = model.config.bos_token_id = 2
    return root, tasks, model, word_tokenizer()


def test_synthetic_tasks_have_the_original_columns(setup):
    root, tasks, _, _ = setup
    assert set(tasks) == {"moelang_synthetic_blimp_es", "moelang_synthetic_belebele_es"}
    blimp = pl.read_parquet(root / "tasks" / "data" / "moelang_synthetic_blimp_es.parquet")
    assert blimp.columns == ev.BLIMP_COLUMNS and blimp.height == 30
    for sen, wrong in zip(blimp["sen"], blimp["wrong_sen"]):
        a, b = sen.split(), wrong.split()
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert sorted(a) == sorted(b) and len(diff) == 2 and diff[1] == diff[0] + 1
    bele = pl.read_parquet(root / "tasks" / "data" / "moelang_synthetic_belebele_es.parquet")
    assert bele.columns == ev.BELEBELE_COLUMNS
    row = bele.row(0, named=True)
    assert row[f"mc_answer{row['correct_answer_num']}"] not in (None, "")
    assert tasks["moelang_synthetic_blimp_es"]["synthetic"] is True


def test_synthetic_tasks_are_built_from_the_test_split_only(tmp_path):
    rng = np.random.default_rng(6)
    splits = [("train", "dev", "test")[i % 3] for i in range(180)]
    # each split's documents use their own words, so an item shows which split it came from
    vocab = {name: [f"{name}{k}" for k in range(12)] for name in ("train", "dev", "test")}
    docs = [" ".join(rng.choice(vocab[split], rng.integers(6, 14))) for split in splits]
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(180)], "lang": ["es"] * 180, "text": docs,
                  "split": splits}).write_parquet(tmp_path / "es.parquet")
    ev.build_tasks({"es": tmp_path / "es.parquet"}, {"tasks": ["synthetic_blimp", "synthetic_belebele"],
                                                     "max_items": 40, "min_items": 5}, tmp_path / "tasks")
    blimp = pl.read_parquet(tmp_path / "tasks" / "data" / "moelang_synthetic_blimp_es.parquet")
    bele = pl.read_parquet(tmp_path / "tasks" / "data" / "moelang_synthetic_belebele_es.parquet")
    assert blimp.height == bele.height == 40
    words = {w for column in (blimp["sen"], bele["flores_passage"], bele["mc_answer1"]) for text in column
             for w in text.split()}
    assert words and all(w.startswith("test") for w in words)
    test_docs = {text for text, split in zip(docs, splits) if split == "test"}
    assert set(blimp["sen"]) <= test_docs


def test_generated_yamls_load_and_keep_the_shipped_templates(setup):
    import yaml
    from lm_eval.tasks import TaskManager

    root, tasks, _, _ = setup
    manager = TaskManager(include_path=str(root / "tasks" / "yaml"))
    loaded = manager.load(list(tasks))["tasks"]
    shipped = {fam: yaml.safe_load(ev.shipped_template(fam).read_text().replace("!function", ""))
               for fam in ("belebele", "multiblimp")}
    blimp = loaded["moelang_synthetic_blimp_es"].config
    assert blimp.doc_to_choice == shipped["multiblimp"]["doc_to_choice"]
    assert blimp.dataset_path == "parquet"
    bele = loaded["moelang_synthetic_belebele_es"].config
    # The synthetic Belebele task is the shipped template scored as a cloze: the passage, then each choice.
    assert bele.doc_to_target == shipped["belebele"]["doc_to_target"]
    assert bele.doc_to_text == "{{flores_passage}}" and bele.target_delimiter == " "
    assert [m["metric"] for m in bele.metric_list] == [m["metric"] for m in shipped["belebele"]["metric_list"]] + \
        ["acc_mutual_info"]


def test_harness_loglikelihoods_equal_the_models_own_forward(setup):
    root, tasks, model, tok = setup
    result = ev.run_harness(model, tok, ["moelang_synthetic_blimp_es"], root / "tasks", 0,
                            {"batch_size": 4, "seed": 0}, log_samples=True)
    samples = result["samples"]["moelang_synthetic_blimp_es"]
    correct = []
    with torch.no_grad():
        for sample in samples:
            doc = sample["doc"]
            lls = []
            for text in (doc["sen"], doc["wrong_sen"]):
                ids = [2] + tok(text, add_special_tokens=False)["input_ids"]  # empty context: the end-of-text token
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
                logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])
                lls.append(float(logp.sum()))
            harness = [r[0] for r in sample["filtered_resps"]]
            assert harness == pytest.approx(lls, abs=1e-4)
            correct.append(lls[0] > lls[1])
    assert result["results"]["moelang_synthetic_blimp_es"]["acc,none"] == pytest.approx(np.mean(correct))


def test_synthetic_belebele_mutual_information_equals_the_models_own_forward(setup):
    root, tasks, model, tok = setup
    name = "moelang_synthetic_belebele_es"
    result = ev.run_harness(model, tok, [name], root / "tasks", 0, {"batch_size": 4, "seed": 0}, log_samples=True)

    def loglikelihood(context: list[int], continuation: list[int]) -> float:
        ids = context + continuation
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return float(sum(logp[len(context) + i - 1, t] for i, t in enumerate(continuation)))

    correct, picks = [], [0, 0, 0, 0]
    for sample in result["samples"][name]:
        doc = sample["doc"]
        passage = tok(doc["flores_passage"], add_special_tokens=False)["input_ids"]
        mutual = []
        for j in range(1, 5):
            choice = tok(doc[f"mc_answer{j}"], add_special_tokens=False)["input_ids"]
            mutual.append(loglikelihood(passage, choice) - loglikelihood([2], choice))  # no context: end-of-text
        picks[int(np.argmax(mutual))] += 1
        correct.append(int(np.argmax(mutual)) + 1 == int(doc["correct_answer_num"]))
    assert result["results"][name]["acc_mutual_info,none"] == pytest.approx(np.mean(correct))
    assert result["moelang"]["predictions"][name]["acc_mutual_info"] == picks
    assert result["moelang"]["fit"][name] == {"n_shot": 0, "n_docs": 28, "left_out": 0,
                                              "max_length": model.config.max_position_embeddings}


def test_perplexity_equals_an_independent_computation(tmp_path):
    model = tiny_model("olmoe", seed=2).eval()
    docs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    # a dev document between the test ones, and a train one: perplexity on "test" reads the test ones only
    path = write_tokens(tmp_path / "t.parquet", docs[:1] + [[40, 41, 42, 43]] + docs[1:] + [[50, 51]],
                        splits=["test", "dev", "test", "test", "train"])
    options = {"seq_len": 4, "batch_tokens": 8, "tokens_per_language": None}
    got = ev.perplexity(model, path, eos_id=2, options=options, split="test")
    assert ev.perplexity(model, path, eos_id=2, options=options, split="dev")["n_tokens"] == 4
    nll, n = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            for start in range(0, len(doc), 3):  # chunks of seq_len - 1 tokens, each after the end-of-text token
                ids = [2] + doc[start:start + 3]
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                nll -= float(torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())
                n += len(ids) - 1
    assert got["n_tokens"] == n == 14
    assert got["perplexity"] == pytest.approx(np.exp(nll / n), rel=1e-5)


def test_missing_mirror_names_the_dataset_and_the_path(tmp_path):
    pl.DataFrame({"doc_id": ["a"], "lang": ["ca"], "text": ["x y z"], "split": ["test"]}).write_parquet(tmp_path / "ca.parquet")
    options = {"tasks": ["belebele"], "belebele_shots": 4, "max_items": 5, "min_items": 1, "mirror": str(tmp_path / "m")}
    with pytest.raises(MoelangError) as info:
        ev.build_tasks({"ca": tmp_path / "ca.parquet"}, options, tmp_path / "tasks")
    message = str(info.value)
    assert "facebook/belebele" in message and str(tmp_path / "m" / "belebele" / "cat_Latn.parquet") in message
    assert not (tmp_path / "tasks").exists()


def test_mirrored_real_task_includes_the_shipped_template(tmp_path):
    from lm_eval.tasks import TaskManager

    pl.DataFrame({"doc_id": ["a"], "lang": ["ca"], "text": ["x y z"], "split": ["test"]}).write_parquet(tmp_path / "ca.parquet")
    (tmp_path / "m" / "multiblimp").mkdir(parents=True)
    pl.DataFrame({c: ["x"] for c in ev.BLIMP_COLUMNS}).write_parquet(tmp_path / "m" / "multiblimp" / "cat.parquet")
    options = {"tasks": ["multiblimp"], "belebele_shots": 4, "max_items": 5, "min_items": 1, "mirror": str(tmp_path / "m")}
    tasks = ev.build_tasks({"ca": tmp_path / "ca.parquet"}, options, tmp_path / "tasks")
    assert tasks == {"moelang_multiblimp_cat": {"family": "multiblimp", "lang": "ca", "n_shot": 0, "synthetic": False,
                                                "mirror": str(tmp_path / "m" / "multiblimp" / "cat.parquet")}}
    task = TaskManager(include_path=str(tmp_path / "tasks" / "yaml")).load(["moelang_multiblimp_cat"])["tasks"]
    assert task["moelang_multiblimp_cat"].config.doc_to_choice == "{{[sen,wrong_sen]}}"


def test_synthetic_belebele_groups_share_their_choices_so_a_passage_blind_model_scores_chance():
    rng = np.random.default_rng(3)
    docs = [(f"d{i}", " ".join(rng.choice(WORDS, rng.integers(6, 20)))) for i in range(50)]
    table = ev.synthetic_belebele("es", docs, max_items=40)
    assert table.height == 40
    halves = {f"moelang-synthetic:{d}": t.split() for d, t in docs}
    blind, answers = [], []
    for start in range(0, table.height, 4):
        group = table.slice(start, 4).to_dicts()
        choices = [[row[f"mc_answer{j}"] for j in range(1, 5)] for row in group]
        assert all(c == choices[0] for c in choices) and len(set(choices[0])) == 4
        answers += sorted(int(row["correct_answer_num"]) for row in group)
        for row in group:
            words = halves[row["link"]]
            assert row["flores_passage"].split() == words[:len(words) // 2]
            assert row[f"mc_answer{row['correct_answer_num']}"].split() == words[len(words) // 2:]
            # A model that ignores the passage: the same choice (here the longest) for every item of a group.
            blind.append(int(np.argmax([len(c) for c in choices[0]])) + 1 == int(row["correct_answer_num"]))
    assert answers == [1, 2, 3, 4] * 10
    assert np.mean(blind) == 0.25


def test_task_yamls_survive_a_directory_with_a_yaml_comment_in_its_name(tmp_path):
    from lm_eval.tasks import TaskManager

    root = tmp_path / "a #b"
    root.mkdir()
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(WORDS, rng.integers(6, 14))) for _ in range(40)]
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(40)], "lang": ["es"] * 40, "text": docs,
                  "split": ["test"] * 40}).write_parquet(root / "es.parquet")
    options = {"tasks": ["synthetic_blimp", "synthetic_belebele"], "belebele_shots": 1, "max_items": 20, "min_items": 4}
    tasks = ev.build_tasks({"es": root / "es.parquet"}, options, root / "tasks")
    loaded = TaskManager(include_path=str(root / "tasks" / "yaml")).load(list(tasks))["tasks"]
    for name, entry in tasks.items():
        assert len(list(loaded[name].test_docs())) == entry["n_items"] == 20
        assert "a #b" in str(loaded[name].config.dataset_kwargs["data_files"])


def _mirrored_belebele(tmp_path, passage_lengths):
    """A local Belebele mirror for 'ca' whose prompts have known word counts (the word tokenizer gives
    one token per whitespace-separated word)."""
    rng = np.random.default_rng(5)
    (tmp_path / "m" / "belebele").mkdir(parents=True)
    rows = [{"link": f"l{i}", "question_number": "1", "flores_passage": " ".join(rng.choice(WORDS, n)),
             "question": "w3 w4", **{f"mc_answer{j}": str(rng.choice(WORDS)) for j in range(1, 5)},
             "correct_answer_num": str(1 + i % 4), "dialect": "cat_Latn", "ds": "x"} for i, n in enumerate(passage_lengths)]
    pl.DataFrame(rows, schema={c: pl.String for c in ev.BELEBELE_COLUMNS}).write_parquet(
        tmp_path / "m" / "belebele" / "cat_Latn.parquet")
    pl.DataFrame({"doc_id": ["a"], "lang": ["ca"], "text": ["x y z"], "split": ["test"]}).write_parquet(tmp_path / "ca.parquet")
    return rows


def test_prompts_longer_than_the_context_are_left_out_and_counted_not_truncated(tmp_path):
    import logging

    lengths = [60] + list(range(2, 58, 2))  # the first item is each prompt's 1-shot example: too long for any
    rows = _mirrored_belebele(tmp_path, lengths)
    options = {"tasks": ["belebele"], "belebele_shots": 1, "max_items": 5, "min_items": 5, "mirror": str(tmp_path / "m")}
    tasks = ev.build_tasks({"ca": tmp_path / "ca.parquet"}, options, tmp_path / "tasks")
    model = tiny_model("olmoe", seed=1).eval()
    model.config.eos_token_id = model.config.bos_token_id = 2
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lm_eval").addHandler(handler)
    try:
        result = ev.run_harness(model, word_tokenizer(), list(tasks), tmp_path / "tasks", 1,
                                {"batch_size": 4, "seed": 0, "max_length": 40, "min_items": 5}, log_samples=True)
    finally:
        logging.getLogger("lm_eval").removeHandler(handler)
    # Independent count, 0 shots: "P:" passage "Q:" question, four "X:" answer lines, "Answer:", then the letter.
    fits = [len(ev_prompt.split()) + 1 <= 41 for ev_prompt in (
        f"P: {r['flores_passage']}\nQ: {r['question']}\nA: {r['mc_answer1']}\nB: {r['mc_answer2']}\n"
        f"C: {r['mc_answer3']}\nD: {r['mc_answer4']}\nAnswer:" for r in rows)]
    fit = result["moelang"]["fit"]["moelang_belebele_cat_Latn"]
    assert fit["n_shot"] == 0  # with its 60-word example no 1-shot prompt fits 40 positions
    assert fit["left_out"] == fits.count(False) == 16 and fit["n_docs"] == len(rows)
    assert result["n-samples"]["moelang_belebele_cat_Latn"]["effective"] == fits.count(True)
    assert sorted(s["doc_id"] for s in result["samples"]["moelang_belebele_cat_Latn"]) == \
        [i for i, ok in enumerate(fits) if ok]
    assert not [r for r in records if "Truncating" in r.getMessage()]
    assert sum(result["moelang"]["predictions"]["moelang_belebele_cat_Latn"]["acc"]) == fits.count(True)


def test_shots_are_kept_while_nine_in_ten_prompts_fit(tmp_path):
    _mirrored_belebele(tmp_path, [4] * 19 + [200])  # 1-shot prompts: about 40 words; one item of 200 words
    options = {"tasks": ["belebele"], "belebele_shots": 1, "max_items": 5, "min_items": 5, "mirror": str(tmp_path / "m")}
    tasks = ev.build_tasks({"ca": tmp_path / "ca.parquet"}, options, tmp_path / "tasks")
    model = tiny_model("olmoe", seed=1).eval()
    model.config.eos_token_id = model.config.bos_token_id = 2
    result = ev.run_harness(model, word_tokenizer(), list(tasks), tmp_path / "tasks", 1,
                            {"batch_size": 8, "seed": 0, "max_length": 60, "min_items": 5})
    assert result["moelang"]["fit"]["moelang_belebele_cat_Latn"] == {"n_shot": 1, "n_docs": 20, "left_out": 1,
                                                                      "max_length": 60}
    assert result["n-shot"]["moelang_belebele_cat_Latn"] == 1


def test_one_job_per_model_writes_what_the_per_family_jobs_wrote(tmp_path, monkeypatch):
    """All families through one harness run (two shot counts: a 1-shot mirrored Belebele task and
    zero-shot synthetic ones) give each family's file exactly as a job of that family alone."""
    import lm_eval.tasks

    _mirrored_belebele(tmp_path, [4, 6, 8, 5, 7] * 4)
    rng = np.random.default_rng(2)
    docs = [" ".join(rng.choice(WORDS, rng.integers(6, 14))) for _ in range(80)]
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(80)], "lang": ["ca"] * 80, "text": docs,
                  "split": ["test"] * 80}).write_parquet(tmp_path / "ca.parquet")
    families = ["synthetic_blimp", "synthetic_belebele", "belebele"]
    tasks = ev.build_tasks({"ca": tmp_path / "ca.parquet"}, {"tasks": families, "belebele_shots": 1, "max_items": 16,
                                                            "min_items": 4, "mirror": str(tmp_path / "m")},
                           tmp_path / "tasks")
    assert sorted(t["n_shot"] for t in tasks.values()) == [0, 0, 1]
    model = tiny_model("olmoe", seed=1).eval()
    model.config.eos_token_id = model.config.bos_token_id = 2
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    tokens = {"ca": write_tokens(tmp_path / "tokens.parquet", [[5, 6, 7, 8, 9, 10], [20, 21], [11, 12, 13]],
                                 ["test", "dev", "test"])}
    options = {"batch_size": 4, "seed": 0, "bootstrap_iters": 50, "tokens_per_language": None, "seq_len": 4,
               "batch_tokens": 8}
    indexed = []
    manager_class = lm_eval.tasks.TaskManager

    class RecordingManager(manager_class):
        def __init__(self, *args, **kwargs):
            indexed.append(kwargs.get("include_defaults", True))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", RecordingManager)
    ev.evaluate_model(str(tmp_path / "model"), [*families, "perplexity"], tasks, tmp_path / "tasks", tokens, options,
                      tmp_path / "one")
    for family in [*families, "perplexity"]:
        ev.evaluate_model(str(tmp_path / "model"), [family], tasks, tmp_path / "tasks", tokens, options,
                          tmp_path / "apart")
    # local tasks only: the harness's own task index (thousands of YAMLs) is never built
    assert indexed == [False] * 4
    for family in families:
        one = json.loads((tmp_path / "one" / f"{family}.json").read_text())
        apart = json.loads((tmp_path / "apart" / f"{family}.json").read_text())
        names = {n for n, t in tasks.items() if t["family"] == family}
        assert set(one["results"]) == set(one["moelang"]["fit"]) == set(one["n-shot"]) == names
        assert one == apart
    assert json.loads((tmp_path / "one" / "belebele.json").read_text())["n-shot"] == {"moelang_belebele_cat_Latn": 1}
    one, apart = (pl.read_parquet(tmp_path / d / "perplexity.parquet") for d in ("one", "apart"))
    assert one.equals(apart) and one["n_tokens"].to_list() == [9]  # every test token is predicted, no dev one
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted([f"{f}.json" for f in families]
                                                                         + ["perplexity.parquet"])


def test_an_unknown_family_perplexity_without_tokens_or_a_file_as_out_stop_before_loading_the_model(tmp_path):
    with pytest.raises(MoelangError, match="unknown task family 'blimp'"):
        ev.evaluate_model(str(tmp_path / "absent"), ["blimp"], {}, tmp_path, {}, {}, tmp_path / "out")
    with pytest.raises(MoelangError, match="perplexity needs --tokens"):
        ev.evaluate_model(str(tmp_path / "absent"), ["perplexity"], {}, tmp_path, {}, {}, tmp_path / "out")
    with pytest.raises(MoelangError, match="looks like a file; give the model's directory"):
        ev.evaluate_model(str(tmp_path / "absent"), ["synthetic_blimp"], {}, tmp_path, {}, {}, tmp_path / "out.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()


def test_repeated_warnings_are_counted_and_summarised_once_per_kind():
    import logging

    seen, summary = [], []
    catch, note = logging.Handler(), logging.Handler()
    catch.emit, note.emit = seen.append, summary.append
    logging.getLogger("lm_eval").addHandler(catch)
    logging.getLogger("moelang").addHandler(note)
    hf = logging.getLogger("lm_eval.models.huggingface")
    level = hf.level
    hf.setLevel(logging.INFO)
    try:
        with ev.repeated_warnings():
            for i in range(500):
                hf.warning(f"Combined length of context ({500 + i}) and continuation (1) exceeds model's maximum "
                           f"length (512). Truncating {i + 2} tokens from the left.")
            hf.warning("a different warning")
            hf.info("progress %d", 1)
            hf.info("progress %d", 2)
            assert hf.level == logging.WARNING
        assert hf.level == logging.INFO  # as it was on entry
        hf.warning("after the job: printed again")
    finally:
        logging.getLogger("lm_eval").removeHandler(catch)
        logging.getLogger("moelang").removeHandler(note)
        hf.setLevel(level)
    messages = [r.getMessage() for r in seen]
    assert sum("Truncating" in m for m in messages) == 1
    assert messages.count("a different warning") == 1 and messages.count("after the job: printed again") == 1
    # lm-eval's per-task INFO chatter is off during the job (moelang -v keeps it), and back after it
    assert [m for m in messages if m.startswith("progress")] == []
    assert hf.level == level
    lines = [r.getMessage() for r in summary]
    assert len(lines) == 1 and "repeated 499 more times" in lines[0] and "Truncating N tokens" in lines[0]


def _fake_eval(tmp_path, models, accuracies, picks):
    """results/eval as the evaluate jobs leave it: one synthetic Belebele task per language."""
    tasks = {f"moelang_synthetic_belebele_{lang}": {"family": "synthetic_belebele", "lang": lang, "n_shot": 0,
                                                    "synthetic": True} for lang in ("es", "ca")}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tasks.json").write_text(json.dumps(tasks))
    for name in models:
        (tmp_path / name).mkdir()
        results = {t: {"acc,none": accuracies[name], "acc_norm,none": accuracies[name], "acc_stderr,none": 0.04,
                       "acc_norm_stderr,none": 0.04} for t in tasks}
        (tmp_path / name / "synthetic_belebele.json").write_text(json.dumps({
            "results": results, "n-samples": {t: {"effective": 100, "original": 104} for t in tasks},
            "moelang": {"fit": {t: {"n_shot": 0, "n_docs": 104, "left_out": 4, "max_length": 512} for t in tasks},
                        "predictions": {t: {"acc": picks[name], "acc_norm": picks[name]} for t in tasks}}}))
    return tasks


def test_models_keep_the_registry_order_and_results_flag_chance_and_constant_answers(tmp_path):
    import math

    from moelang import config as cfg

    # the rule's options list the models in the registry's order (base, CPT by step, others), which
    # JSON's sorted keys would lose
    (tmp_path / "lora-model").mkdir()
    (tmp_path / "lora-model" / "config.json").write_text("{}")
    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4}, "model": {"cpt": {"train": {"steps": 1000}}},
                           "evaluation": {"models": {"lora": {"ref": str(tmp_path / "lora-model"), "method": "lora"}}}})
    summary_options = cfg.eval_summary_options(config, ["synthetic_belebele"])
    adapted = [f"adapt-ca-{m}" for m in config["adapt"]["methods"]]
    assert summary_options.order == ["cpt-step0", "cpt-step250", "cpt-step500", "cpt-step750", "cpt-step1000",
                                     *adapted, "lora"]
    models = {"cpt-step0": {"method": "base"}, "cpt-step50": {"method": "cpt"}, "cpt-step200": {"method": "cpt"},
              "cpt-step1000": {"method": "cpt"}, "lora": {"method": "lora"}}
    accuracies = {"cpt-step0": 0.25, "cpt-step50": 0.31, "cpt-step200": 0.36, "cpt-step1000": 0.45, "lora": 0.28}
    picks = {name: [25, 25, 25, 25] for name in models} | {"cpt-step0": [100, 0, 0, 0]}
    _fake_eval(tmp_path, models, accuracies, picks)
    table = ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_belebele"], ["es"], ["ca"], "cpt-step0")
    order = ["cpt-step0", "cpt-step50", "cpt-step200", "cpt-step1000", "lora"]
    assert table["model"].unique(maintain_order=True).to_list() == order
    assert pl.read_parquet(tmp_path / "results.parquet").schema == pl.Schema(ev.RESULTS_SCHEMA)
    # One-sided binomial tail, computed here independently of scipy.
    for name, acc in accuracies.items():
        k = round(acc * 100)
        tail = sum(math.comb(100, j) * 0.25 ** j * 0.75 ** (100 - j) for j in range(k, 101))
        assert table.filter(pl.col("model") == name)["p_chance"].to_list() == pytest.approx([tail] * 4, rel=1e-9)
    assert (table["chance"] == 0.25).all() and (table["n_left_out"] == 4).all()
    summary = (tmp_path / "summary.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines() if line.startswith("| cpt-") or line.startswith("| lora")]
    assert rows == order
    flags = [line for line in summary.splitlines() if line.startswith("- ")]
    # 0.25, 0.31 and 0.28 of 100 items: within noise of 1/4 (p = 0.55, 0.10, 0.28); 0.36 and 0.45 are not.
    assert {f.split(":")[0][2:] for f in flags if "within noise of chance" in f} == {"cpt-step0", "cpt-step50", "lora"}
    assert [f for f in flags if "same choice for every item" in f] == ["- cpt-step0: the same choice for every item (ca, es)"]
    assert "| cpt-step1000 | cpt | - | 0.450 | 0.450 | 0.450 | 2/2 | +0.200 |" in summary


def _fake_adaptation_eval(tmp_path, models, langs, rng):
    """results/eval for ``models`` with a value per (model, family, metric, language) and perplexities;
    returns them as nested dicts for an independent computation."""
    metrics = {"synthetic_blimp": ["acc", "acc_norm"], "synthetic_belebele": ["acc", "acc_norm", "acc_mutual_info"]}
    tasks = {f"moelang_{family}_{lang}": {"family": family, "lang": lang, "n_shot": 0, "synthetic": True}
             for family in metrics for lang in langs}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tasks.json").write_text(json.dumps(tasks))
    values, ppl = {}, {}
    for name in models:
        (tmp_path / name).mkdir()
        for family, names in metrics.items():
            results = {}
            for lang in langs:
                for metric in names:
                    values[name, family, metric, lang] = round(float(rng.uniform(0.2, 0.9)), 2)
                results[f"moelang_{family}_{lang}"] = {f"{m},none": values[name, family, m, lang] for m in names}
            (tmp_path / name / f"{family}.json").write_text(json.dumps({
                "results": results, "n-samples": {t: {"effective": 100} for t in results}, "moelang": {}}))
        ppl[name] = {lang: float(rng.uniform(20, 400)) for lang in langs}
        pl.DataFrame({"lang": langs, "n_tokens": [1000] * len(langs), "nll": [0.0] * len(langs),
                      "perplexity": [ppl[name][lang] for lang in langs]}).write_parquet(tmp_path / name / "perplexity.parquet")
    return values, ppl


def test_adapted_models_get_their_gain_forgetting_and_fraction_against_their_start_model(tmp_path):
    import math

    high_resource, targets = ["en", "es", "ru"], ["ca", "uk"]
    start = {"method": "cpt", "target": None, "start": None}
    adapted = {"ssft-ca": ("ssft", "ca", 0.021), "aeft-ca": ("aeft", "ca", 0.18), "ssft-uk": ("ssft", "uk", 0.019)}
    models = {"cpt-step0": {"method": "base"}, "cpt-step800": start,
              **{name: {"method": method, "target": target, "start": "cpt-step800", "trainable_fraction": fraction,
                        "ref": str(tmp_path / "no-record")} for name, (method, target, fraction) in adapted.items()},
              "listed": {"method": "lora", "trainable_fraction": 0.01}}
    values, ppl = _fake_adaptation_eval(tmp_path, models, high_resource + targets, np.random.default_rng(4))
    # uk's models are listed before ca's: rows follow the targets' order, then the models'
    models = {name: models[name] for name in ["cpt-step0", "cpt-step800", "ssft-uk", "ssft-ca", "aeft-ca", "listed"]}
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], high_resource,
                 targets, "cpt-step0")
    table = pl.read_parquet(tmp_path / "adaptation.parquet")
    assert table.schema == pl.Schema(ev.ADAPTATION_SCHEMA)
    assert table.select("target", "model").unique(maintain_order=True).rows() == \
        [("ca", "ssft-ca"), ("ca", "aeft-ca"), ("uk", "ssft-uk")]
    headline = {"synthetic_belebele": "acc_mutual_info", "synthetic_blimp": "acc_norm"}
    for name, (method, target, fraction) in adapted.items():
        rows = {r["family"]: r for r in table.filter(pl.col("model") == name).iter_rows(named=True)}
        assert set(rows) == {"synthetic_belebele", "synthetic_blimp", "perplexity"}
        for family, metric in headline.items():
            row = rows[family]
            mine, theirs = values[name, family, metric, target], values["cpt-step800", family, metric, target]
            changes = [values[name, family, metric, l] - values["cpt-step800", family, metric, l] for l in high_resource]
            assert (row["method"], row["start"], row["metric"], row["n_hr"]) == (method, "cpt-step800", metric, 3)
            assert row["trainable_fraction"] == fraction
            assert (row["value"], row["start_value"]) == (mine, theirs)
            assert row["target_gain"] == pytest.approx(mine - theirs, abs=1e-12)
            assert row["hr_change"] == pytest.approx(sum(changes) / 3, abs=1e-12)
        row = rows["perplexity"]
        assert row["target_gain"] == pytest.approx(ppl[name][target] / ppl["cpt-step800"][target], rel=1e-12)
        ratios = [ppl[name][l] / ppl["cpt-step800"][l] for l in high_resource]
        assert row["hr_change"] == pytest.approx(math.prod(ratios) ** (1 / 3), rel=1e-12)
    summary = (tmp_path / "summary.md").read_text()
    section = summary[summary.index("## Adaptation"):]
    rows = [line for line in section.splitlines() if line.startswith("| ca ") or line.startswith("| uk ")]
    assert [r.split(" | ")[2] for r in rows] == ["ssft-ca", "aeft-ca", "ssft-uk"]  # not the base, CPT or listed models
    ca = table.filter(pl.col("model") == "ssft-ca")
    cells = [f"{ca.filter(pl.col('family') == f)['target_gain'][0]:+.3f}" for f in ("synthetic_belebele", "synthetic_blimp")]
    cells += [f"x{ca.filter(pl.col('family') == 'perplexity')['target_gain'][0]:.3g}"]
    assert rows[0].startswith(f"| ca | ssft | ssft-ca | cpt-step800 | 0.021 | {' | '.join(cells)} | ")


def test_an_adapted_model_whose_start_was_not_evaluated_has_no_comparison(tmp_path):
    models = {"cpt-step0": {"method": "base"},
              "seft-ca": {"method": "seft", "target": "ca", "start": "hub-model", "trainable_fraction": 0.01}}
    _fake_adaptation_eval(tmp_path, models, ["es", "ca"], np.random.default_rng(5))
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], ["es"], ["ca"],
                 "cpt-step0")
    table = pl.read_parquet(tmp_path / "adaptation.parquet")
    assert table.height == 3 and table["target_gain"].is_null().all() and table["value"].is_not_null().all()
    assert (table["n_hr"] == 0).all()
    assert "No comparison where the start model was not evaluated: hub-model." in (tmp_path / "summary.md").read_text()


def test_adapted_models_that_were_not_trained_are_listed_as_not_evaluated(tmp_path):
    models = {"cpt-step0": {"method": "base"},
              "seft-ca": {"method": "seft", "target": "ca", "start": "cpt-step0", "trainable_fraction": 0.01}}
    _fake_adaptation_eval(tmp_path, models, ["es", "ca"], np.random.default_rng(5))
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], ["es"], ["ca"],
                 "cpt-step0", not_evaluated={"adapt-ca-random_hr": "its expert set is empty in every adapted layer"})
    summary = (tmp_path / "summary.md").read_text()
    assert "## Not evaluated" in summary
    assert "- `adapt-ca-random_hr`: not trained, its expert set is empty in every adapted layer" in summary
    table = pl.read_parquet(tmp_path / "adaptation.parquet")
    assert set(table["model"]) == {"seft-ca"}  # no row, no score for the model that was not trained
    assert "random_hr" not in set(pl.read_parquet(tmp_path / "results.parquet")["method"])


def test_without_adapted_models_the_adaptation_table_is_empty_and_the_summary_has_no_section(tmp_path):
    models = {"cpt-step0": {"method": "base"}, "cpt-step800": {"method": "cpt"}}
    _fake_adaptation_eval(tmp_path, models, ["es", "ca"], np.random.default_rng(6))
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], ["es"], ["ca"],
                 "cpt-step0")
    table = pl.read_parquet(tmp_path / "adaptation.parquet")
    assert table.height == 0 and table.schema == pl.Schema(ev.ADAPTATION_SCHEMA)
    assert "## Adaptation" not in (tmp_path / "summary.md").read_text()


def test_docs_list_the_adaptation_table_columns_with_their_types():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "outputs.md").read_text()
    section = text[text.index("`results/eval/adaptation.parquet`"):]
    section = section[:section.index("\n\n", section.index("| column |"))]
    documented = {cells[1].strip("` "): cells[2].strip() for cells in (line.split("|") for line in section.splitlines()
                                                                       if line.startswith("| `"))}
    names = {pl.String: "string", pl.Float64: "float64", pl.Int64: "int64"}
    assert documented == {column: names[dtype] for column, dtype in ev.ADAPTATION_SCHEMA.items()}


def test_templates_compiled_once_render_as_the_harness_does_and_are_put_back():
    from lm_eval import utils

    original = utils.apply_template
    docs = [{"flores_passage": f"w{i} w{i + 1}", "mc_answer1": "a", "mc_answer2": f"b{i}"} for i in range(5)]
    templates = ["P: {{flores_passage}}\nAnswer:", "{{[mc_answer1, mc_answer2]}}", "{{flores_passage | upper}}"]
    expected = [original(t, d) for t in templates for d in docs]
    with ev.templates_compiled_once():
        assert utils.apply_template is not original
        assert [utils.apply_template(t, d) for t in templates for d in docs] == expected
    assert utils.apply_template is original


def test_expanded_models_get_their_new_language_gain_and_old_language_forgetting(tmp_path):
    import math

    old, new = ["en", "es"], ["ca", "uk"]
    start = "cpt-step800"
    variants = {"layermoe": 0.004, "uniform": 0.003}
    models = {"cpt-step0": {"method": "base"}, start: {"method": "cpt"},
              "adapt-ca-ssft": {"method": "ssft", "target": "ca", "start": start, "trainable_fraction": 0.02},
              **{f"expand-{v}": {"method": v, "variant": v, "start": start, "trainable_fraction": fraction,
                                 "ref": str(tmp_path / "no-record")} for v, fraction in variants.items()}}
    # ru is scored but is neither old nor new: it enters neither side
    values, ppl = _fake_adaptation_eval(tmp_path, models, old + new + ["ru"], np.random.default_rng(7))
    runs = tmp_path / "runs.parquet"
    pl.DataFrame({"variant": ["layermoe"], "new_experts": [48], "stage1_trainable_fraction": [0.31],
                  "stage2_trainable_fraction": [0.0011]}).write_parquet(runs)
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], old, new,
                 "cpt-step0", expand_old=old, expand_new=new, expand_runs=runs)
    table = pl.read_parquet(tmp_path / "expansion.parquet")
    assert table.schema == pl.Schema(ev.EXPANSION_SCHEMA)
    assert table.select("variant", "model").unique(maintain_order=True).rows() == \
        [("layermoe", "expand-layermoe"), ("uniform", "expand-uniform")]  # not the adapted or CPT models
    headline = {"synthetic_belebele": "acc_mutual_info", "synthetic_blimp": "acc_norm"}
    for variant in variants:
        name = f"expand-{variant}"
        rows = {r["family"]: r for r in table.filter(pl.col("variant") == variant).iter_rows(named=True)}
        assert set(rows) == {"synthetic_belebele", "synthetic_blimp", "perplexity"}
        for family, metric in headline.items():
            row = rows[family]
            gains = [values[name, family, metric, l] - values[start, family, metric, l] for l in new]
            changes = [values[name, family, metric, l] - values[start, family, metric, l] for l in old]
            assert (row["metric"], row["start"], row["n_new"], row["n_old"]) == (metric, start, 2, 2)
            assert row["new_gain"] == pytest.approx(sum(gains) / 2, abs=1e-12)
            assert row["old_change"] == pytest.approx(sum(changes) / 2, abs=1e-12)
            assert row["value_new"] == pytest.approx(sum(values[name, family, metric, l] for l in new) / 2, abs=1e-12)
            assert row["start_old"] == pytest.approx(sum(values[start, family, metric, l] for l in old) / 2, abs=1e-12)
        row = rows["perplexity"]
        new_ratios = [ppl[name][l] / ppl[start][l] for l in new]
        old_ratios = [ppl[name][l] / ppl[start][l] for l in old]
        assert row["new_gain"] == pytest.approx(math.sqrt(math.prod(new_ratios)), rel=1e-12)
        assert row["old_change"] == pytest.approx(math.sqrt(math.prod(old_ratios)), rel=1e-12)
        assert row["value_new"] == pytest.approx(math.sqrt(ppl[name]["ca"] * ppl[name]["uk"]), rel=1e-12)
    layermoe = table.filter(pl.col("variant") == "layermoe").row(0, named=True)
    assert (layermoe["new_experts"], layermoe["stage1_trainable_fraction"], layermoe["stage2_trainable_fraction"]) == \
        (48, 0.31, 0.0011)
    # a variant missing from the runs table: no expert count, its stage-2 fraction from the model entry
    uniform = table.filter(pl.col("variant") == "uniform").row(0, named=True)
    assert uniform["new_experts"] is None and uniform["stage1_trainable_fraction"] is None
    assert uniform["stage2_trainable_fraction"] == 0.003
    summary = (tmp_path / "summary.md").read_text()
    section = summary[summary.index("## Expansion"):]
    assert "new languages (ca, uk)" in section and "old languages (en, es)" in section
    lines = [line for line in section.splitlines() if line.startswith("| layermoe ") or line.startswith("| uniform ")]
    cells = [f"{layermoe_row['new_gain']:+.3f}" for layermoe_row in
             (table.filter((pl.col("variant") == "layermoe") & (pl.col("family") == f)).row(0, named=True)
              for f in ("synthetic_belebele", "synthetic_blimp"))]
    assert lines[0].startswith(f"| layermoe | expand-layermoe | {start} | 48 | 0.31 / 0.0011 | {' | '.join(cells)} | ")
    assert lines[1].startswith(f"| uniform | expand-uniform | {start} | - | - / 0.003 | ")
    assert "## Adaptation" in summary  # the adapted model keeps its own section


def test_variants_sharing_a_model_repeat_its_numbers_under_their_names_and_are_marked(tmp_path):
    """Coinciding plans: only expand-layermoe and expand-uniform were trained and evaluated; the runs
    table's trained_as gives mola and routing-informed their model."""
    old, new = ["en", "es"], ["ca"]
    start = "cpt-step800"
    models = {start: {"method": "cpt"},
              **{f"expand-{v}": {"method": v, "variant": v, "start": start, "trainable_fraction": 0.001,
                                 "ref": str(tmp_path / "no-record")} for v in ("layermoe", "uniform")}}
    _, ppl = _fake_adaptation_eval(tmp_path, models, old + new, np.random.default_rng(3))
    runs = tmp_path / "runs.parquet"
    pl.DataFrame({"variant": ["layermoe", "uniform", "mola", "routing-informed"],
                  "trained_as": ["layermoe", "uniform", "uniform", "layermoe"], "new_experts": [4] * 4,
                  "stage1_trainable_fraction": [0.3] * 4, "stage2_trainable_fraction": [0.002, 0.001, 0.001, 0.002]}
                 ).write_parquet(runs)
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], old, new,
                 start, expand_old=old, expand_new=new, expand_runs=runs)
    table = pl.read_parquet(tmp_path / "expansion.parquet")
    assert table.select("variant", "model").unique(maintain_order=True).rows() == [
        ("layermoe", "expand-layermoe"), ("routing-informed", "expand-layermoe"), ("uniform", "expand-uniform"),
        ("mola", "expand-uniform")]
    ppl_rows = {r["variant"]: r for r in table.filter(pl.col("family") == "perplexity").iter_rows(named=True)}
    for variant, model in (("mola", "expand-uniform"), ("routing-informed", "expand-layermoe")):
        assert ppl_rows[variant]["new_gain"] == pytest.approx(ppl[model]["ca"] / ppl[start]["ca"], rel=1e-12)
        others = [c for c in table.columns if c != "variant"]
        assert table.filter(pl.col("variant") == variant).select(others).equals(
            table.filter(pl.col("variant") == model.removeprefix("expand-")).select(others))
    summary = (tmp_path / "summary.md").read_text()
    assert "| mola (shares uniform's model: same plan and classifier) | expand-uniform |" in summary
    assert "| routing-informed (shares layermoe's model: same plan and classifier) | expand-layermoe |" in summary
    assert "| uniform | expand-uniform |" in summary


def test_without_expanded_models_the_expansion_table_is_empty_and_the_summary_has_no_section(tmp_path):
    models = {"cpt-step0": {"method": "base"}, "cpt-step800": {"method": "cpt"}}
    _fake_adaptation_eval(tmp_path, models, ["es", "ca"], np.random.default_rng(8))
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], ["es"], ["ca"],
                 "cpt-step0")
    table = pl.read_parquet(tmp_path / "expansion.parquet")
    assert table.height == 0 and table.schema == pl.Schema(ev.EXPANSION_SCHEMA)
    assert "## Expansion" not in (tmp_path / "summary.md").read_text()


def test_an_expanded_model_whose_start_was_not_evaluated_has_no_comparison(tmp_path):
    models = {"cpt-step0": {"method": "base"},
              "expand-mola": {"method": "mola", "variant": "mola", "start": "Qwen/Qwen1.5-1.8B"}}
    _fake_adaptation_eval(tmp_path, models, ["es", "ca"], np.random.default_rng(9))
    ev.summarize(tmp_path, models, tmp_path / "tasks", ["synthetic_blimp", "synthetic_belebele"], ["es"], ["ca"],
                 "cpt-step0", expand_old=["es"], expand_new=["ca"])
    table = pl.read_parquet(tmp_path / "expansion.parquet")
    assert table.height == 3 and table["new_gain"].is_null().all() and table["old_change"].is_null().all()
    assert (table["n_new"] == 0).all()
    assert "No comparison where the start model was not evaluated: Qwen/Qwen1.5-1.8B." in \
        (tmp_path / "summary.md").read_text()


def test_docs_list_the_expansion_table_columns_with_their_types():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "outputs.md").read_text()
    section = text[text.index("`results/eval/expansion.parquet`"):]
    section = section[:section.index("\n\n", section.index("| column |"))]
    documented = {cells[1].strip("` "): cells[2].strip() for cells in (line.split("|") for line in section.splitlines()
                                                                       if line.startswith("| `"))}
    names = {pl.String: "string", pl.Float64: "float64", pl.Int64: "int64"}
    assert documented == {column: names[dtype] for column, dtype in ev.EXPANSION_SCHEMA.items()}


def test_harness_bars_are_log_lines_off_a_terminal_and_restored_after(monkeypatch):
    """lm-eval passes disable=False to its bars (so TQDM_DISABLE does not reach them): in a log file
    each redraw was a line of carriage returns; under harness_progress they are moelang's log lines."""
    import lm_eval.api.model
    import lm_eval.models.huggingface

    from moelang import io
    from moelang.evaluate import harness_progress

    monkeypatch.setattr(io, "_stderr_is_terminal", lambda: False)
    original = lm_eval.models.huggingface.tqdm
    with harness_progress():
        bar = lm_eval.models.huggingface.tqdm(range(5), disable=False, desc="Running loglikelihood requests")
        assert isinstance(bar, io.LogProgress) and bar.total == 5 and list(bar) == list(range(5))
        assert isinstance(lm_eval.api.model.tqdm(total=3, disable=False), io.LogProgress)
    assert lm_eval.models.huggingface.tqdm is original

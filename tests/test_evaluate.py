
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
                  "split": ["heldout"] * 120}).write_parquet(root / "es.parquet")
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


def test_generated_yamls_load_and_keep_the_shipped_prompt(setup):
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
    assert bele.doc_to_text == shipped["belebele"]["doc_to_text"]
    assert [m["metric"] for m in bele.metric_list] == ["acc", "acc_norm"]


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


def test_perplexity_equals_an_independent_computation(tmp_path):
    model = tiny_model("olmoe", seed=2).eval()
    docs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    path = write_tokens(tmp_path / "t.parquet", docs, splits=["heldout"] * 3)
    got = ev.perplexity(model, path, eos_id=2, options={"seq_len": 4, "batch_tokens": 8, "tokens_per_language": None})
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
    pl.DataFrame({"doc_id": ["a"], "lang": ["ca"], "text": ["x y z"], "split": ["heldout"]}).write_parquet(tmp_path / "ca.parquet")
    options = {"tasks": ["belebele"], "belebele_shots": 4, "max_items": 5, "min_items": 1, "mirror": str(tmp_path / "m")}
    with pytest.raises(MoelangError) as info:
        ev.build_tasks({"ca": tmp_path / "ca.parquet"}, options, tmp_path / "tasks")
    message = str(info.value)
    assert "facebook/belebele" in message and str(tmp_path / "m" / "belebele" / "cat_Latn.parquet") in message
    assert not (tmp_path / "tasks").exists()


def test_mirrored_real_task_includes_the_shipped_template(tmp_path):
    from lm_eval.tasks import TaskManager

    pl.DataFrame({"doc_id": ["a"], "lang": ["ca"], "text": ["x y z"], "split": ["heldout"]}).write_parquet(tmp_path / "ca.parquet")
    (tmp_path / "m" / "multiblimp").mkdir(parents=True)
    pl.DataFrame({c: ["x"] for c in ev.BLIMP_COLUMNS}).write_parquet(tmp_path / "m" / "multiblimp" / "cat.parquet")
    options = {"tasks": ["multiblimp"], "belebele_shots": 4, "max_items": 5, "min_items": 1, "mirror": str(tmp_path / "m")}
    tasks = ev.build_tasks({"ca": tmp_path / "ca.parquet"}, options, tmp_path / "tasks")
    assert tasks == {"moelang_multiblimp_cat": {"family": "multiblimp", "lang": "ca", "n_shot": 0, "synthetic": False,
                                                "mirror": str(tmp_path / "m" / "multiblimp" / "cat.parquet")}}
    task = TaskManager(include_path=str(tmp_path / "tasks" / "yaml")).load(["moelang_multiblimp_cat"])["tasks"]
    assert task["moelang_multiblimp_cat"].config.doc_to_choice == "{{[sen,wrong_sen]}}"

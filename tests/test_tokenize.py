from collections import Counter

import pyarrow.parquet as pq
import pytest

from conftest import base_options, write_lines
from moelang import corpus, tokenize
from moelang.errors import MoelangError
from test_corpus import sentences

ES = ["el gato come pescado", "la casa es grande", "mañana será otro día", "¿dónde está la biblioteca?"]


@pytest.fixture(scope="module")
def small_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    paths = {}
    texts = {"en": sentences(600, seed=11) + ["the cat eats fish", "the house is big"],
             "es": [s + " " + ES[i % 4] for i, s in enumerate(sentences(300, seed=12))]}
    for lang, lines in texts.items():
        src = write_lines(root / "src" / f"{lang}.txt", lines)
        corpus.build_corpus(lang, base_options({"type": "local", "path": str(src)}, min_chars=10),
                            root / f"{lang}.parquet", root / f"{lang}.json")
        paths[lang] = root / f"{lang}.parquet"
    options = {"vocab_size": 400, "min_frequency": 2, "base_language_fraction": 1.0,
               "other_language_fraction": 0.2, "seed": 0}
    mix = tokenize.train_tokenizer(paths, options, "en", root / "tokenizer")
    return root, paths, mix


def test_trained_tokenizer_is_a_transformers_tokenizer_with_an_english_heavy_mix(small_corpora):
    from transformers import AutoTokenizer

    root, paths, mix = small_corpora
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert tok.is_fast and tok.eos_token == tokenize.EOS_TOKEN and tok.pad_token == tokenize.PAD_TOKEN
    assert tok.decode(tok("mañana será otro día", add_special_tokens=False)["input_ids"]) == "mañana será otro día"
    n_train = {lang: sum(s == "train" for s in pq.read_table(p).column("split").to_pylist()) for lang, p in paths.items()}
    assert mix["en"]["n_docs"] == n_train["en"]
    assert 0.1 * n_train["es"] < mix["es"]["n_docs"] < 0.3 * n_train["es"]
    assert mix["en"]["char_share"] > mix["es"]["char_share"]


def test_training_is_deterministic(small_corpora, tmp_path):
    root, paths, _ = small_corpora
    options = {"vocab_size": 400, "min_frequency": 2, "base_language_fraction": 1.0,
               "other_language_fraction": 0.2, "seed": 0}
    tokenize.train_tokenizer(paths, options, "en", tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (root / "tokenizer" / "tokenizer.json").read_text()


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
def test_token_ids_and_frequencies_equal_a_per_document_count(small_corpora, tmp_path, batch_size):
    from transformers import AutoTokenizer

    root, paths, _ = small_corpora
    out, freq = tmp_path / "es.parquet", tmp_path / "es.freq.parquet"
    summary = tokenize.tokenize_corpus(paths["es"], root / "tokenizer", out, freq, batch_size=batch_size)
    tokens = pq.read_table(out)
    assert tokens.schema.equals(tokenize.TOKENS_SCHEMA)
    source = pq.read_table(paths["es"])
    assert tokens.column("doc_id").to_pylist() == source.column("doc_id").to_pylist()
    assert tokens.column("split").to_pylist() == source.column("split").to_pylist()

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")  # the independent, one-document-at-a-time way
    expected = [tok(text, add_special_tokens=False)["input_ids"] for text in source.column("text").to_pylist()]
    assert tokens.column("input_ids").to_pylist() == expected
    assert tokens.column("n_tokens").to_pylist() == [len(ids) for ids in expected]

    counter = Counter(i for ids in expected for i in ids)
    table = pq.read_table(freq)
    assert table.schema.equals(tokenize.FREQ_SCHEMA)
    assert dict(zip(table.column("token_id").to_pylist(), table.column("count").to_pylist())) == dict(counter)
    assert table.column("token_id").to_pylist() == sorted(counter)
    assert summary == {"n_docs": source.num_rows, "n_tokens": sum(counter.values()), "n_types": len(counter)}


def test_missing_tokenizer_is_a_clear_error(small_corpora, tmp_path):
    _, paths, _ = small_corpora
    with pytest.raises(MoelangError, match="run the tokenizer rule first"):
        tokenize.tokenize_corpus(paths["es"], tmp_path / "nowhere", tmp_path / "t.parquet", tmp_path / "f.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_pretrained_tokenizer_from_a_local_directory_and_offline_hub_error(small_corpora, tmp_path):
    root, _, _ = small_corpora
    tokenize.fetch_tokenizer({"name_or_path": str(root / "tokenizer")}, tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").is_file()
    with pytest.raises(MoelangError, match="cannot load 'allenai/OLMoE-1B-7B-0924'"):
        tokenize.fetch_tokenizer({"name_or_path": "allenai/OLMoE-1B-7B-0924"}, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_encode_texts_offsets():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    array, flat, lengths = tokenize.encode_texts(backend, ["a b a", "", "b x"])
    assert array.to_pylist() == [[0, 1, 0], [], [1, 2]]
    assert flat.tolist() == [0, 1, 0, 1, 2] and lengths.tolist() == [3, 0, 2]


def per_document(backend, texts):
    return [backend.encode(t, add_special_tokens=False).ids for t in texts]


def test_joined_encoding_is_exact_for_the_trained_bpe_even_with_odd_documents(small_corpora):
    root, paths, _ = small_corpora
    backend = tokenize.load_backend(root / "tokenizer")
    texts = pq.read_table(paths["es"]).column("text").to_pylist()[:300]
    odd = texts[:100] + ["", "a", " spaced ", "tail <|endoftext|> inside", "🙂 emoji", "x" * 500] + texts[100:]
    for batch in (texts, odd):
        encoder = tokenize.BatchEncoder(backend, docs_per_segment=16)
        array, flat, lengths = encoder.encode(batch)
        assert array.to_pylist() == per_document(backend, batch)
        assert flat.tolist() == [i for ids in per_document(backend, batch) for i in ids]
    assert encoder.joined  # the fast path was decided exact (the batch with the separator text fell back)
    fresh = tokenize.BatchEncoder(backend, docs_per_segment=16)
    fresh.encode(texts)
    assert fresh.joined is True


def test_joined_encoding_falls_back_where_it_would_not_be_exact():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"▁a": 0, "▁b": 1, "a": 2, "b": 3, "▁": 4, "[UNK]": 5}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # prepend_scheme "first": only the first section of the input gets the "▁" prefix, so a
    # document after a separator would be encoded differently from the same document alone.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.add_special_tokens([AddedToken("<sep>", special=True)])
    texts = ["a b", "b a", "a", "b b"] * 10
    encoder = tokenize.BatchEncoder(backend, docs_per_segment=4)
    array, _, _ = encoder.encode(texts)
    assert array.to_pylist() == per_document(backend, texts)
    assert encoder.joined is False


@pytest.mark.parametrize("count", [2, 3, 7])
def test_token_shards_gather_to_exactly_the_one_job_files(small_corpora, tmp_path, count):
    root, paths, _ = small_corpora
    # a corpus in many small row groups, so shard boundaries fall inside and between groups
    small_groups = tmp_path / "es.parquet"
    pq.write_table(pq.read_table(paths["es"]), small_groups, row_group_size=37)
    one = tokenize.tokenize_corpus(small_groups, root / "tokenizer", tmp_path / "one.parquet", tmp_path / "one.freq.parquet")
    tokens, freqs = [], []
    for i in range(count):
        tokens.append(tmp_path / f"{i}.parquet")
        freqs.append(tmp_path / f"{i}.freq.parquet")
        tokenize.tokenize_corpus(small_groups, root / "tokenizer", tokens[-1], freqs[-1], batch_size=50, shard=(i, count))
    sizes = [pq.read_metadata(p).num_rows for p in tokens]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == one["n_docs"]
    gathered = tokenize.gather_tokens(tokens, freqs, tmp_path / "all.parquet", tmp_path / "all.freq.parquet")
    assert gathered["n_docs"] == one["n_docs"]
    assert pq.read_table(tmp_path / "all.parquet").equals(pq.read_table(tmp_path / "one.parquet"))
    assert pq.read_table(tmp_path / "all.freq.parquet").equals(pq.read_table(tmp_path / "one.freq.parquet"))
    # and the counts are those of the ids themselves (an independent count)
    ids = Counter(i for row in pq.read_table(tmp_path / "all.parquet").column("input_ids").to_pylist() for i in row)
    freq = pq.read_table(tmp_path / "all.freq.parquet").to_pydict()
    assert dict(zip(freq["token_id"], freq["count"])) == dict(ids)


def test_gather_refuses_mismatched_shards(small_corpora, tmp_path):
    root, paths, _ = small_corpora
    with pytest.raises(MoelangError, match="2 token shards but 1 frequency"):
        tokenize.gather_tokens([paths["es"], paths["es"]], [paths["es"]], tmp_path / "a", tmp_path / "b")
    with pytest.raises(MoelangError, match="is not a token file"):
        tokenize.gather_tokens([paths["es"]], [paths["es"]], tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists()

import gettext
import importlib.metadata
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import base_options, write_lines
from moelang import catalogs, corpus
from moelang.errors import MoelangError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def sentences(n, seed=0):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def build(tmp_path, source, lang="es", **overrides):
    options = base_options(source, **{"min_chars": 10, **overrides})
    out, stats = tmp_path / f"{lang}.parquet", tmp_path / f"{lang}.stats.json"
    result = corpus.build_corpus(lang, options, out, stats)
    return result, (pq.read_table(out) if out.exists() else None), stats


def independent_split(doc_id, salt, dev, test):
    """The split rule written out again, from the hash up: the score in [0, 1) of blake2b-64 over
    salt NUL doc_id; test below ``test``, dev below ``test + dev``, else train."""
    import hashlib

    score = int(hashlib.blake2b((salt + "\0" + doc_id).encode(), digest_size=8).hexdigest(), 16) / 2 ** 64
    return "test" if score < test else "dev" if score < test + dev else "train"


def test_three_way_split_matches_an_independent_hash_and_its_fractions():
    ids = [f"doc-{i}" for i in range(20000)]
    splits = [corpus.assign_split(d, "s", 0.1, 0.15) for d in ids]
    assert splits == [independent_split(d, "s", 0.1, 0.15) for d in ids]
    assert splits == [corpus.assign_split(d, "s", 0.1, 0.15) for d in reversed(ids)][::-1]
    for name, fraction in (("dev", 0.1), ("test", 0.15), ("train", 0.75)):
        assert abs(splits.count(name) / len(ids) - fraction) < 0.01  # binomial sd <= 0.0031
    other_salt = [corpus.assign_split(d, "t", 0.1, 0.15) for d in ids]
    assert other_salt != splits
    # growing dev only moves documents from train to dev, and never moves a test document
    bigger_dev = [corpus.assign_split(d, "s", 0.3, 0.15) for d in ids]
    assert all(b == a or (a, b) == ("train", "dev") for a, b in zip(splits, bigger_dev))
    assert [a == "test" for a in splits] == [b == "test" for b in bigger_dev]
    # the test split of a fraction f is the former single held-out split of heldout_fraction f
    # (score < f, the same hash), so reported numbers stay comparable with older runs
    old_heldout = [independent_split(d, "s", 0.0, 0.15) == "test" for d in ids]
    assert [a == "test" for a in splits] == old_heldout


def test_dev_and_test_documents_are_disjoint_and_sized_in_a_corpus(tmp_path):
    lines = sentences(3000, seed=7)
    path = write_lines(tmp_path / "src" / "es.txt", lines)
    stats, table, _ = build(tmp_path, {"type": "local", "path": str(path)}, dedup=False, dev_fraction=0.2,
                            test_fraction=0.1)
    ids, got = table.column("doc_id").to_pylist(), table.column("split").to_pylist()
    assert got == [independent_split(d, "moelang", 0.2, 0.1) for d in ids]
    by_split = {name: {d for d, s in zip(ids, got) if s == name} for name in ("train", "dev", "test")}
    assert not by_split["dev"] & by_split["test"] and not by_split["train"] & (by_split["dev"] | by_split["test"])
    assert (stats.n_train, stats.n_dev, stats.n_test) == tuple(len(by_split[n]) for n in ("train", "dev", "test"))
    assert abs(stats.n_dev / stats.n_docs - 0.2) < 0.03 and abs(stats.n_test / stats.n_docs - 0.1) < 0.025


def test_a_language_with_an_empty_split_is_dropped_naming_the_keys(tmp_path):
    path = write_lines(tmp_path / "src" / "es.txt", sentences(200, seed=2))
    stats, _, _ = build(tmp_path, {"type": "local", "path": str(path)}, dev_fraction=1e-9)
    assert not stats.kept and stats.n_dev == 0
    assert "dev 0" in stats.reason and "corpus.dev_fraction" in stats.reason


def test_split_helpers_give_exactly_one_splits_documents_in_file_order(tmp_path):
    from moelang.splits import split_documents, split_texts, split_token_ids

    docs = [[i, i + 1, i + 2][: 1 + i % 3] for i in range(30)]
    names = ["train", "dev", "test", "train", "test"] * 6
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(30)], "split": names,
                             "input_ids": pa.array(docs, type=pa.list_(pa.int32())),
                             "n_tokens": pa.array([len(d) for d in docs], type=pa.int32())}), path)
    for name in ("train", "dev", "test"):
        want = [d for d, s in zip(docs, names) if s == name]
        assert [a.tolist() for a in split_documents(path, name)] == want
        assert split_token_ids(path, name).to_pylist() == want
    corpus_file = tmp_path / "c.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(30)], "lang": ["es"] * 30,
                             "text": [f"text {i}" for i in range(30)], "split": names}), corpus_file)
    assert split_texts(corpus_file, "dev") == [(f"d{i}", f"text {i}") for i in range(30) if names[i] == "dev"]
    with pytest.raises(MoelangError, match="'heldout' is not a corpus split"):
        split_documents(path, "heldout")
    only_train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"doc_id": ["a"], "split": ["train"],
                             "input_ids": pa.array([[1, 2]], type=pa.list_(pa.int32())),
                             "n_tokens": pa.array([2], type=pa.int32())}), only_train)
    with pytest.raises(MoelangError, match="no 'test' documents"):
        split_documents(only_train, "test")


def test_txt_lines_schema_dedup_and_short_docs(tmp_path):
    lines = sentences(300) + ["", "x", sentences(1)[0]]  # an empty line, a too-short doc, a duplicate
    path = write_lines(tmp_path / "src" / "es.txt", lines)
    stats, table, stats_path = build(tmp_path, {"type": "local", "path": str(path)}, min_doc_chars=2)
    assert table.schema.equals(corpus.CORPUS_SCHEMA)
    texts = table.column("text").to_pylist()
    assert len(texts) == len(set(texts)) == stats.n_docs
    assert stats.n_too_short == 2 and stats.n_duplicates == 300 - len(set(lines[:300])) + 1
    assert set(table.column("split").to_pylist()) == {"train", "dev", "test"}
    assert set(table.column("lang").to_pylist()) == {"es"}
    assert stats.kept and json.loads(stats_path.read_text())["n_docs"] == stats.n_docs
    assert stats.n_chars == sum(map(len, texts)) and stats.n_train + stats.n_dev + stats.n_test == stats.n_docs


def test_split_of_a_document_does_not_depend_on_the_rest(tmp_path):
    lines = sentences(400, seed=1)
    a = write_lines(tmp_path / "a" / "es.txt", lines)
    b = write_lines(tmp_path / "b" / "es.txt", lines[:200])
    _, ta, _ = build(tmp_path / "oa", {"type": "local", "path": str(a)}, dedup=False)
    _, tb, _ = build(tmp_path / "ob", {"type": "local", "path": str(b)}, dedup=False)
    split_a = dict(zip(ta.column("doc_id").to_pylist(), ta.column("split").to_pylist()))
    for doc_id, split in zip(tb.column("doc_id").to_pylist(), tb.column("split").to_pylist()):
        assert split_a[doc_id] == split


def test_paragraph_jsonl_and_parquet_sources(tmp_path):
    paras = ["first paragraph\nstill first", "second one", "third   one  "]
    (tmp_path / "p.txt").write_text("\n\n".join(paras), encoding="utf-8")
    _, t, _ = build(tmp_path / "o1", {"type": "local", "path": str(tmp_path / "p.txt"), "txt_mode": "paragraph"})
    assert t.column("text").to_pylist() == ["first paragraph\nstill first", "second one", "third one"]

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"content": s}) for s in ["uno dos", "tres"]), encoding="utf-8")
    _, t, _ = build(tmp_path / "o2", {"type": "local", "path": str(tmp_path / "d.jsonl"), "text_column": "content"})
    assert t.column("text").to_pylist() == ["uno dos", "tres"]

    pq.write_table(pa.table({"body": ["cuatro cinco", None, "seis"]}), tmp_path / "d.parquet")
    _, t, _ = build(tmp_path / "o3", {"type": "local", "path": str(tmp_path / "d.parquet"), "text_column": "body"})
    assert t.column("text").to_pylist() == ["cuatro cinco", "seis"]


def test_caps_stop_reading(tmp_path):
    path = write_lines(tmp_path / "es.txt", sentences(500, seed=3))
    stats, table, _ = build(tmp_path / "o", {"type": "local", "path": str(path), "max_docs": 50})
    assert stats.n_docs == table.num_rows == 50
    stats, table, _ = build(tmp_path / "o2", {"type": "local", "path": str(path), "max_chars": 1000})
    assert 1000 <= stats.n_chars < 1000 + 200


def test_builtin_language_without_catalogs_is_dropped(tmp_path):
    options = base_options({"type": "builtin"}, builtin={"packages": ["Sphinx"], "english_prose": []})
    stats = corpus.build_corpus("zu", options, tmp_path / "zu.parquet", tmp_path / "zu.json")
    assert not stats.kept and stats.n_docs == 0 and "no text" in stats.reason
    assert pq.read_table(tmp_path / "zu.parquet").num_rows == 0


def test_too_little_text_is_reported_and_dropped_not_padded(tmp_path):
    path = write_lines(tmp_path / "es.txt", sentences(20))
    stats, table, stats_path = build(tmp_path / "o", {"type": "local", "path": str(path)}, min_chars=10**6)
    assert not stats.kept and "too little text" in stats.reason
    assert table.num_rows == 20  # the text that exists is kept for inspection, nothing is added
    manifest = corpus.summarize([stats_path], ["es"], tmp_path / "summary.parquet", tmp_path / "languages.json")
    assert manifest == {"kept": [], "dropped": {"es": stats.reason}}
    summary = pq.read_table(tmp_path / "summary.parquet")
    assert summary.schema.equals(corpus.STATS_SCHEMA)


@pytest.mark.parametrize(
    "make_source, words",
    [
        (lambda d: {"type": "local", "path": str(d / "missing.txt")}, "does not exist"),
        (lambda d: {"type": "local", "path": str(d / "*.nothing")}, "matches no file"),
        (lambda d: {"type": "local", "path": str(d / "latin1.txt")}, "is not valid utf-8"),
        (lambda d: {"type": "local", "path": str(d / "t.parquet"), "text_column": "text"}, "has no column 'text'"),
        (lambda d: {"type": "local", "path": str(d / "t.jsonl"), "text_column": "text"}, "has no field 'text'"),
        (lambda d: {"type": "local", "path": str(d / "t.csv")}, "cannot tell the format"),
        (lambda d: {"type": "local", "path": str(d / "empty.txt")}, "gave no document with text"),
    ],
)
def test_bad_local_input_gives_one_line_and_writes_nothing(tmp_path, make_source, words):
    (tmp_path / "latin1.txt").write_bytes("ni\xf1o peque\xf1o\n".encode("latin-1"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "t.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(MoelangError) as info:
        build(out, make_source(tmp_path))
    message = str(info.value)
    assert words in message and "'es'" in message and "\n" not in message
    assert not list(out.glob("*")) if out.exists() else True


def test_unreachable_hf_dataset_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoelangError) as info:
        build(tmp_path, {"type": "hf", "dataset": "uonlp/CulturaX", "name": "es"})
    assert "cannot load Hugging Face dataset 'uonlp/CulturaX'" in str(info.value)
    assert "local mirror" in str(info.value)
    assert not (tmp_path / "es.parquet").exists()


# --- the built-in source, checked against the stdlib's own .mo reader --------------------------------------

def django_es_catalog() -> dict:
    dist = importlib.metadata.distribution("Django")
    path = Path(dist.locate_file("django/conf/locale/es/LC_MESSAGES/django.mo"))
    with open(path, "rb") as f:
        return gettext.GNUTranslations(f)._catalog


def test_builtin_translations_match_the_stdlib_gettext_reader():
    harvest = catalogs.harvest(["Django"], {"es": ["es"]}, want_source_text=True)
    checked = 0
    for key, msgstr in django_es_catalog().items():
        if not isinstance(key, str) or not key or "\x04" in key or "<" in key or "&" in key or "<" in msgstr:
            continue
        text = " ".join(msgstr.split())
        if text == " ".join(key.split()) or not any(c.isalpha() for c in text):
            continue
        doc_id = catalogs.message_id(None, key)
        assert harvest.source_text[doc_id] == " ".join(key.split())
        assert harvest.translations["es"][doc_id] == text
        checked += 1
    assert checked > 200


def test_builtin_corpus_and_parallel_table_line_up(tmp_path):
    options = base_options({"type": "builtin"}, builtin={"packages": ["Django"], "english_prose": []})
    stats = corpus.build_corpus("es", options, tmp_path / "es.parquet", tmp_path / "es.json")
    assert stats.kept and stats.n_docs > 300
    from moelang import config as cfg

    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4},
                           "corpus": {"builtin": {"packages": ["Django"]}}})
    rows = corpus.build_parallel(cfg.parallel_options(config), tmp_path / "parallel.parquet")
    par = pq.read_table(tmp_path / "parallel.parquet")
    assert par.column_names == ["item_id", "origin", "en", "es", "ca"] and par.num_rows == rows
    es_docs = dict(zip(*(pq.read_table(tmp_path / "es.parquet").column(c).to_pylist() for c in ("doc_id", "text"))))
    catalog = django_es_catalog()
    matched = 0
    for item_id, en, es, ca in zip(*(par.column(c).to_pylist() for c in ("item_id", "en", "es", "ca"))):
        assert sum(x is not None for x in (en, es, ca)) >= 2  # min_languages
        # the corpus document and the parallel cell of one message are the same text, and (for messages
        # without a context) the stdlib reads the same translation from the catalog
        if es is not None and item_id in es_docs:
            assert es_docs[item_id] == es
        if es is not None and item_id == catalogs.message_id(None, en) and en in catalog:
            assert " ".join(catalog[en].split()) == es
            matched += 1
    assert matched > 200


def test_builtin_missing_package_is_a_clear_error(tmp_path):
    options = base_options({"type": "builtin"}, builtin={"packages": ["no-such-package-xyz"]})
    with pytest.raises(MoelangError, match="package 'no-such-package-xyz' is not installed"):
        corpus.build_corpus("es", options, tmp_path / "es.parquet", tmp_path / "es.json")
    assert not (tmp_path / "es.parquet").exists()


def test_aligned_parallel_files(tmp_path):
    write_lines(tmp_path / "en.txt", ["hello world", "good morning"])
    write_lines(tmp_path / "es.txt", ["hola mundo", "buenos días"])
    options = {"languages": ["en", "es"], "builtin": {}, "sources": {},
               "parallel": {"source": "aligned", "min_languages": 2,
                            "files": {"en": str(tmp_path / "en.txt"), "es": str(tmp_path / "es.txt")}}}
    corpus.build_parallel(options, tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column("es").to_pylist() == ["hola mundo", "buenos días"]
    write_lines(tmp_path / "es.txt", ["hola mundo"])
    with pytest.raises(MoelangError, match="different line totals"):
        corpus.build_parallel(options, tmp_path / "p2.parquet")
    assert not (tmp_path / "p2.parquet").exists()


def test_aligned_parallel_files_several_per_language(tmp_path):
    """FLORES ships dev and devtest files per language: a list per language is read in order, row i is
    line i of every language's concatenation (however the files are cut), and the totals must match.
    A U+2028 inside a sentence is not a line break (str.splitlines would shift every later row)."""
    from moelang import config as cfg

    en = [write_lines(tmp_path / "dev.en", ["one", "two\u2028still two"]), write_lines(tmp_path / "devtest.en", ["three"])]
    es = [write_lines(tmp_path / "all.es", ["uno", "dos\u2028todavía dos", "tres"])]
    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4},
                           "corpus": {"parallel": {"source": "aligned",
                                                   "files": {"en": [str(p) for p in en], "es": str(es[0])}}}})
    options = cfg.parallel_options(config)
    assert corpus.build_parallel(options, tmp_path / "p.parquet") == 3
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert table["item_id"] == ["line:0", "line:1", "line:2"]
    assert table["en"] == ["one", "two\u2028still two", "three"] and table["es"][2] == "tres"
    assert table["ca"] == [None] * 3
    assert table["origin"] == [f"en={en[0]},es={es[0]}", f"en={en[0]},es={es[0]}", f"en={en[1]},es={es[0]}"]
    options.parallel["files"]["en"] = [str(en[0])]  # two lines against three
    with pytest.raises(MoelangError, match="corpus.parallel.files gives the languages different line totals \\{'en': 2, 'es': 3\\}"):
        corpus.build_parallel(options, tmp_path / "p2.parquet")
    assert not (tmp_path / "p2.parquet").exists()
    (tmp_path / "latin1.es").write_bytes("años\n".encode("latin-1"))
    options.parallel["files"]["es"] = [str(tmp_path / "latin1.es")]
    options.parallel["files"]["en"] = [str(en[1])]
    with pytest.raises(MoelangError, match="corpus.parallel.files.es\\) is not valid UTF-8"):
        corpus.build_parallel(options, tmp_path / "p3.parquet")


def _sharded(tmp_path, options, count, lang="es"):
    parts, stats = [], []
    for i in range(count):
        parts.append(tmp_path / f"part{i}.parquet")
        stats.append(tmp_path / f"part{i}.json")
        corpus.build_corpus_shard(lang, options, (i, count), parts[-1], stats[-1])
    result = corpus.gather_corpus(lang, options, parts, stats, tmp_path / "gathered.parquet", tmp_path / "gathered.json")
    return result, pq.read_table(tmp_path / "gathered.parquet"), parts


@pytest.mark.parametrize("n_files,count", [(1, 3), (4, 2), (5, 3)])
def test_sharded_corpus_gathers_to_exactly_the_one_job_corpus(tmp_path, n_files, count):
    # duplicates inside and across files and shards, short lines, several files (sharded by file when
    # there are enough of them, by record otherwise)
    lines = sentences(400, seed=5)
    lines += lines[:60] + ["", "x", "  "] + lines[100:130]
    chunks = [lines[i::n_files] for i in range(n_files)]
    for i, chunk in enumerate(chunks):
        write_lines(tmp_path / "src" / f"f{i}.txt", chunk)
    options = base_options({"type": "local", "path": str(tmp_path / "src")}, min_chars=10, min_doc_chars=2)
    one, one_table, _ = build(tmp_path / "one", {"type": "local", "path": str(tmp_path / "src")}, min_doc_chars=2)
    result, table, parts = _sharded(tmp_path, options, count)
    assert table.schema.equals(corpus.CORPUS_SCHEMA)
    assert table.to_pylist() == one_table.to_pylist()  # same rows, same order
    assert json.loads((tmp_path / "gathered.json").read_text()) == json.loads((tmp_path / "one" / "es.stats.json").read_text())
    assert result.n_duplicates == one.n_duplicates > 60 and result.n_too_short == one.n_too_short > 0
    sizes = [pq.read_metadata(p).num_rows for p in parts]
    assert all(size > 0 for size in sizes) and sum(sizes) >= table.num_rows  # parts only deduplicate within
    assert pq.read_schema(parts[0]).equals(corpus.SHARD_SCHEMA)


def test_sharded_builtin_corpus_equals_one_job(tmp_path):
    options = base_options({"type": "builtin"}, min_chars=10, builtin={"packages": ["Django"], "english_prose": []})
    one = corpus.build_corpus("es", options, tmp_path / "one.parquet", tmp_path / "one.json")
    result, table, _ = _sharded(tmp_path, options, 2)
    assert table.to_pylist() == pq.read_table(tmp_path / "one.parquet").to_pylist()
    assert result.n_docs == one.n_docs > 100 and result.kept


def test_shard_caps_apply_per_part_and_empty_sources_still_fail(tmp_path):
    write_lines(tmp_path / "src.txt", sentences(300, seed=9))
    capped = base_options({"type": "local", "path": str(tmp_path / "src.txt"), "max_docs": 50}, min_chars=10)
    result, table, parts = _sharded(tmp_path, capped, 3)
    assert [pq.read_metadata(p).num_rows for p in parts] == [17, 17, 17]  # ceil(50 / 3) each
    assert table.num_rows == result.n_docs == 51
    write_lines(tmp_path / "empty.txt", ["", " "])
    empty = base_options({"type": "local", "path": str(tmp_path / "empty.txt")}, min_chars=10)
    (tmp_path / "e").mkdir()
    with pytest.raises(MoelangError, match="gave no document with text"):
        _sharded(tmp_path / "e", empty, 2)
    assert not (tmp_path / "e" / "gathered.parquet").exists()  # nothing half-written
    with pytest.raises(MoelangError, match="shard 3/3 does not exist"):
        corpus.build_corpus_shard("es", capped, (3, 3), tmp_path / "x.parquet", tmp_path / "x.json")


def test_sharded_hf_source_reads_file_blocks_or_every_nth_record(tmp_path, monkeypatch):
    # a local directory of Parquet files loads through datasets.load_dataset like a hub dataset
    monkeypatch.chdir(tmp_path)
    lines = sentences(400, seed=21)
    for i in range(4):
        (tmp_path / "mydata").mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": lines[i * 100:(i + 1) * 100]}), tmp_path / "mydata" / f"part-{i}.parquet")
    source = {"type": "hf", "dataset": "mydata"}
    options = base_options(source, min_chars=10)
    one = corpus.build_corpus("es", options, tmp_path / "one.parquet", tmp_path / "one.json")
    whole = pq.read_table(tmp_path / "one.parquet")
    (tmp_path / "blocks").mkdir()
    by_files, table, parts = _sharded(tmp_path / "blocks", options, 2)  # 4 files: 2 per job
    assert table.column("text").to_pylist() == whole.column("text").to_pylist()
    assert table.column("doc_id").to_pylist()[:2] == ["mydata:0/2:0", "mydata:0/2:1"]
    assert pq.read_table(parts[1]).column("text")[0].as_py() == whole.column("text")[200].as_py()
    assert by_files.n_docs == one.n_docs
    (tmp_path / "records").mkdir()
    by_record, table, _ = _sharded(tmp_path / "records", options, 8)  # more jobs than files: every 8th record
    assert table.equals(whole) and by_record.n_docs == one.n_docs


import polars as pl
import pyarrow.parquet as pq
import pytest

from moelang import overlap
from moelang.errors import MoelangError

# Hand-made frequency tables. Types: a={1,2,3}, b={2,3,4,5}, c={9}.
FREQ = {
    "aa": {1: 5, 2: 3, 3: 2},
    "bb": {2: 1, 3: 1, 4: 4, 5: 4},
    "cc": {9: 7},
}


def frame(freq=FREQ):
    return pl.DataFrame(
        [(lang, tid, c) for lang, table in freq.items() for tid, c in table.items()],
        schema={"lang": pl.String, "token_id": pl.Int32, "count": pl.Int64}, orient="row")


def value(table, a, b, measure):
    row = table.filter((pl.col("lang_a") == a) & (pl.col("lang_b") == b) & (pl.col("measure") == measure))
    assert row.height == 1
    return row["value"][0]


def test_measures_equal_hand_computed_values():
    table = overlap.overlap(frame(), languages=["aa", "bb", "cc"])
    assert table.schema == pl.Schema(overlap.OVERLAP_SCHEMA)
    assert table.height == 3 * 3 * 3
    # jaccard: shared {2,3} over union {1,2,3,4,5}
    assert value(table, "aa", "bb", "jaccard") == pytest.approx(2 / 5)
    # weighted: p_a = (.5,.3,.2,0,0), p_b = (0,.1,.1,.4,.4): min sums to .1 + .1
    assert value(table, "aa", "bb", "weighted") == pytest.approx(0.2)
    assert value(table, "bb", "aa", "weighted") == pytest.approx(0.2)
    # coverage is directed: a's mass on {2,3} = .5; b's mass on {2,3} = .2
    assert value(table, "aa", "bb", "coverage") == pytest.approx(0.5)
    assert value(table, "bb", "aa", "coverage") == pytest.approx(0.2)
    for measure in overlap.MEASURES:
        assert value(table, "aa", "cc", measure) == 0.0
        for lang in FREQ:
            assert value(table, lang, lang, measure) == pytest.approx(1.0)


def test_min_count_restricts_the_jaccard_type_sets_only():
    table = overlap.overlap(frame(), min_count=2, languages=["aa", "bb", "cc"])
    # a's types with count >= 2: {1,2,3}; b's: {4,5}: nothing shared
    assert value(table, "aa", "bb", "jaccard") == 0.0
    assert value(table, "aa", "bb", "weighted") == pytest.approx(0.2)


def test_against_a_brute_force_on_random_tables():
    import random

    rng = random.Random(0)
    freq = {lang: {t: rng.randint(1, 50) for t in rng.sample(range(200), rng.randint(20, 120))} for lang in ["xa", "xb", "xc", "xd"]}
    table = overlap.overlap(frame(freq))
    for a in freq:
        for b in freq:
            ta, tb = set(freq[a]), set(freq[b])
            na, nb = sum(freq[a].values()), sum(freq[b].values())
            assert value(table, a, b, "jaccard") == pytest.approx(len(ta & tb) / len(ta | tb))
            assert value(table, a, b, "weighted") == pytest.approx(
                sum(min(freq[a][t] / na, freq[b][t] / nb) for t in ta & tb))
            assert value(table, a, b, "coverage") == pytest.approx(sum(freq[a][t] for t in ta & tb) / na)


def test_run_overlap_writes_table_and_png(tmp_path):
    paths = {}
    for lang, table in FREQ.items():
        path = tmp_path / f"{lang}.freq.parquet"
        pl.DataFrame({"token_id": list(table), "count": list(table.values())},
                     schema={"token_id": pl.Int32, "count": pl.Int64}).write_parquet(path)
        paths[lang] = path
    overlap.run_overlap(paths, tmp_path / "overlap.parquet", tmp_path / "overlap.png")
    stored = pq.read_table(tmp_path / "overlap.parquet")
    assert stored.column_names == ["lang_a", "lang_b", "measure", "value"] and stored.num_rows == 27
    assert (tmp_path / "overlap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_language_is_a_clear_error(tmp_path):
    path = tmp_path / "aa.freq.parquet"
    pl.DataFrame({"token_id": [], "count": []}, schema={"token_id": pl.Int32, "count": pl.Int64}).write_parquet(path)
    with pytest.raises(MoelangError, match="language 'aa' has no tokens"):
        overlap.run_overlap({"aa": path}, tmp_path / "o.parquet", None)
    assert not (tmp_path / "o.parquet").exists()

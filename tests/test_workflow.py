"""The Snakemake DAG of the data stages, end to end, on a tiny config."""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, write_lines
from moelang import corpus, overlap, tokenize

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
         "--configfile", str(workdir / "config.yaml"), *extra],
        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    ca = write_lines(work / "data" / "ca.txt", ["el gat menja peix", "la casa és gran"])
    config = {
        "languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
        "corpus": {
            "min_chars": 2000,
            "builtin": {"packages": ["Django"], "english_prose": []},
            "sources": {"ca": {"type": "local", "path": str(ca)}},
        },
        "tokenizer": {"vocab_size": 500},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


def test_every_output_exists_with_its_schema(tiny_run):
    work, _ = tiny_run
    res = work / "results"
    manifest = json.loads((res / "corpus" / "languages.json").read_text())
    assert manifest["kept"] == ["en", "es"]
    assert "too little text" in manifest["dropped"]["ca"]
    for lang in ["en", "es", "ca"]:
        assert pq.read_schema(res / "corpus" / f"{lang}.parquet").equals(corpus.CORPUS_SCHEMA)
    summary = pq.read_table(res / "corpus" / "summary.parquet")
    assert summary.schema.equals(corpus.STATS_SCHEMA)
    assert summary.column("lang").to_pylist() == ["en", "es", "ca"]
    assert summary.column("kept").to_pylist() == [True, True, False]
    for lang in ["en", "es"]:
        assert pq.read_schema(res / "tokens" / f"{lang}.parquet").equals(tokenize.TOKENS_SCHEMA)
        assert pq.read_schema(res / "tokens" / f"{lang}.freq.parquet").equals(tokenize.FREQ_SCHEMA)
    assert not (res / "tokens" / "ca.parquet").exists()  # dropped languages go no further
    table = pl.read_parquet(res / "overlap" / "overlap.parquet")
    assert table.schema == pl.Schema(overlap.OVERLAP_SCHEMA)
    assert table.height == 2 * 2 * len(overlap.MEASURES)
    parallel = pq.read_table(res / "corpus" / "parallel.parquet")
    assert parallel.column_names == ["item_id", "origin", "en", "es", "ca"] and parallel.num_rows > 300
    assert (res / "overlap" / "overlap.png").stat().st_size > 1000
    assert (res / "tokenizer" / "tokenizer.json").is_file()


def test_rerun_has_nothing_to_do(tiny_run):
    work, _ = tiny_run
    proc = snakemake(work, "--dry-run")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_bad_config_stops_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"languages": {"high_resource": ["en", "es"]}, "corpus": {"sources": {"es": {"type": "web"}}}}))
    proc = snakemake(tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "moelang: error: config key 'corpus.sources.es.type'" in proc.stderr
    assert not (tmp_path / "results").exists()

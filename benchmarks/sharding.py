"""Sharded corpus and tokenize jobs against one job per language, in one run.

    .venv/bin/python benchmarks/sharding.py [--docs 300000] [--shards 2] [--repeats 2] [--quick] [--out DIR]

A local corpus of ``--docs`` synthetic sentences (words drawn from the built-in English corpus, a
tenth of them duplicated so deduplication works across parts) in 8 files. Every job is a separate
``python -m moelang`` process, as under Snakemake:

* ``one job``: ``moelang corpus`` over the whole source, then ``moelang tokenize`` (2 Rayon threads);
* ``sharded``: ``--shards`` ``moelang corpus --shard i/N`` processes at once, then ``corpus-gather``;
  ``--shards`` ``moelang tokenize --shard i/N`` processes at once (threads split between them), then
  ``tokenize-gather``.

The outputs of both ways are checked equal. Wall time is the best of ``--repeats``. On a cluster the
parts run on different nodes; here they share the machine's cores, so the gain is bounded by them.
Writes ``benchmarks/results/sharding.json`` and the section of ``benchmarks/RESULTS.md``. ``--quick``:
2,000 documents (``QUICK_DOCS``) of words from one catalog package (``QUICK_BUILTIN``), 2 repeats, results
to ``--out`` or a temporary directory (see ``_results.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from _results import add_output_arguments, command_line, output_dir, save_results  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from moelang import config as cfg  # noqa: E402
from moelang.corpus import build_corpus  # noqa: E402
from moelang.tokenize import train_tokenizer  # noqa: E402

MOELANG = [sys.executable, "-m", "moelang"]
# the jobs run this checkout's moelang, as this script does (not whichever one the environment installed)
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
DOCS = 300_000
QUICK_DOCS = 2_000
# --quick: the words drawn from the built-in source of one catalog package and the English prose
# (harvesting every package takes longer than the rest of a quick run)
QUICK_BUILTIN = {"packages": ["Django"], "english_prose": ["pydoc_topics"]}


def english_config(corpus: dict | None = None) -> dict:
    """A valid config whose English corpus options the benchmark uses (a config needs a target
    language for its expert allocation: Catalan, never read here)."""
    return cfg.validate({"languages": {"high_resource": ["en"], "targets": {"ca": "en"}},
                         "allocation": {"new_experts": 1}, **({"corpus": corpus} if corpus else {})})


def make_source(work: Path, n_docs: int, builtin: dict | None = None, seed: int = 0) -> Path:
    """8 text files of synthetic English-like lines, words from the built-in English corpus (``builtin``:
    its packages, default all of the default's)."""
    options = cfg.corpus_options(english_config(), "en")
    if builtin is not None:
        options = options.replace(builtin=builtin)
    build_corpus("en", options, work / "builtin.parquet", work / "builtin.json")
    words = " ".join(pq.read_table(work / "builtin.parquet").column("text").to_pylist()).split()
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n_docs)]
    lines += rng.sample(lines, n_docs // 10)  # duplicates, in other files than their first copy
    rng.shuffle(lines)
    src = work / "src"
    src.mkdir()
    for i in range(8):
        (src / f"part{i}.txt").write_text("\n".join(lines[i::8]) + "\n", encoding="utf-8")
    return src


def run_all(commands: list[list[str]], threads: int) -> None:
    """Start the commands at once and wait for all; fail loudly if one fails."""
    env = {**ENV, "RAYON_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    for proc, command in zip(procs, commands):
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"benchmark: {' '.join(command[2:4])} failed:\n{err[-2000:]}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_job(work: Path, options: str, tokenizer: Path, cores: int) -> dict:
    out = work / "one"
    out.mkdir(exist_ok=True)
    corpus = timed(lambda: run_all([MOELANG + ["corpus", "--lang", "en", "--options", options, "--out",
                                               str(out / "en.parquet"), "--stats", str(out / "en.json")]], cores))
    tokenize = timed(lambda: run_all([MOELANG + ["tokenize", "--corpus", str(out / "en.parquet"), "--tokenizer",
                                                 str(tokenizer), "--out", str(out / "tok.parquet"), "--freq",
                                                 str(out / "freq.parquet")]], cores))
    return {"corpus_s": corpus, "tokenize_s": tokenize}


def sharded(work: Path, options: str, tokenizer: Path, n: int, cores: int) -> dict:
    out = work / "sharded"
    out.mkdir(exist_ok=True)
    parts = [out / f"c{i}.parquet" for i in range(n)]
    stats = [out / f"c{i}.json" for i in range(n)]
    shard_threads = max(1, cores // n)
    corpus_parts = timed(lambda: run_all(
        [MOELANG + ["corpus", "--lang", "en", "--options", options, "--shard", f"{i}/{n}", "--out", str(parts[i]),
                    "--stats", str(stats[i])] for i in range(n)], shard_threads))
    corpus_gather = timed(lambda: run_all(
        [MOELANG + ["corpus-gather", "--lang", "en", "--options", options, "--shards", *map(str, parts),
                    "--shard-stats", *map(str, stats), "--out", str(out / "en.parquet"), "--stats",
                    str(out / "en.json")]], cores))
    toks = [out / f"t{i}.parquet" for i in range(n)]
    freqs = [out / f"f{i}.parquet" for i in range(n)]
    tokenize_parts = timed(lambda: run_all(
        [MOELANG + ["tokenize", "--corpus", str(out / "en.parquet"), "--tokenizer", str(tokenizer), "--shard",
                    f"{i}/{n}", "--out", str(toks[i]), "--freq", str(freqs[i])] for i in range(n)], shard_threads))
    tokenize_gather = timed(lambda: run_all(
        [MOELANG + ["tokenize-gather", "--tokens", *map(str, toks), "--freqs", *map(str, freqs), "--out",
                    str(out / "tok.parquet"), "--freq", str(out / "freq.parquet")]], cores))
    return {"corpus_parts_s": corpus_parts, "corpus_gather_s": corpus_gather, "corpus_s": corpus_parts + corpus_gather,
            "tokenize_parts_s": tokenize_parts, "tokenize_gather_s": tokenize_gather,
            "tokenize_s": tokenize_parts + tokenize_gather}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=None, help=f"default {DOCS:,}; --quick {QUICK_DOCS:,}")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    add_output_arguments(parser)
    args = parser.parse_args()
    out_dir = output_dir(args)
    if args.docs is None:
        args.docs = QUICK_DOCS if args.quick else DOCS
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = make_source(work, args.docs, QUICK_BUILTIN if args.quick else None)
        config = english_config({"default_source": {"type": "local", "path": str(src)}})
        options = cfg.to_json(cfg.corpus_options(config, "en"))
        build_corpus("en", cfg.corpus_options(config, "en"), work / "mix.parquet", work / "mix.json")
        tokenizer = work / "tokenizer"
        train_tokenizer({"en": work / "mix.parquet"}, {"vocab_size": 8000, "min_frequency": 2,
                                                       "base_language_fraction": 0.2, "other_language_fraction": 0.0,
                                                       "seed": 0}, "en", tokenizer)
        runs = {"one": [], "sharded": []}
        for _ in range(args.repeats):
            runs["one"].append(one_job(work, options, tokenizer, cores))
            runs["sharded"].append(sharded(work, options, tokenizer, args.shards, cores))
        for name in ("en.parquet", "en.json", "tok.parquet", "freq.parquet"):
            a, b = work / "one" / name, work / "sharded" / name
            same = a.read_text() == b.read_text() if name.endswith(".json") else pq.read_table(a).equals(pq.read_table(b))
            if not same:
                raise SystemExit(f"benchmark: sharded {name} differs from the one-job file")
        n_docs = json.loads((work / "one" / "en.json").read_text())["n_docs"]
        n_tokens = pq.read_table(work / "one" / "tok.parquet", columns=["n_tokens"]).column(0).to_numpy().sum()
    best = {way: {key: min(r[key] for r in rs) for key in rs[0]} for way, rs in runs.items()}
    result = {"docs_in": int(args.docs * 1.1), "docs_kept": n_docs, "tokens": int(n_tokens), "shards": args.shards,
              "cores": cores, "repeats": args.repeats, "machine": platform.machine(), "python": platform.python_version(),
              "best": best}
    one, sh = best["one"], best["sharded"]
    # the committed full form's command names its size; a run with other settings adds them
    command = command_line("sharding.py") if sys.argv[1:] else (
        f".venv/bin/python benchmarks/sharding.py --docs {args.docs} --shards {args.shards}")
    section = f"""
## Sharded corpus and tokenize jobs (`benchmarks/sharding.py`)

Command: `{command}` ({platform.machine()}, {cores} cores,
Python {platform.python_version()}; best of {args.repeats}). {result['docs_in']:,} local documents in 8 files
({n_docs:,} after deduplication, {int(n_tokens):,} tokens); every job a separate `python -m moelang` process; the
sharded outputs are checked equal to the one-job files.

| stage | one job (s) | {args.shards} shards at once (s) | gather (s) | sharded total (s) | speed-up |
|---|---|---|---|---|---|
| corpus | {one['corpus_s']:.1f} | {sh['corpus_parts_s']:.1f} | {sh['corpus_gather_s']:.1f} | {sh['corpus_s']:.1f} | {one['corpus_s'] / sh['corpus_s']:.2f}x |
| tokenize | {one['tokenize_s']:.1f} | {sh['tokenize_parts_s']:.1f} | {sh['tokenize_gather_s']:.1f} | {sh['tokenize_s']:.1f} | {one['tokenize_s'] / sh['tokenize_s']:.2f}x |

The corpus stage is single-threaded Python (normalisation, hashing), so its parts use the cores a
single job leaves idle; the gather (a vectorised merge by source position, deduplication by the
hashes the parts stored) is the serial remainder, about a third of one part here, python start-up
included. Tokenizing already uses every core in one job (the Rust encoder's threads), so on one
machine sharding it only adds the gather: its value is spreading a large language over nodes.
"""
    print(section)
    save_results("sharding", result, section, out_dir, indent=1)


if __name__ == "__main__":
    main()

"""Stage 1, corpus: monolingual text per language, a deterministic train/held-out split, and a
parallel table.

Sources (``corpus.default_source`` / ``corpus.sources.<lang>`` in the config):

``builtin``
    Real, human-translated text harvested at run time from the gettext catalogs that installed
    packages ship (see :mod:`moelang.catalogs`). One translated message is one document; English,
    the source language of every catalog, gets the message ids, plus (``corpus.builtin.english_prose``)
    the prose of the Python language reference that every CPython ships (``pydoc_data.topics``).
    User-interface strings are short and formulaic, and some translations lag their English source:
    this source exists so the pipeline runs offline end to end, not to train a useful model.
``local``
    ``.txt`` (one document per line, or per blank-line separated paragraph), ``.jsonl`` and
    ``.parquet`` files with a named text column; a file, a directory or a glob.
``hf``
    A Hugging Face dataset by id, config name, split and text column, streamed, with a cap in
    documents or characters (for example ``uonlp/CulturaX`` or ``HuggingFaceFW/fineweb-2``).

Every document is stripped; documents shorter than ``min_doc_chars`` are skipped and exact duplicates
(``dedup``) are kept once. The split is a hash of the document id and the salt, so it does not depend
on order, on the other documents or on the machine; parallel items share their id across languages,
so a held-out message is held out in every language.

A language whose corpus has fewer than ``min_chars`` characters, or no document in either split, is
reported and **dropped** (``kept = false`` in its stats): its text stays in its Parquet file for
inspection, and later stages leave it out. Nothing is ever padded.

Outputs
-------
``results/corpus/{lang}.parquet``
    ``doc_id`` string, ``lang`` string, ``text`` string, ``split`` string (``train`` | ``heldout``).
``results/corpus/{lang}.stats.json``
    ``lang, source, n_docs, n_train, n_heldout, n_chars, n_words, n_duplicates, n_too_short, kept, reason``.
``results/corpus/summary.parquet`` (rule ``corpus_summary``)
    One row per configured language with the stats columns above.
``results/corpus/languages.json``
    ``{"kept": [...], "dropped": {lang: reason}}``: the languages later stages use.
``results/corpus/parallel.parquet``
    ``item_id`` string, ``origin`` string (package/catalog or file), then one string column per
    language (null where that language lacks the item); a row needs ``parallel.min_languages``
    non-null languages.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from moelang import catalogs
from moelang.config import check_lang
from moelang.errors import MoelangError
from moelang.io import atomic_path, log, progress, write_json, write_table

CORPUS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("lang", pa.string()),
        ("text", pa.string()),
        ("split", pa.string()),
    ]
)
SPLITS = ("train", "heldout")
WRITE_BATCH = 8192


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------

def heldout_score(doc_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, doc_id): the document is held out if it is below the fraction."""
    digest = hashlib.blake2b(f"{salt}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(doc_id: str, salt: str, heldout_fraction: float) -> str:
    return "heldout" if heldout_score(doc_id, salt) < heldout_fraction else "train"


# --------------------------------------------------------------------------------------------------
# Sources: each yields (doc_id, text) pairs in a deterministic order
# --------------------------------------------------------------------------------------------------

def builtin_documents(lang: str, source: dict, builtin: dict) -> Iterator[tuple[str, str]]:
    if lang == catalogs.SOURCE_LANGUAGE:
        # The catalogs' source language: every message id is an English document, with the same id
        # as the translations of that message, so the split lines up across languages.
        harvest = catalogs.harvest(builtin["packages"], {}, want_source_text=True)
        yield from harvest.source_text.items()
        if "pydoc_topics" in builtin.get("english_prose", []):
            yield from catalogs.pydoc_prose()
    else:
        harvest = catalogs.harvest(builtin["packages"], {lang: source.get("locales") or [lang]}, want_source_text=False)
        yield from harvest.translations[lang].items()


def _expand_paths(pattern: str, lang: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise MoelangError(f"corpus for '{lang}': local source path '{pattern}' does not exist; "
                           f"fix corpus.sources.{lang}.path")
    if not files:
        raise MoelangError(f"corpus for '{lang}': local source '{pattern}' matches no file; "
                           f"fix corpus.sources.{lang}.path")
    return files


def _file_format(path: Path, fmt: str, lang: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = "".join(path.suffixes[-1:]).lower()
    known = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if suffixes not in known:
        raise MoelangError(f"corpus for '{lang}': cannot tell the format of '{path}' from its extension; "
                           f"set corpus.sources.{lang}.format to txt, jsonl or parquet")
    return known[suffixes]


def _read_text_file(path: Path, encoding: str, lang: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise MoelangError(
            f"corpus for '{lang}': '{path}' is not valid {encoding} (byte {exc.start}); re-encode it to UTF-8 "
            f"(for example: iconv -f LATIN1 -t UTF-8) or set corpus.sources.{lang}.encoding") from None
    except LookupError:
        raise MoelangError(f"corpus for '{lang}': unknown encoding '{encoding}'; fix corpus.sources.{lang}.encoding") from None


def local_documents(lang: str, source: dict) -> Iterator[tuple[str, str]]:
    files = _expand_paths(source["path"], lang)
    column = source.get("text_column", "text")
    for path in files:
        fmt = _file_format(path, source.get("format", "auto"), lang)
        stem = path.name
        if fmt == "txt":
            content = _read_text_file(path, source.get("encoding", "utf-8"), lang)
            if source.get("txt_mode", "line") == "paragraph":
                pieces = re.split(r"\n\s*\n", content)
            else:
                pieces = content.splitlines()
            for i, piece in enumerate(pieces):
                yield f"{stem}:{i}", piece
        elif fmt == "jsonl":
            content = _read_text_file(path, source.get("encoding", "utf-8"), lang)
            for i, line in enumerate(content.splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MoelangError(f"corpus for '{lang}': '{path}' line {i + 1} is not valid JSON ({exc.msg}); "
                                       f"fix the file (one JSON object per line)") from None
                if not isinstance(record, dict) or column not in record:
                    raise MoelangError(f"corpus for '{lang}': '{path}' line {i + 1} has no field '{column}'; "
                                       f"set corpus.sources.{lang}.text_column to the field holding the text")
                yield f"{stem}:{i}", _as_text(record[column], lang, path)
        else:  # parquet
            try:
                pfile = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise MoelangError(f"corpus for '{lang}': '{path}' is not a readable Parquet file ({exc}); "
                                   f"check the file or its format setting") from None
            names = pfile.schema_arrow.names
            if column not in names:
                raise MoelangError(f"corpus for '{lang}': '{path}' has no column '{column}' (columns: {', '.join(names)}); "
                                   f"set corpus.sources.{lang}.text_column")
            i = 0
            for batch in pfile.iter_batches(columns=[column], batch_size=WRITE_BATCH):
                for value in batch.column(0).to_pylist():
                    yield f"{stem}:{i}", _as_text(value, lang, path)
                    i += 1


def _as_text(value, lang: str, path) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MoelangError(f"corpus for '{lang}': the text column of '{path}' holds {type(value).__name__} "
                           f"values, not strings; point text_column at a text field")
    return value


def hf_documents(lang: str, source: dict) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - declared dependency
        raise MoelangError("the hf source needs the 'datasets' package; reinstall moelang") from None
    dataset_id = source["dataset"]
    where = f"'{dataset_id}'" + (f" (config '{source['name']}')" if source.get("name") else "")
    try:
        ds = datasets.load_dataset(
            dataset_id,
            source.get("name"),
            split=source.get("split", "train"),
            revision=source.get("revision"),
            streaming=True,
            trust_remote_code=source.get("trust_remote_code", False) or None,
        )
    except Exception as exc:  # the hub client raises many types; all mean "cannot load it here"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise MoelangError(
            f"corpus for '{lang}': cannot load Hugging Face dataset {where} ({type(exc).__name__}: {reason}); "
            f"check the id/config/split and network access (HF_HUB_OFFLINE), or use a local mirror "
            f"(corpus.sources.{lang}.type: local)") from None
    column = source.get("text_column", "text")
    id_column = source.get("id_column")
    for i, record in enumerate(ds):
        if i == 0:
            missing = [c for c in (column, id_column) if c and c not in record]
            if missing:
                raise MoelangError(f"corpus for '{lang}': dataset {where} has no column '{missing[0]}' "
                                   f"(columns: {', '.join(record)}); set corpus.sources.{lang}.text_column/id_column")
        doc_id = str(record[id_column]) if id_column else f"{dataset_id}:{i}"
        yield doc_id, _as_text(record[column], lang, dataset_id)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@dataclass
class CorpusStats:
    lang: str
    source: str
    n_docs: int = 0
    n_train: int = 0
    n_heldout: int = 0
    n_chars: int = 0
    n_words: int = 0
    n_duplicates: int = 0
    n_too_short: int = 0
    kept: bool = False
    reason: str = ""


STATS_SCHEMA = pa.schema(
    [
        ("lang", pa.string()),
        ("source", pa.string()),
        ("n_docs", pa.int64()),
        ("n_train", pa.int64()),
        ("n_heldout", pa.int64()),
        ("n_chars", pa.int64()),
        ("n_words", pa.int64()),
        ("n_duplicates", pa.int64()),
        ("n_too_short", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def _describe_source(source: dict) -> str:
    if source["type"] == "builtin":
        return "builtin (gettext catalogs)"
    if source["type"] == "local":
        return f"local {source['path']}"
    return f"hf {source['dataset']}" + (f"/{source['name']}" if source.get("name") else "")


def documents(lang: str, options: dict) -> Iterator[tuple[str, str]]:
    source = options["source"]
    kind = source.get("type")
    if kind == "builtin":
        return builtin_documents(lang, source, options["builtin"])
    if kind == "local":
        return local_documents(lang, source)
    if kind == "hf":
        return hf_documents(lang, source)
    raise MoelangError(f"corpus for '{lang}': unknown source type '{kind}'; use builtin, local or hf")


def normalise(text: str) -> str:
    """NFC, no control characters, whitespace runs inside a line collapsed, outer whitespace stripped."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    return text.strip()


def build_corpus(lang: str, options: dict, out_path: str | Path, stats_path: str | Path) -> CorpusStats:
    """Write one language's corpus and its stats. Returns the stats (``kept`` says if it is usable)."""
    check_lang(lang)
    source = options["source"]
    caps = (source.get("max_docs"), source.get("max_chars"))
    stats = CorpusStats(lang=lang, source=_describe_source(source))
    salt, fraction = options["split_salt"], options["heldout_fraction"]
    seen: set[bytes] = set()
    log.info("corpus %s: reading %s", lang, stats.source)
    docs = documents(lang, options)  # errors in the source's set-up surface here, before any output
    with atomic_path(out_path) as tmp:
        with pq.ParquetWriter(tmp, CORPUS_SCHEMA, compression="zstd") as writer:
            rows: dict[str, list] = {name: [] for name in CORPUS_SCHEMA.names}

            def flush():
                if rows["doc_id"]:
                    writer.write_table(pa.table(rows, schema=CORPUS_SCHEMA))
                    for values in rows.values():
                        values.clear()

            for doc_id, raw in progress(docs, desc=f"corpus {lang}", unit=" docs"):
                text = normalise(raw)
                if len(text) < options["min_doc_chars"]:
                    stats.n_too_short += 1
                    continue
                if options["dedup"]:
                    key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                    if key in seen:
                        stats.n_duplicates += 1
                        continue
                    seen.add(key)
                split = assign_split(doc_id, salt, fraction)
                rows["doc_id"].append(doc_id)
                rows["lang"].append(lang)
                rows["text"].append(text)
                rows["split"].append(split)
                stats.n_docs += 1
                stats.n_chars += len(text)
                stats.n_words += len(text.split())
                if split == "train":
                    stats.n_train += 1
                else:
                    stats.n_heldout += 1
                if len(rows["doc_id"]) >= WRITE_BATCH:
                    flush()
                if (caps[0] and stats.n_docs >= caps[0]) or (caps[1] and stats.n_chars >= caps[1]):
                    log.info("corpus %s: reached the cap (max_docs=%s, max_chars=%s)", lang, *caps)
                    break
            flush()
            if stats.n_docs == 0 and source["type"] != "builtin":
                # A file or dataset the user chose that holds no text is a mistake, not a small language.
                raise MoelangError(f"corpus for '{lang}': {stats.source} gave no document with text; point "
                                   f"corpus.sources.{lang} at a source with text, or remove the language")
    if stats.n_docs == 0:
        stats.reason = "no text: the source gave no document"
    elif stats.n_chars < options["min_chars"]:
        stats.reason = f"too little text: {stats.n_chars} characters < min_chars {options['min_chars']}"
    elif stats.n_train == 0 or stats.n_heldout == 0:
        stats.reason = f"a split is empty (train {stats.n_train}, heldout {stats.n_heldout}); add text or change heldout_fraction"
    else:
        stats.kept = True
    if stats.kept:
        log.info("corpus %s: %d docs (%d train, %d heldout), %d chars, %d words", lang, stats.n_docs,
                 stats.n_train, stats.n_heldout, stats.n_chars, stats.n_words)
    else:
        log.warning("corpus %s: DROPPED, %s", lang, stats.reason)
    write_json(asdict(stats), stats_path)
    return stats


def summarize(stats_paths: Iterable[str | Path], languages: list[str], out_table: str | Path, out_languages: str | Path) -> dict:
    """Gather the per-language stats into one table and the list of languages later stages use."""
    by_lang = {}
    for path in stats_paths:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        by_lang[record["lang"]] = record
    missing = [lang for lang in languages if lang not in by_lang]
    if missing:
        raise MoelangError(f"corpus summary: no stats for {', '.join(missing)}; run the corpus stage for them first")
    records = [by_lang[lang] for lang in languages]
    write_table(pa.Table.from_pylist(records, schema=STATS_SCHEMA), out_table)
    manifest = {
        "kept": [r["lang"] for r in records if r["kept"]],
        "dropped": {r["lang"]: r["reason"] for r in records if not r["kept"]},
    }
    write_json(manifest, out_languages)
    _print_summary(records)
    return manifest


def _print_summary(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="corpus size per language")
    for name in ("lang", "source", "docs", "train", "heldout", "chars", "words", "status"):
        table.add_column(name, justify="right" if name in ("docs", "train", "heldout", "chars", "words") else "left")
    for r in records:
        table.add_row(r["lang"], r["source"], f"{r['n_docs']:,}", f"{r['n_train']:,}", f"{r['n_heldout']:,}",
                      f"{r['n_chars']:,}", f"{r['n_words']:,}", "kept" if r["kept"] else f"dropped: {r['reason']}")
    Console(stderr=True, width=160).print(table)


# --------------------------------------------------------------------------------------------------
# Parallel table
# --------------------------------------------------------------------------------------------------

def build_parallel(options: dict, out_path: str | Path) -> int:
    """Write the parallel table; returns its number of rows."""
    languages = [check_lang(lang) for lang in options["languages"]]
    par = options["parallel"]
    if par["source"] == "none":
        columns: dict[str, list] = {"item_id": [], "origin": [], **{lang: [] for lang in languages}}
    elif par["source"] == "builtin":
        columns = _parallel_from_catalogs(languages, options)
    else:
        columns = _parallel_from_aligned_files(languages, par["files"])
    keep = [i for i in range(len(columns["item_id"]))
            if sum(columns[lang][i] is not None for lang in languages) >= par["min_languages"]]
    table = pa.table({name: pa.array([values[i] for i in keep], type=pa.string()) for name, values in columns.items()})
    write_table(table, out_path)
    log.info("parallel: %d items over %s (at least %d languages each)", table.num_rows, ",".join(languages), par["min_languages"])
    return table.num_rows


def _parallel_from_catalogs(languages: list[str], options: dict) -> dict[str, list]:
    builtin = options["builtin"]
    sources = options["sources"]
    src = catalogs.SOURCE_LANGUAGE
    locales = {lang: (sources.get(lang) or {}).get("locales") or [lang] for lang in languages if lang != src}
    harvest = catalogs.harvest(builtin["packages"], locales, want_source_text=True)
    item_ids = sorted(harvest.source_text)
    columns: dict[str, list] = {"item_id": item_ids, "origin": [harvest.origin[i] for i in item_ids]}
    for lang in languages:
        table = harvest.source_text if lang == src else harvest.translations[lang]
        columns[lang] = [_clean_or_none(table.get(i)) for i in item_ids]
    return columns


def _clean_or_none(text: str | None) -> str | None:
    if text is None:
        return None
    text = normalise(text)
    return text or None


def _parallel_from_aligned_files(languages: list[str], files: dict[str, str]) -> dict[str, list]:
    lines: dict[str, list[str]] = {}
    for lang, path in files.items():
        check_lang(lang)
        if lang not in languages:
            raise MoelangError(f"parallel: corpus.parallel.files names '{lang}', which is not a configured language; "
                               f"add it to languages or remove the file")
        p = Path(path)
        if not p.is_file():
            raise MoelangError(f"parallel: file '{path}' for '{lang}' does not exist; fix corpus.parallel.files.{lang}")
        lines[lang] = _read_text_file(p, "utf-8", lang).splitlines()
    counts = {lang: len(v) for lang, v in lines.items()}
    if len(set(counts.values())) > 1:
        raise MoelangError(f"parallel: the aligned files have different line counts {counts}; they must be "
                           f"line-aligned translations of each other")
    n = next(iter(counts.values()))
    columns: dict[str, list] = {"item_id": [f"line:{i}" for i in range(n)],
                                "origin": [",".join(f"{l}={files[l]}" for l in lines)] * n}
    for lang in languages:
        columns[lang] = [_clean_or_none(x) for x in lines[lang]] if lang in lines else [None] * n
    return columns

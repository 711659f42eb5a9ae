"""Stage 1, corpus: monolingual text per language, a deterministic train/dev/test split, and a
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
(``dedup``) are kept once. The split (train, dev or test; :mod:`moelang.splits` says which stage reads
which) is a hash of the document id and the salt, so it does not depend on order, on the other
documents or on the machine; parallel items share their id across languages, so a dev or test message
is dev or test in every language.

A language whose corpus has fewer than ``min_chars`` characters, or no document in one of the splits, is
reported and **dropped** (``kept = false`` in its stats): its text stays in its Parquet file for
inspection, and later stages leave it out. Nothing is ever padded.

Outputs
-------
``results/corpus/{lang}.parquet``
    ``doc_id`` string, ``lang`` string, ``text`` string, ``split`` string (``train`` | ``dev`` |
    ``test``: training; model selection; everything reported).
``results/corpus/{lang}.stats.json``
    ``lang, source, n_docs, n_train, n_dev, n_test, n_chars, n_words, n_duplicates, n_too_short, kept, reason``.
``results/corpus/summary.parquet`` (rule ``corpus_summary``)
    One row per configured language with the stats columns above.
``results/corpus/languages.json``
    ``{"kept": [...], "dropped": {lang: reason}}``: the languages later stages use.
``results/corpus/shards/{lang}/{i}.parquet``, ``{i}.stats.json`` (``shards`` > 1)
    a part of the source (every N-th file, or every N-th record when there are fewer files than
    shards; a contiguous block of a streamed dataset's files): the corpus schema plus ``position``
    int64, the document's place in the source, and ``text_key`` binary(16), the hash deduplication
    uses (null without ``dedup``). The gather job merges the parts by position and
    deduplicates across them, so without caps it writes exactly what one job would have written;
    a cap (``max_docs``, ``max_chars``) applies to each part as ``ceil(cap / N)``.
``results/corpus/parallel.parquet``
    ``item_id`` string, ``origin`` string (package/catalog, or for aligned files ``lang=file,...``,
    the file each language's line came from), then one string column per language (null where that
    language lacks the item); a row needs ``parallel.min_languages`` non-null languages. Aligned
    files: ``corpus.parallel.files`` gives each language a file or a list of files read one after
    the other (row i is line i of every language's concatenation; the totals must be equal).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelang import catalogs
from moelang.config import check_lang, local_format, local_source_files
from moelang.errors import MoelangError
from moelang.io import atomic_path, log, progress, write_json, write_table
from moelang.options import CorpusOptions, ParallelOptions
from moelang.splits import SPLITS, assign_split  # noqa: F401  (SPLITS: part of this stage's schema)

CORPUS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("lang", pa.string()),
        ("text", pa.string()),
        ("split", pa.string()),
    ]
)
# A corpus shard keeps each document's position in the source, so the gather restores source order,
# and the hash of its text (null without dedup), so the gather deduplicates without hashing again.
SHARD_SCHEMA = CORPUS_SCHEMA.append(pa.field("position", pa.int64())).append(pa.field("text_key", pa.binary(16)))
WRITE_BATCH = 8192

Shard = tuple[int, int]  # (index, count): the index-th of count parts of a source
Document = tuple[int, str, str]  # (position in the source, doc_id, raw text)


# --------------------------------------------------------------------------------------------------
# Sources: each yields (doc_id, text) pairs in a deterministic order
# --------------------------------------------------------------------------------------------------

# A document's position in its source, as one sortable int64: (file or part) << 40 | record. Shards
# keep positions, so their gather restores the source order exactly.
POSITION_BITS = 40


def _position(part: int, record: int) -> int:
    return (part << POSITION_BITS) | record


def builtin_documents(lang: str, source: dict, builtin: dict, shard: Shard = (0, 1)) -> Iterator[Document]:
    if lang == catalogs.SOURCE_LANGUAGE:
        # The catalogs' source language: every message id is an English document, with the same id
        # as the translations of that message, so the split lines up across languages.
        harvest = catalogs.harvest(builtin["packages"], {}, want_source_text=True)
        pairs = itertools.chain(harvest.source_text.items(),
                                catalogs.pydoc_prose() if "pydoc_topics" in builtin.get("english_prose", []) else ())
    else:
        harvest = catalogs.harvest(builtin["packages"], {lang: source.get("locales") or [lang]}, want_source_text=False)
        pairs = harvest.translations[lang].items()
    index, count = shard
    for record, (doc_id, text) in enumerate(pairs):
        if record % count == index:
            yield _position(0, record), doc_id, text


def _expand_paths(pattern: str, lang: str) -> list[Path]:
    files = local_source_files(pattern)
    if files is None:
        raise MoelangError(f"corpus for '{lang}': local source path '{pattern}' does not exist; "
                           f"fix corpus.sources.{lang}.path")
    if not files:
        raise MoelangError(f"corpus for '{lang}': local source '{pattern}' matches no file; "
                           f"fix corpus.sources.{lang}.path")
    return files


def _file_format(path: Path, fmt: str, lang: str) -> str:
    if fmt != "auto":
        return fmt
    fmt = local_format(path)
    if fmt is None:
        raise MoelangError(f"corpus for '{lang}': cannot tell the format of '{path}' from its extension; "
                           f"set corpus.sources.{lang}.format to txt, jsonl or parquet")
    return fmt


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


def local_documents(lang: str, source: dict, shard: Shard = (0, 1)) -> Iterator[Document]:
    """Documents of local files. With several shards, a shard takes every N-th file when there are at
    least N files (each job reads only its files), else every N-th record of all files."""
    files = _expand_paths(source["path"], lang)
    index, count = shard
    by_file = count > 1 and len(files) >= count
    record = 0
    for file_index, path in enumerate(files):
        if by_file and file_index % count != index:
            continue
        for i, (doc_id, text) in enumerate(_file_documents(path, lang, source)):
            if by_file or record % count == index:
                yield _position(file_index, i), doc_id, text
            record += 1


def _file_documents(path: Path, lang: str, source: dict) -> Iterator[tuple[str, str]]:
    column = source.get("text_column", "text")
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


def hf_documents(lang: str, source: dict, shard: Shard = (0, 1)) -> Iterator[Document]:
    """Documents of a streamed dataset. With several shards, a shard streams a contiguous block of the
    dataset's files when it has at least N of them (``IterableDataset.shard``), else every N-th record
    of the whole stream. Without ``id_column``, ids are the record's index in the stream (in a file
    block: ``{dataset}:{i}/{N}:{index}``, so they then depend on the shard count)."""
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
    index, count = shard
    by_files = count > 1 and ds.num_shards >= count
    if by_files:
        ds = ds.shard(num_shards=count, index=index, contiguous=True)
    elif count > 1:
        log.warning("corpus %s: dataset %s has %d file(s), fewer than %d shards: every shard streams all of it "
                    "and keeps every %d-th record", lang, where, ds.num_shards, count, count)
    for i, record in enumerate(ds):
        if i == 0:
            missing = [c for c in (column, id_column) if c and c not in record]
            if missing:
                raise MoelangError(f"corpus for '{lang}': dataset {where} has no column '{missing[0]}' "
                                   f"(columns: {', '.join(record)}); set corpus.sources.{lang}.text_column/id_column")
        if not by_files and i % count != index:
            continue
        if id_column:
            doc_id = str(record[id_column])
        else:
            doc_id = f"{dataset_id}:{index}/{count}:{i}" if by_files else f"{dataset_id}:{i}"
        yield _position(index if by_files else 0, i), doc_id, _as_text(record[column], lang, dataset_id)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@dataclass
class CorpusStats:
    lang: str
    source: str
    n_docs: int = 0
    n_train: int = 0
    n_dev: int = 0
    n_test: int = 0
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
        ("n_dev", pa.int64()),
        ("n_test", pa.int64()),
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


def documents(lang: str, options: CorpusOptions | dict, shard: Shard = (0, 1)) -> Iterator[Document]:
    options = CorpusOptions.coerce(options)
    source = options.source
    kind = source.get("type")
    if kind == "builtin":
        return builtin_documents(lang, source, options.builtin, shard)
    if kind == "local":
        return local_documents(lang, source, shard)
    if kind == "hf":
        return hf_documents(lang, source, shard)
    raise MoelangError(f"corpus for '{lang}': unknown source type '{kind}'; use builtin, local or hf")


def normalise(text: str) -> str:
    """NFC, no control characters, whitespace runs inside a line collapsed, outer whitespace stripped."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    return text.strip()


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _count(stats: CorpusStats, text: str, split: str, sign: int = 1) -> None:
    """Count a kept document into ``stats`` (``sign = -1``: take it out again)."""
    stats.n_docs += sign
    stats.n_chars += sign * len(text)
    stats.n_words += sign * len(text.split())
    setattr(stats, f"n_{split}", getattr(stats, f"n_{split}") + sign)


def _kept_documents(docs: Iterable[Document], options: CorpusOptions, stats: CorpusStats, caps: tuple) -> Iterator[tuple]:
    """Normalised, long enough and (``dedup``) first-seen documents as ``(doc_id, lang, text, split,
    position, text_key)`` rows, counted into ``stats``, until a cap is reached."""
    salt, dev, test = options.split_salt, options.dev_fraction, options.test_fraction
    seen: set[bytes] = set()
    for position, doc_id, raw in progress(docs, desc=f"corpus {stats.lang}", unit=" docs"):
        text = normalise(raw)
        if len(text) < options.min_doc_chars:
            stats.n_too_short += 1
            continue
        key = None
        if options.dedup:
            key = _text_key(text)
            if key in seen:
                stats.n_duplicates += 1
                continue
            seen.add(key)
        split = assign_split(doc_id, salt, dev, test)
        _count(stats, text, split)
        yield doc_id, stats.lang, text, split, position, key
        if (caps[0] and stats.n_docs >= caps[0]) or (caps[1] and stats.n_chars >= caps[1]):
            log.info("corpus %s: reached the cap (max_docs=%s, max_chars=%s)", stats.lang, *caps)
            return


def _write_rows(rows: Iterable[tuple], path: Path, schema: pa.Schema) -> None:
    """Write row tuples (in ``schema``'s column order, extra trailing values ignored) in batches."""
    names = schema.names
    rows = iter(rows)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        while batch := list(itertools.islice(rows, WRITE_BATCH)):
            columns = list(zip(*batch))
            writer.write_table(pa.table({name: list(columns[i]) for i, name in enumerate(names)}, schema=schema))


def _check_has_text(stats: CorpusStats, options: CorpusOptions) -> None:
    if stats.n_docs == 0 and options.source["type"] != "builtin":
        # A file or dataset the user chose that holds no text is a mistake, not a small language.
        raise MoelangError(f"corpus for '{stats.lang}': {stats.source} gave no document with text; point "
                           f"corpus.sources.{stats.lang} at a source with text, or remove the language")


def _finish(stats: CorpusStats, options: CorpusOptions, stats_path: str | Path) -> CorpusStats:
    """Decide whether the language is kept, log it and write its stats."""
    if stats.n_docs == 0:
        stats.reason = "no text: the source gave no document"
    elif stats.n_chars < options.min_chars:
        stats.reason = f"too little text: {stats.n_chars} characters < min_chars {options.min_chars}"
    elif 0 in (stats.n_train, stats.n_dev, stats.n_test):
        stats.reason = (f"a split is empty (train {stats.n_train}, dev {stats.n_dev}, test {stats.n_test}); add text "
                        f"or change corpus.dev_fraction / corpus.test_fraction")
    else:
        stats.kept = True
    if stats.kept:
        log.info("corpus %s: %d docs (%d train, %d dev, %d test), %d chars, %d words", stats.lang, stats.n_docs,
                 stats.n_train, stats.n_dev, stats.n_test, stats.n_chars, stats.n_words)
    else:
        log.warning("corpus %s: DROPPED, %s", stats.lang, stats.reason)
    write_json(asdict(stats), stats_path)
    return stats


def build_corpus(lang: str, options: CorpusOptions | dict, out_path: str | Path, stats_path: str | Path) -> CorpusStats:
    """Write one language's corpus and its stats. Returns the stats (``kept`` says if it is usable)."""
    options = CorpusOptions.coerce(options)
    check_lang(lang)
    source = options.source
    stats = CorpusStats(lang=lang, source=_describe_source(source))
    log.info("corpus %s: reading %s", lang, stats.source)
    docs = documents(lang, options)
    with atomic_path(out_path) as tmp:  # a source error leaves no output behind
        _write_rows(_kept_documents(docs, options, stats, (source.get("max_docs"), source.get("max_chars"))),
                    tmp, CORPUS_SCHEMA)
        _check_has_text(stats, options)
    return _finish(stats, options, stats_path)


def build_corpus_shard(lang: str, options: CorpusOptions | dict, shard: Shard, out_path: str | Path, stats_path: str | Path) -> CorpusStats:
    """Write the ``shard``-th part of one language's corpus (:data:`SHARD_SCHEMA`, deduplicated within
    the part) and its counts; :func:`gather_corpus` merges the parts. A cap applies to each part as
    ``ceil(cap / count)``."""
    options = CorpusOptions.coerce(options)
    check_lang(lang)
    index, count = shard
    if not 0 <= index < count:
        raise MoelangError(f"corpus for '{lang}': shard {index}/{count} does not exist; use I/N with 0 <= I < N")
    source = options.source
    stats = CorpusStats(lang=lang, source=_describe_source(source), reason=f"shard {index}/{count}")
    caps = tuple(-(-cap // count) if cap else cap for cap in (source.get("max_docs"), source.get("max_chars")))
    log.info("corpus %s: reading part %d of %d of %s", lang, index + 1, count, stats.source)
    docs = documents(lang, options, shard)
    with atomic_path(out_path) as tmp:
        _write_rows(_kept_documents(docs, options, stats, caps), tmp, SHARD_SCHEMA)
    write_json(asdict(stats), stats_path)
    return stats


def _merged_tables(paths: list[Path]) -> Iterator[pa.Table]:
    """The rows of every shard in position order, a table at a time. Each shard is sorted by
    position, so every buffered row up to the smallest last-buffered position of the shards still
    being read is final: one vectorised sort per round, memory bounded by one batch per shard."""
    readers = []
    for path in paths:
        pfile = pq.ParquetFile(path)
        if not pfile.schema_arrow.equals(SHARD_SCHEMA):
            raise MoelangError(f"corpus gather: '{path}' is not a corpus shard (columns {pfile.schema_arrow.names}); "
                               f"rerun the corpus shard jobs")
        readers.append(pfile.iter_batches(batch_size=WRITE_BATCH))
    buffers: list[pa.Table | None] = [None] * len(paths)
    reading = [True] * len(paths)
    while True:
        for i, reader in enumerate(readers):
            while reading[i] and (buffers[i] is None or buffers[i].num_rows == 0):
                batch = next(reader, None)
                if batch is None:
                    reading[i] = False
                else:
                    buffers[i] = pa.Table.from_batches([batch])
        live = [i for i, b in enumerate(buffers) if b is not None and b.num_rows]
        if not live:
            return
        open_ends = [buffers[i]["position"][-1].as_py() for i in live if reading[i]]
        horizon = min(open_ends) if open_ends else None
        parts = []
        for i in live:
            take = buffers[i].num_rows if horizon is None else \
                int(np.searchsorted(buffers[i]["position"].to_numpy(), horizon, side="right"))
            parts.append(buffers[i].slice(0, take))
            buffers[i] = buffers[i].slice(take)
        table = pa.concat_tables(parts)
        yield table.take(np.argsort(table["position"].to_numpy(), kind="stable"))


def gather_corpus(lang: str, options: CorpusOptions | dict, shard_paths: list[str | Path], shard_stats: list[str | Path],
                  out_path: str | Path, stats_path: str | Path) -> CorpusStats:
    """Merge a language's shards in source order into its corpus file and stats. Deduplication across
    shards keeps the first document in source order, so without caps the result is the file one job
    would have written."""
    options = CorpusOptions.coerce(options)
    check_lang(lang)
    # The shards' counts, less those of the documents that turn out to repeat another shard's.
    stats = CorpusStats(lang=lang, source=_describe_source(options.source))
    for path in shard_stats:
        part = json.loads(Path(path).read_text(encoding="utf-8"))
        for name in ("n_docs", "n_train", "n_dev", "n_test", "n_chars", "n_words", "n_duplicates", "n_too_short"):
            setattr(stats, name, getattr(stats, name) + part[name])
    seen: set[bytes] = set()
    paths = [Path(p) for p in shard_paths]
    log.info("corpus %s: gathering %d shards", lang, len(paths))
    bar = progress(total=sum(pq.read_metadata(p).num_rows for p in paths), desc=f"gather {lang}", unit=" docs")
    with atomic_path(out_path) as tmp:
        with pq.ParquetWriter(tmp, CORPUS_SCHEMA, compression="zstd") as writer:
            for table in _merged_tables(paths):
                bar.update(table.num_rows)
                if options.dedup:
                    keep = []
                    for key in table["text_key"].to_pylist():
                        keep.append(key not in seen)
                        seen.add(key)
                    if not all(keep):
                        dropped = table.filter(pa.array([not k for k in keep]))
                        for text, split in zip(dropped["text"].to_pylist(), dropped["split"].to_pylist()):
                            stats.n_duplicates += 1
                            _count(stats, text, split, sign=-1)
                        table = table.filter(pa.array(keep))
                writer.write_table(table.select(CORPUS_SCHEMA.names))
        bar.close()
        _check_has_text(stats, options)
    return _finish(stats, options, stats_path)


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
    numbers = ("docs", "train", "dev", "test", "chars", "words")
    for name in ("lang", "source", *numbers, "status"):
        table.add_column(name, justify="right" if name in numbers else "left")
    for r in records:
        table.add_row(r["lang"], r["source"], *(f"{r[f'n_{name}']:,}" for name in numbers),
                      "kept" if r["kept"] else f"dropped: {r['reason']}")
    Console(stderr=True, width=160).print(table)


# --------------------------------------------------------------------------------------------------
# Parallel table
# --------------------------------------------------------------------------------------------------

def build_parallel(options: ParallelOptions | dict, out_path: str | Path) -> int:
    """Write the parallel table; returns its number of rows."""
    options = ParallelOptions.coerce(options)
    languages = [check_lang(lang) for lang in options.languages]
    par = options.parallel
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


def _parallel_from_catalogs(languages: list[str], options: ParallelOptions | dict) -> dict[str, list]:
    options = ParallelOptions.coerce(options)
    builtin = options.builtin
    sources = options.sources
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


def _aligned_lines(path: Path, lang: str) -> list[str]:
    """The lines of a UTF-8 file split at newlines only: str.splitlines would also split at U+2028,
    U+0085 and form feeds inside a sentence and shift every later line against its translations."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoelangError(f"parallel: '{path}' (corpus.parallel.files.{lang}) is not valid UTF-8 (byte {exc.start}); "
                           f"re-encode it to UTF-8 (for example: iconv -f LATIN1 -t UTF-8)") from None
    if text.endswith("\n"):
        text = text[:-1]
    return [line.removesuffix("\r") for line in text.split("\n")] if text else []


def _parallel_from_aligned_files(languages: list[str], files: dict[str, str | list[str]]) -> dict[str, list]:
    """One row per line: each language's files read one after the other (a list per language, e.g. the
    FLORES dev and devtest files), so row i is the i-th line of every language's concatenation."""
    lines: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}  # the file each line came from
    for lang, paths in files.items():
        check_lang(lang)
        if lang not in languages:
            raise MoelangError(f"parallel: corpus.parallel.files names '{lang}', which is not a configured language; "
                               f"add it to languages or remove the file")
        lines[lang], sources[lang] = [], []
        for path in [paths] if isinstance(paths, str) else paths:
            p = Path(path)
            if not p.is_file():
                raise MoelangError(f"parallel: file '{path}' for '{lang}' does not exist; fix corpus.parallel.files.{lang}")
            text = _aligned_lines(p, lang)
            lines[lang] += text
            sources[lang] += [str(path)] * len(text)
    counts = {lang: len(v) for lang, v in lines.items()}
    if len(set(counts.values())) > 1:
        raise MoelangError(f"parallel: corpus.parallel.files gives the languages different line totals {counts}; every "
                           f"language's files must hold the same sentences line by line (the same files of one "
                           f"release, in the same order)")
    n = next(iter(counts.values()))
    columns: dict[str, list] = {"item_id": [f"line:{i}" for i in range(n)],
                                "origin": [",".join(f"{lang}={sources[lang][i]}" for lang in lines) for i in range(n)]}
    for lang in languages:
        columns[lang] = [_clean_or_none(x) for x in lines[lang]] if lang in lines else [None] * n
    return columns

"""Stage 2, tokenize: the model's tokenizer over every kept language's corpus.

The tokenizer is either the model's own (``tokenizer.type: pretrained``: a hub id or a local
directory, loaded with ``AutoTokenizer``; it must be a fast tokenizer) or, for the embedded default,
a byte-level BPE trained here on an English-heavy mix of the corpus's train split
(``tokenizer.type: train``). The mix mirrors a real English-centric model: all of the base
language's train documents (``base_language_fraction``) and a small share of every other language's
(``other_language_fraction``), so other languages fragment into shorter pieces and share byte-level
tokens. Either way the result is saved as a ``transformers`` tokenizer directory
(``results/tokenizer/``) that the model stages load with ``AutoTokenizer``.

Encoding runs in the ``tokenizers`` Rust backend (``encode_batch_fast``, multi-threaded) over record
batches streamed from the corpus Parquet file and written out batch by batch, so memory stays flat
for corpora larger than RAM. Token ids are stored without special tokens; the training engine adds
the end-of-text separator when it packs documents.

Outputs
-------
``results/tokens/{lang}.parquet``
    ``doc_id`` string, ``split`` string, ``input_ids`` list<int32>, ``n_tokens`` int32.
``results/tokens/{lang}.freq.parquet``
    ``token_id`` int32, ``count`` int64: occurrences over all three splits, only types that occur,
    sorted by ``token_id``.
``results/tokenizer/``
    ``save_pretrained`` directory; ``training_mix.json`` records the documents and characters per
    language a trained BPE saw.
``results/tokens/shards/{lang}/{i}.parquet``, ``{i}.freq.parquet`` (``tokenize.shards`` > 1)
    the same two schemas for the i-th contiguous row range of the corpus; the gather job concatenates
    them in order and adds up the counts, giving exactly the unsharded files.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelang.errors import MoelangError
from moelang.io import atomic_dir, atomic_path, log, progress, write_json, write_table
from moelang.options import TokenizerOptions
from moelang.splits import TRAIN, split_score

TOKENS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
    ]
)
FREQ_SCHEMA = pa.schema([("token_id", pa.int32()), ("count", pa.int64())])
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


# --------------------------------------------------------------------------------------------------
# Tokenizer: train a byte-level BPE, or fetch the model's
# --------------------------------------------------------------------------------------------------

def _mix_documents(corpus_paths: dict[str, Path], options: TokenizerOptions, base_language: str, counts: dict):
    """Train-split documents of the tokenizer's training mix, language by language (sorted)."""
    salt = f"tokenizer-mix:{options.seed}"
    for lang in sorted(corpus_paths):
        fraction = options.base_language_fraction if lang == base_language else options.other_language_fraction
        n_docs = n_chars = 0
        if fraction > 0:
            pfile = pq.ParquetFile(corpus_paths[lang])
            for batch in pfile.iter_batches(columns=["doc_id", "text", "split"], batch_size=8192):
                for doc_id, text, split in zip(*(batch.column(i).to_pylist() for i in range(3))):
                    if split == TRAIN and split_score(doc_id, salt) < fraction:
                        n_docs += 1
                        n_chars += len(text)
                        yield text
        counts[lang] = {"fraction": fraction, "n_docs": n_docs, "n_chars": n_chars}


def byte_level_bpe(texts, vocab_size: int, min_frequency: int = 2, bos: bool = True):
    """A byte-level BPE trained on ``texts``, as a transformers tokenizer: end-of-text and padding
    tokens; ``bos``: the end-of-text token doubles as BOS (never added by the tokenizer itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS_TOKEN if bos else None,
                                   eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=1_000_000)


def train_tokenizer(corpus_paths: dict[str, str | Path], options: TokenizerOptions | dict, base_language: str, out_dir: str | Path) -> dict:
    """Train a byte-level BPE on the English-heavy mix and save it as a transformers tokenizer."""
    options = TokenizerOptions.coerce(options)
    corpus_paths = {lang: Path(p) for lang, p in corpus_paths.items()}
    if base_language not in corpus_paths:
        raise MoelangError(f"tokenizer: the base language '{base_language}' has no corpus (dropped or not configured); "
                           f"a trained tokenizer needs it, fix languages.base or its corpus source")
    mix: dict = {}
    log.info("tokenizer: training a byte-level BPE (vocab %d) on %s", options.vocab_size, ", ".join(sorted(corpus_paths)))
    fast = byte_level_bpe(_mix_documents(corpus_paths, options, base_language, mix), options.vocab_size,
                          options.min_frequency)
    total = sum(m["n_chars"] for m in mix.values()) or 1
    for m in mix.values():
        m["char_share"] = round(m["n_chars"] / total, 4)
    log.info("tokenizer: mix by characters: %s", ", ".join(f"{l} {m['char_share']:.1%}" for l, m in mix.items()))
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
        write_json({"base_language": base_language, "vocab_size": fast.backend_tokenizer.get_vocab_size(), "languages": mix},
                   Path(tmp) / "training_mix.json")
    return mix


def fetch_tokenizer(options: TokenizerOptions | dict, out_dir: str | Path) -> None:
    """Save the model's own tokenizer (hub id or local path) as the pipeline's tokenizer directory."""
    options = TokenizerOptions.coerce(options)
    from transformers import AutoTokenizer

    name = options.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=options.revision,
                                            trust_remote_code=options.trust_remote_code)
    except Exception as exc:  # hub/network/format errors all mean "cannot load it here"
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise MoelangError(f"tokenizer: cannot load '{name}' ({type(exc).__name__}: {first}); check the hub id or "
                           f"local path in tokenizer.name_or_path and network access (HF_HUB_OFFLINE)") from None
    if not getattr(tok, "is_fast", False):
        raise MoelangError(f"tokenizer: '{name}' has no fast (Rust) tokenizer; moelang needs one for batched encoding "
                           f"(convert it with transformers' convert_slow_tokenizer, or pick another tokenizer)")
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)


def load_backend(tokenizer_dir: str | Path):
    """The Rust ``tokenizers.Tokenizer`` behind a saved transformers tokenizer directory."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise MoelangError(f"tokenize: '{path}' does not exist; run the tokenizer rule first (or point --tokenizer at "
                           f"a directory saved by a fast transformers tokenizer)")
    return Tokenizer.from_file(str(path))


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------

class BatchEncoder:
    """Encode documents as ``encode(doc, add_special_tokens=False)`` would, one at a time, but fast.

    Short documents (the built-in corpus averages 40 characters) make the per-document cost of
    ``encode_batch`` (one Rust ``Encoding`` and one Python object each) the bottleneck. So, where it
    is exact, ``docs_per_segment`` documents are joined with a special token and encoded as one
    sequence: the tokenizer splits its input at special tokens *before* normalising and
    pre-tokenising, so each document is encoded on its own, and the ids are cut back apart at the
    separator. Whether that holds for a given tokenizer (a Metaspace ``prepend_scheme`` or an
    ``lstrip`` special token would break it) is checked on the first documents against
    one-at-a-time encoding; if it does not hold, or a batch contains the separator text itself,
    documents are encoded one per sequence.
    """

    def __init__(self, backend, docs_per_segment: int = 64, check_docs: int = 256):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.docs_per_segment = docs_per_segment
        self.check_docs = check_docs
        self.separator = self._pick_separator(backend)
        self.separator_id = backend.token_to_id(self.separator) if self.separator else None
        self.joined = None  # decided on the first batch

    @staticmethod
    def _pick_separator(backend) -> str | None:
        for token in backend.get_added_tokens_decoder().values():
            if token.special and token.content and not token.lstrip and not token.rstrip:
                return token.content
        return None

    def _one_per_sequence(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [enc.ids for enc in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths

    def _joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        k = self.docs_per_segment
        segments = [self.separator.join(texts[i:i + k]) for i in range(0, len(texts), k)]
        encodings = self.backend.encode_batch_fast(segments, add_special_tokens=False)
        seg_lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        joined = np.fromiter(itertools.chain.from_iterable(enc.ids for enc in encodings), dtype=np.int32,
                             count=int(seg_lengths.sum()))
        sep_positions = np.flatnonzero(joined == self.separator_id)
        if len(sep_positions) != len(texts) - len(segments):
            return None
        # A document ends at a separator or at the end of its segment; in the coordinates of the ids
        # without separators, an end moves left by the number of separators before it.
        ends = np.sort(np.concatenate([sep_positions, np.cumsum(seg_lengths)]))
        ends -= np.searchsorted(sep_positions, ends, side="left")
        lengths = np.diff(ends, prepend=0)
        return joined[joined != self.separator_id], lengths

    def encode(self, texts: list[str]) -> tuple[pa.ListArray, np.ndarray, np.ndarray]:
        """Returns (list<int32> array, flat ids, per-document lengths)."""
        if self.joined is None and self.separator is not None:
            sample = [text for text in texts[: self.check_docs] if self.separator not in text]
            self.joined = self._joining_is_exact(sample)
        result = None
        if self.joined and not any(self.separator in text for text in texts):
            result = self._joined(texts)
        flat, lengths = result if result is not None else self._one_per_sequence(texts)
        offsets = np.zeros(len(texts) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)), flat, lengths.astype(np.int32)

    def _joining_is_exact(self, sample: list[str]) -> bool:
        if not sample:
            return None  # decide on a later batch
        expected = self._one_per_sequence(sample)
        got = self._joined(sample)
        exact = got is not None and np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
        if not exact:
            log.info("tokenize: joining documents is not exact for this tokenizer; encoding one per sequence")
        return exact


def encode_texts(backend, texts: list[str]) -> tuple[pa.ListArray, np.ndarray, np.ndarray]:
    """Encode one batch of documents (see :class:`BatchEncoder`)."""
    return BatchEncoder(backend).encode(texts)


def _row_range_batches(pfile: pq.ParquetFile, start: int, stop: int, columns: list[str], batch_size: int):
    """Record batches of rows [start, stop) of a Parquet file, reading only the row groups they touch."""
    offset = 0
    for group in range(pfile.metadata.num_row_groups):
        n = pfile.metadata.row_group(group).num_rows
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            for batch in pfile.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns):
                # batch rows are offset .. offset + num_rows of the file
                take_lo, take_hi = max(lo - offset, 0), min(hi - offset, batch.num_rows)
                if take_lo < take_hi:
                    yield batch.slice(take_lo, take_hi - take_lo)
                offset += batch.num_rows
        else:
            offset += n
        if offset >= stop:
            return


def shard_rows(n_rows: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Rows [start, stop) of the ``index``-th of ``count`` contiguous, near-equal parts of ``n_rows``."""
    index, count = shard
    if not 0 <= index < count:
        raise MoelangError(f"tokenize: shard {index}/{count} does not exist; use I/N with 0 <= I < N")
    return n_rows * index // count, n_rows * (index + 1) // count


def tokenize_corpus(corpus_path: str | Path, tokenizer_dir: str | Path, out_tokens: str | Path,
                    out_freq: str | Path, batch_size: int = 4096, shard: tuple[int, int] = (0, 1)) -> dict:
    """Tokenize one language's corpus file, or (``shard = (i, n)``) the i-th of n contiguous row ranges
    of it, which :func:`gather_tokens` joins back; returns {n_docs, n_tokens, n_types}."""
    backend = load_backend(tokenizer_dir)
    encoder = BatchEncoder(backend)
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    counts = np.zeros(vocab_size, dtype=np.int64)
    pfile = pq.ParquetFile(corpus_path)
    missing = {"doc_id", "split", "text"} - set(pfile.schema_arrow.names)
    if missing:
        raise MoelangError(f"tokenize: '{corpus_path}' lacks column(s) {sorted(missing)}; it is not a corpus file "
                           f"(rerun the corpus stage)")
    start, stop = shard_rows(pfile.metadata.num_rows, shard)
    name = Path(corpus_path).stem + (f" {shard[0]}/{shard[1]}" if shard[1] > 1 else "")
    n_docs = n_tokens = 0
    bar = progress(total=stop - start, desc=f"tokenize {name}", unit=" docs")
    with atomic_path(out_tokens) as tmp, pq.ParquetWriter(tmp, TOKENS_SCHEMA, compression="zstd") as writer:
        for batch in _row_range_batches(pfile, start, stop, ["doc_id", "split", "text"], batch_size):
            input_ids, flat, lengths = encoder.encode(batch.column("text").to_pylist())
            counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
            writer.write_table(pa.table(
                [batch.column("doc_id"), batch.column("split"), input_ids, pa.array(lengths)], schema=TOKENS_SCHEMA))
            n_docs += batch.num_rows
            n_tokens += int(lengths.sum())
            bar.update(batch.num_rows)
    bar.close()
    n_types = _write_freq(counts, out_freq)
    log.info("tokenize %s: %d docs, %d tokens, %d token types", name, n_docs, n_tokens, n_types)
    return {"n_docs": n_docs, "n_tokens": n_tokens, "n_types": n_types}


def _write_freq(counts: np.ndarray, out_freq: str | Path) -> int:
    """Write the types that occur with their counts; returns how many there are."""
    nonzero = np.flatnonzero(counts)
    write_table(pa.table({"token_id": pa.array(nonzero.astype(np.int32)), "count": pa.array(counts[nonzero])},
                         schema=FREQ_SCHEMA), out_freq)
    return len(nonzero)


def gather_tokens(token_shards: list[str | Path], freq_shards: list[str | Path], out_tokens: str | Path,
                  out_freq: str | Path) -> dict:
    """Join a language's token shards (in shard order) and add up their frequencies: the files one
    :func:`tokenize_corpus` job over the whole corpus would have written."""
    if len(token_shards) != len(freq_shards):
        raise MoelangError(f"tokenize gather: {len(token_shards)} token shards but {len(freq_shards)} frequency "
                           f"shards; pass one of each per shard")
    n_docs = 0
    with atomic_path(out_tokens) as tmp, pq.ParquetWriter(tmp, TOKENS_SCHEMA, compression="zstd") as writer:
        for path in progress(token_shards, desc="gather tokens", unit=" shards"):
            pfile = pq.ParquetFile(path)
            if pfile.schema_arrow != TOKENS_SCHEMA:
                raise MoelangError(f"tokenize gather: '{path}' is not a token file; rerun its tokenize shard job")
            for batch in pfile.iter_batches():
                writer.write_table(pa.Table.from_batches([batch], schema=TOKENS_SCHEMA))
                n_docs += batch.num_rows
    freq = pa.concat_tables([pq.read_table(p, schema=FREQ_SCHEMA) for p in freq_shards])
    ids = freq.column("token_id").to_numpy()
    counts = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
    np.add.at(counts, ids, freq.column("count").to_numpy())
    n_types = _write_freq(counts, out_freq)
    log.info("tokenize gather: %d shards, %d docs, %d token types", len(token_shards), n_docs, n_types)
    return {"n_docs": n_docs, "n_types": n_types}

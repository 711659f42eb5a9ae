"""The three document splits of every language, and who reads which.

The corpus stage gives each document one split, fixed by a salted hash of its id (``corpus.split_salt``):
its :func:`split_score` in [0, 1) puts it in

``test`` (score < ``corpus.test_fraction``)
    everything reported: held-out perplexity (``results/eval/{model}/perplexity.parquet``), the
    synthetic MultiBLiMP- and Belebele-format tasks, and the test perplexity of every adaptation run
    (``test_perplexity`` in ``results/adapt/runs.parquet``);
``dev`` (``test_fraction`` <= score < ``test_fraction + dev_fraction``)
    model selection and everything that informs it: the adaptation's learning-rate selection
    (``dev_perplexity``; early stopping would read it too), the routing profiles (they choose the
    experts adaptation trains and the routing-informed plan, and give the expansion's new experts their
    parents), and the layer similarity (it makes the allocation plans);
``train`` (the rest)
    training: the tokenizer's mix, pre-training, CPT, adaptation and both expansion stages.

Test comes first on the score line, so the test split of a given fraction is exactly the single
held-out split that older versions (``corpus.heldout_fraction``) made with that fraction, and changing
``dev_fraction`` never moves a test document. Parallel items share their id across languages, so a
test (or dev) message is test (or dev) in every language.

:func:`split_documents` and :func:`split_token_ids` (token files) and :func:`split_texts` (corpus files)
give one split's documents to any stage that needs them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moelang.errors import MoelangError

TRAIN, DEV, TEST = "train", "dev", "test"
SPLITS = (TRAIN, DEV, TEST)


def split_score(doc_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, doc_id): where the document falls on the split line."""
    digest = hashlib.blake2b(f"{salt}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(doc_id: str, salt: str, dev_fraction: float, test_fraction: float) -> str:
    """The document's split: ``test`` below ``test_fraction``, ``dev`` below ``test_fraction +
    dev_fraction``, else ``train``."""
    score = split_score(doc_id, salt)
    if score < test_fraction:
        return TEST
    return DEV if score < test_fraction + dev_fraction else TRAIN


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise MoelangError(f"'{split}' is not a corpus split; use one of {', '.join(SPLITS)}")
    return split


def split_token_ids(token_file: str | Path, split: str) -> pa.ListArray:
    """The token ids (without special tokens) of ``token_file``'s ``split`` documents, in file order,
    as one Arrow list array (a row per document). Stops with one line when the split has none."""
    _check_split(split)
    table = pq.read_table(token_file, columns=["split", "input_ids"])
    ids = table.column("input_ids").filter(pc.equal(table.column("split"), split)).combine_chunks()
    if len(ids) == 0:
        raise MoelangError(f"'{token_file}' has no '{split}' documents; check the corpus split "
                           f"(corpus.dev_fraction, corpus.test_fraction) or rerun the corpus and tokenize stages")
    return ids


def split_documents(token_file: str | Path, split: str) -> list[np.ndarray]:
    """The ``split`` documents of a token file (``results/tokens/{lang}.parquet``), in file order: one
    int32 array of token ids (without special tokens) per document."""
    ids = split_token_ids(token_file, split)
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy()
    return [flat[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def split_texts(corpus_file: str | Path, split: str) -> list[tuple[str, str]]:
    """The ``split`` documents of a corpus file (``results/corpus/{lang}.parquet``), in file order, as
    (doc_id, text) pairs (possibly none)."""
    _check_split(split)
    table = pq.read_table(corpus_file, columns=["doc_id", "text", "split"])
    table = table.filter(pc.equal(table.column("split"), split))
    return list(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))

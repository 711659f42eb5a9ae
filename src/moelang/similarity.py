"""Stage: per-layer cross-lingual representation similarity (section B of the science notes).

At every decoder layer the adapter hands over the MLP input (the hidden state after attention and
its norm), for dense and MoE layers alike. Two ways to compare languages:

``tokens`` (LayerMoE's definition, the default)
    similarity of languages a and b at a layer = the mean cosine over *all* pairs of their tokens'
    MLP inputs (padding excluded, the first ``tokens_per_language`` token states per language, in
    file order). Since mean_{u in A, v in B} cos(u, v) = (mean_A u/|u|) . (mean_B v/|v|), only the
    running sum of unit vectors per (language, layer) is kept: exact, O(N d) time, O(d) memory; the
    N x N matrix is never built.
``parallel``
    the parallel table's translations: each sentence's MLP inputs mean-pooled into one vector per
    layer, the cosine of a sentence and its translation, averaged over the items both languages have.

The ``tokens`` method's context (routing depends on it, and so do hidden states) is an option:
``similarity.context`` ``chunks`` (the default, ours): each dev document cut into pieces of at
most ``seq_len`` tokens, every token used; ``documents`` (LayerMoE's code): each document whole, once,
truncated to its first ``seq_len`` tokens (theirs: 10,000; the rest of a longer document is not
used); ``stream``: the dev documents concatenated in file order, each followed by the model's
end-of-text token (as the training engine packs them), and cut into windows of ``seq_len`` tokens.
``similarity.bos`` prepends the model's BOS token to every sequence (LayerMoE tokenizes with special
tokens on, so Llama gets one; Qwen's and OLMoE's tokenizers add none); ``seq_len`` includes it, and
its state counts as a token state, as in their code, which keeps every position.

The text is each language's dev split (:mod:`moelang.splits`): the similarity makes the allocation plans,
which choose the expanded models, so it is model selection and never reads the test split that the
expanded models are reported on.

Output ``results/similarity/{model}.{method}.parquet`` (the model's name, e.g. ``cpt-step800``, and
``tokens`` or ``parallel``: the two methods' tables of one model live side by side): ``model`` string,
``layer`` int32, ``lang_a`` string, ``lang_b`` string (a before b in config order; a = b gives the
within-language mean cosine), ``similarity`` float64, ``n_tokens_a`` int64, ``n_tokens_b`` int64
(tokens behind each side), ``experts`` int64 (the routed experts of the layer's MLP, 1 for a dense
FFN: what the allocation needs to know of the model, so that it never loads the model itself); and
``results/similarity/{model}.{method}.png``, similarity per layer for every pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from moelang.errors import MoelangError
from moelang.io import atomic_path, log, progress, pyplot, save_figure
from moelang.options import SimilarityOptions
from moelang.splits import DEV, split_documents

CONTEXTS = ("chunks", "documents", "stream")
SIMILARITY_SCHEMA = {"model": pl.String, "layer": pl.Int32, "lang_a": pl.String, "lang_b": pl.String,
                     "similarity": pl.Float64, "n_tokens_a": pl.Int64, "n_tokens_b": pl.Int64, "experts": pl.Int64}


def layer_experts(adapter) -> list[int]:
    """Routed experts per decoder layer (1: a dense FFN, e.g. DeepSeek's first_k_dense_replace layers)."""
    experts = [1] * adapter.num_layers
    for moe in adapter.moe_layers:
        experts[moe.index] = moe.num_experts
    return experts


def mean_pair_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cosine over all pairs of rows of ``x`` and ``y``, in O((n + m) d)."""
    ux = torch.nn.functional.normalize(x.double(), dim=-1).mean(0)
    uy = torch.nn.functional.normalize(y.double(), dim=-1).mean(0)
    return float(ux @ uy)


class UnitSums:
    """Per layer: the sum of unit-normalised MLP inputs of valid tokens, and their number."""

    def __init__(self, num_layers: int, hidden: int, device):
        self.sums = torch.zeros(num_layers, hidden, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.valid: torch.Tensor | None = None

    def add(self, layer: int, hidden: torch.Tensor) -> None:
        vectors = hidden.reshape(-1, hidden.shape[-1])[self.valid]
        self.sums[layer] += torch.nn.functional.normalize(vectors.double(), dim=-1).sum(0)
        self.counts[layer] += vectors.shape[0]

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1).unsqueeze(-1).double()


@torch.no_grad()
def token_unit_means(adapter, batches, desc: str) -> tuple[torch.Tensor, int]:
    """[num_layers, hidden] mean unit MLP-input vectors over the batches' valid tokens."""
    model = adapter.model
    device = next(model.parameters()).device
    sums = UnitSums(adapter.num_layers, model.config.hidden_size, device)
    with adapter.capture_mlp_inputs(sums.add):
        for ids, mask in progress(batches, desc=desc, unit=" batches"):
            ids, mask = ids.to(device), mask.to(device)
            sums.valid = mask.reshape(-1).bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sums.means().cpu(), int(sums.counts[0])


@torch.no_grad()
def sentence_vectors(adapter, tokenizer, sentences: list[str], batch_size: int = 32,
                     desc: str = "sentences") -> tuple[torch.Tensor, int]:
    """([num_layers, n_sentences, hidden], tokens): each sentence's MLP inputs mean-pooled over its
    tokens, and how many tokens the sentences have."""
    model = adapter.model
    device = next(model.parameters()).device
    out = torch.zeros(adapter.num_layers, len(sentences), model.config.hidden_size, dtype=torch.float64)
    state = {}

    def pool(layer, hidden):
        mask = state["mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[layer, state["rows"]] = pooled.double().cpu()

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_tokens = 0
    with adapter.capture_mlp_inputs(pool):
        for start in progress(range(0, len(sentences), batch_size), desc=desc, unit=" batches"):
            chunk = sentences[start:start + batch_size]
            encoded = [tokenizer(s, add_special_tokens=False)["input_ids"] or [pad] for s in chunk]
            n_tokens += sum(map(len, encoded))
            width = max(map(len, encoded))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(encoded):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            state["mask"], state["rows"] = mask.to(device), slice(start, start + len(chunk))
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out, n_tokens


def _pairs(languages: list[str]):
    for i, a in enumerate(languages):
        for b in languages[i:]:
            yield a, b


def context_sequences(documents: list[np.ndarray], context: str, seq_len: int, token_budget: int | None,
                      bos_id: int | None = None, eos_id: int | None = None) -> list[np.ndarray]:
    """The sequences the model sees (see the module docstring): ``documents`` cut by ``context`` into
    sequences of at most ``seq_len`` tokens, ``bos_id`` (when given) first in each, until
    ``token_budget`` tokens (BOS included; the last sequence is cut to fit). ``eos_id`` ends each
    document in the ``stream`` context."""
    if context not in CONTEXTS:
        raise MoelangError(f"similarity.context is '{context}'; use one of {', '.join(CONTEXTS)}")
    room = seq_len - (bos_id is not None)  # text tokens per sequence
    if room < 1:
        raise MoelangError(f"similarity.seq_len {seq_len} leaves no room for text after the BOS token; raise it")
    if context == "chunks":
        pieces = (doc[s:s + room] for doc in documents for s in range(0, len(doc), room))
    elif context == "documents":
        pieces = (doc[:room] for doc in documents)
    else:
        ends = [np.array([eos_id], dtype=documents[0].dtype)] if eos_id is not None else []
        stream = np.concatenate([part for doc in documents for part in (doc, *ends)]) if documents else np.array([])
        pieces = (stream[s:s + room] for s in range(0, len(stream), room))
    out, total = [], 0
    for piece in pieces:
        if not len(piece):
            continue
        if bos_id is not None:
            piece = np.concatenate([np.array([bos_id], dtype=piece.dtype), piece])
        if token_budget is not None:
            piece = piece[: token_budget - total]
        out.append(piece)
        total += len(piece)
        if token_budget is not None and total >= token_budget:
            break
    return out


def special_token_ids(model, options: SimilarityOptions) -> tuple[int | None, int | None]:
    """(the BOS id to prepend, or None; the end-of-text id of the ``stream`` context, or None) from
    the model's config."""
    def first(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    bos = None
    if options.bos:
        bos = first(model.config.bos_token_id)
        if bos is None:
            raise MoelangError(f"similarity.bos is true, but this {model.config.model_type} model has no BOS token "
                               f"(bos_token_id is null: its tokenizer adds none); set similarity.bos: false")
    return bos, first(model.config.eos_token_id)


def token_similarity(adapter, token_files: dict[str, str | Path], options: SimilarityOptions | dict, model_name: str) -> pl.DataFrame:
    options = SimilarityOptions.coerce(options)
    from moelang.routing import length_batches

    pad = adapter.model.config.pad_token_id if adapter.model.config.pad_token_id is not None else 0
    context = options.context
    bos_id, eos_id = special_token_ids(adapter.model, options)
    longest = getattr(adapter.model.config, "max_position_embeddings", None)
    if longest is not None and options.seq_len > longest:  # positions the model never saw in training
        log.warning("similarity: similarity.seq_len %d is longer than this model's context (max_position_embeddings "
                    "%d): sequences longer than that see positions it was never trained on; set similarity.seq_len "
                    "to at most %d", options.seq_len, longest, longest)
    log.info("similarity %s: context %s of at most %d tokens%s", model_name, context, options.seq_len,
             f", BOS {bos_id} first" if bos_id is not None else "")
    means, counts = {}, {}
    for lang, path in token_files.items():
        chunks = context_sequences(split_documents(path, DEV), context, options.seq_len,
                                   options.tokens_per_language, bos_id=bos_id, eos_id=eos_id)
        batches = length_batches(chunks, options.batch_tokens, pad)
        means[lang], counts[lang] = token_unit_means(adapter, batches, f"similarity {model_name} {lang}")
    experts = layer_experts(adapter)
    rows = []
    for a, b in _pairs(list(token_files)):
        sims = (means[a] * means[b]).sum(-1)
        for layer in range(adapter.num_layers):
            rows.append((model_name, layer, a, b, float(sims[layer]), counts[a], counts[b], experts[layer]))
    return pl.DataFrame(rows, schema=SIMILARITY_SCHEMA, orient="row")


def parallel_similarity(adapter, tokenizer, parallel_path: str | Path, languages: list[str], options: SimilarityOptions | dict,
                        model_name: str) -> pl.DataFrame:
    options = SimilarityOptions.coerce(options)
    table = pl.read_parquet(parallel_path)
    langs = [lang for lang in languages if lang in table.columns]
    if len(langs) < 2:
        raise MoelangError(f"similarity: the parallel table has columns for {langs} only; the parallel variant needs "
                           f"at least two of the languages (set corpus.parallel, or similarity.method: tokens)")
    limit = options.max_parallel_items
    vectors, present, n_tokens = {}, {}, {}
    for lang in langs:
        column = table[lang]
        keep = column.is_not_null().to_numpy()
        texts = column.filter(column.is_not_null()).to_list()
        if limit:
            idx = np.flatnonzero(keep)[:limit]
            keep = np.zeros_like(keep)
            keep[idx] = True
            texts = texts[:limit]
        present[lang] = keep
        vectors[lang] = np.full((adapter.num_layers, len(keep), adapter.model.config.hidden_size), np.nan)
        pooled, n_tokens[lang] = sentence_vectors(adapter, tokenizer, texts, desc=f"similarity {model_name} {lang}")
        vectors[lang][:, keep] = pooled.numpy()
    experts = layer_experts(adapter)
    rows = []
    for a, b in _pairs(langs):
        both = present[a] & present[b]
        if not both.any():
            continue
        va = vectors[a][:, both]
        vb = vectors[b][:, both]
        cos = (va * vb).sum(-1) / (np.linalg.norm(va, axis=-1) * np.linalg.norm(vb, axis=-1)).clip(min=1e-12)
        for layer in range(adapter.num_layers):
            rows.append((model_name, layer, a, b, float(cos[layer].mean()), n_tokens[a], n_tokens[b], experts[layer]))
    return pl.DataFrame(rows, schema=SIMILARITY_SCHEMA, orient="row")


def plot_similarity(table: pl.DataFrame, path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pairs = table.filter(pl.col("lang_a") != pl.col("lang_b"))
    for _, part in pairs.group_by(["lang_a", "lang_b"], maintain_order=True):
        part = part.sort("layer")
        ax.plot(part["layer"], part["similarity"], alpha=0.35, linewidth=1)
    mean = pairs.group_by("layer").agg(pl.col("similarity").mean()).sort("layer")
    ax.plot(mean["layer"], mean["similarity"], "k-o", linewidth=2.5, label="mean over language pairs")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-lingual similarity (mean cosine)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run_similarity(model_ref: str | Path, token_files: dict[str, str | Path], options: SimilarityOptions | dict, out_table: str | Path,
                   out_plot: str | Path | None, model_name: str, parallel_path: str | Path | None = None) -> pl.DataFrame:
    options = SimilarityOptions.coerce(options)
    from transformers import AutoTokenizer

    from moelang.models import ModelAdapter, load_for_inference

    model = load_for_inference(model_ref, options)
    adapter = ModelAdapter(model)
    if options.method == "parallel":
        if parallel_path is None:
            raise MoelangError("similarity: the parallel method needs --parallel results/corpus/parallel.parquet")
        tokenizer = AutoTokenizer.from_pretrained(str(model_ref), revision=options.revision,
                                                  trust_remote_code=options.trust_remote_code)
        table = parallel_similarity(adapter, tokenizer, parallel_path, list(token_files), options, model_name)
    else:
        table = token_similarity(adapter, token_files, options, model_name)
    with atomic_path(out_table) as tmp:
        table.write_parquet(tmp, compression="zstd")
    if out_plot:
        plot_similarity(table, out_plot, f"Cross-lingual similarity per layer ({model_name}, {options.method})")
    off = table.filter(pl.col("lang_a") != pl.col("lang_b")).group_by("layer").agg(pl.col("similarity").mean()).sort("layer")
    log.info("similarity %s: mean over pairs by layer: %s", model_name,
             ", ".join(f"{l}: {s:.3f}" for l, s in off.iter_rows()))
    return table

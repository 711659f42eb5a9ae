"""Stage: routing profiles. Which experts each language's tokens use, per layer and checkpoint.

For a model and each language, the token ids of the dev split are cut into sequences (``routing.windowing``);
the profiles choose the experts adaptation trains and inform the allocation, so they are model selection
and read dev, never the test split the results are reported on (:mod:`moelang.splits`):

* ``document`` (default): each document cut into chunks of at most ``seq_len`` tokens, never across
  documents; a short document is a short sequence;
* ``stream`` (the authors' way): the dev documents in file order, each followed by the EOS
  token, concatenated into one stream cut into non-overlapping windows of exactly ``seq_len`` tokens
  (2,048 in the paper) across document boundaries; the incomplete tail is dropped, so there is no
  padding. Routing depends on the context, so the two give different counts.

The sequences are sorted by length (little padding), batched up to ``batch_tokens`` and run through the model.
At every MoE layer the adapter reports the experts each token actually used (``top_k_index``) and
their routing weights; per (layer, expert) the profiler adds up on the device

* ``count``: how many tokens had the expert among their top-k,
* ``weight_sum``: the routing weight those tokens gave it (the router probability mass it received),

and ``n_tokens``, the tokens seen at that layer. Padding is never counted (its positions are masked
out before the ``bincount``); nothing per token leaves the device, and there is no Python loop over
tokens. Layers may have different numbers of experts (an expanded model): each layer has rows for
its own experts. Optionally, for chosen layers, ``(token_id, expert)`` counts relate routing to vocabulary.
A per-language token budget (``routing.tokens_per_language``; the authors take 1,024,000 tokens, 500
windows of 2,048) caps the work: ``document`` cuts the last chunk to fit, ``stream`` keeps the whole
windows that fit.

Outputs
-------
``results/routing/{model}/{lang}.parquet``
    ``model`` string, ``checkpoint_step`` int64, ``lang`` string, ``layer`` int32 (decoder layer
    index), ``expert`` int32, ``count`` int64, ``weight_sum`` float64, ``n_tokens`` int64; one row per
    (MoE layer, expert of that layer).
``results/routing/{model}/{lang}.tokens.parquet`` (only with ``routing.token_layers``)
    ``model``, ``checkpoint_step``, ``lang``, ``layer``, ``token_id`` int32, ``expert`` int32,
    ``count`` int64; only non-zero counts.
``results/routing/shards/{model}/{i}/`` (``routing.shards`` > 1)
    the same files for every N-th dev chunk (or window) from the i-th; the merge job adds them up per row,
    giving exactly the unsharded counts (weight sums up to float addition order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from moelang.errors import MoelangError
from moelang.io import atomic_dir, log, progress, write_table
from moelang.options import RoutingOptions
from moelang.splits import DEV, split_token_ids

PROFILE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("checkpoint_step", pa.int64()),
        ("lang", pa.string()),
        ("layer", pa.int32()),
        ("expert", pa.int32()),
        ("count", pa.int64()),
        ("weight_sum", pa.float64()),
        ("n_tokens", pa.int64()),
    ]
)
TOKEN_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("checkpoint_step", pa.int64()),
        ("lang", pa.string()),
        ("layer", pa.int32()),
        ("token_id", pa.int32()),
        ("expert", pa.int32()),
        ("count", pa.int64()),
    ]
)


# --------------------------------------------------------------------------------------------------
# Input: chunks of a held-out split (dev or test), batched by length
# --------------------------------------------------------------------------------------------------

def _split_documents(token_file: str | Path, split: str, shard: tuple[int, int]):
    """The token ids of ``token_file``'s ``split`` documents (an Arrow list array), after checking the shard."""
    index, count = shard
    if not 0 <= index < count:
        raise MoelangError(f"routing: shard {index}/{count} does not exist; use i/n with 0 <= i < n")
    return split_token_ids(token_file, split)


def heldout_chunks(token_file: str | Path, seq_len: int, token_budget: int | None, *, split: str,
                   shard: tuple[int, int] = (0, 1)) -> list[np.ndarray]:
    """The ``split`` documents of a token file cut into chunks of at most ``seq_len`` tokens, in file
    order, until ``token_budget`` tokens (the last chunk is cut to fit). ``shard = (i, n)`` keeps every
    n-th chunk from the i-th: the n shards together are exactly the unsharded chunks, so profiles of
    the shards, made in separate jobs, add up (:func:`merge_profiles`)."""
    index, count = shard
    ids = _split_documents(token_file, split, shard)
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy()
    chunks, total = [], 0
    for start, end in zip(offsets[:-1], offsets[1:]):
        for s in range(start, end, seq_len):
            piece = flat[s:min(end, s + seq_len)]
            if token_budget is not None and total + len(piece) > token_budget:
                piece = piece[: token_budget - total]
            if len(piece):
                chunks.append(piece)
                total += len(piece)
            if token_budget is not None and total >= token_budget:
                return chunks[index::count]
    return chunks[index::count]


def heldout_windows(token_file: str | Path, window: int, token_budget: int | None, eos_id: int, *,
                    split: str, shard: tuple[int, int] = (0, 1)) -> list[np.ndarray]:
    """The ``split`` documents of a token file in file order, each followed by ``eos_id``, as one stream
    cut into non-overlapping windows of exactly ``window`` tokens (the authors' routing windows: across
    document boundaries, the incomplete tail dropped, no padding). At most ``token_budget`` tokens:
    the whole windows that fit. ``shard = (i, n)`` keeps every n-th window from the i-th, as in
    :func:`heldout_chunks`."""
    index, count = shard
    ids = _split_documents(token_file, split, shard)
    lengths = np.diff(ids.offsets.to_numpy())
    if token_budget is not None:  # only the documents the budget reaches: held-out splits can be large
        ids = ids.slice(0, int(np.searchsorted(np.cumsum(lengths + 1), token_budget)) + 1)
        lengths = lengths[: len(ids)]
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    # each document's tokens move right by the number of separators before it (one per earlier document)
    stream = np.full(len(flat) + len(lengths), eos_id, dtype=flat.dtype)
    shift = np.repeat(np.arange(len(lengths)), lengths)
    stream[np.arange(len(flat)) + shift] = flat
    usable = len(stream) if token_budget is None else min(len(stream), token_budget)
    n_windows = usable // window
    if n_windows == 0:
        raise MoelangError(f"routing: '{token_file}' gives {usable} {split} tokens (EOS included, within "
                           f"routing.tokens_per_language), fewer than one window of routing.seq_len = {window} with "
                           f"routing.windowing: stream; lower routing.seq_len or use routing.windowing: document")
    windows = stream[: n_windows * window].reshape(n_windows, window)
    return list(windows[index::count])


def routing_sequences(token_file: str | Path, options: RoutingOptions | dict, eos_id: int | None,
                      shard: tuple[int, int] = (0, 1)) -> list[np.ndarray]:
    """The sequences one language is profiled on (its dev split), by ``options.windowing`` (default ``document``)."""
    options = RoutingOptions.coerce(options)
    windowing = options.windowing
    if windowing == "document":
        return heldout_chunks(token_file, options.seq_len, options.tokens_per_language, split=DEV, shard=shard)
    if windowing == "stream":
        if eos_id is None:
            raise MoelangError("routing.windowing: stream needs the model's eos_token_id (config.json) to separate "
                               "documents; set it in the model config or use routing.windowing: document")
        return heldout_windows(token_file, options.seq_len, options.tokens_per_language, eos_id, split=DEV,
                               shard=shard)
    raise MoelangError(f"routing.windowing '{windowing}' is not known; use 'document' or 'stream'")


def length_batches(chunks: list[np.ndarray], batch_tokens: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of similar-length chunks, at most ``batch_tokens`` padded
    tokens each (a single longer chunk still forms its own batch)."""
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    batches, current = [], []
    for i in order:
        width = len(chunks[i])  # sorted ascending: the newest chunk is the widest
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    out = []
    for members in batches:
        width = max(len(chunks[i]) for i in members)
        ids = np.full((len(members), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(members), width), dtype=np.int64)
        for row, i in enumerate(members):
            ids[row, : len(chunks[i])] = chunks[i]
            mask[row, : len(chunks[i])] = 1
        out.append((torch.from_numpy(ids), torch.from_numpy(mask)))
    return out


# --------------------------------------------------------------------------------------------------
# Profiler
# --------------------------------------------------------------------------------------------------

@dataclass
class RoutingCounts:
    """Per-layer accumulators, on the model's device. Layers may have different expert counts (an
    expanded model): rows are as wide as the largest layer, and a layer's columns past its own
    ``experts_per_layer`` entry stay zero and are never written out."""

    layers: list[int]
    experts_per_layer: list[int]  # routed experts of each profiled layer, in ``layers`` order
    counts: torch.Tensor  # [n_layers, max E] int64
    weight_sums: torch.Tensor  # [n_layers, max E] float64
    n_tokens: torch.Tensor  # [n_layers] int64
    token_counts: dict[int, torch.Tensor]  # layer -> [V * E_layer] int64 (flattened token_id * E_layer + expert)


class RoutingProfiler:
    """Accumulates routing statistics over forward passes (see the module docstring)."""

    def __init__(self, adapter, token_layers: list[int] | None = None, vocab_size: int | None = None):
        if not adapter.is_moe:
            raise MoelangError(f"routing: this {adapter.family} model has no MoE layer to profile")
        self.adapter = adapter
        device = next(adapter.model.parameters()).device
        layers = [m.index for m in adapter.moe_layers]
        self.experts = {m.index: m.num_experts for m in adapter.moe_layers}  # layer -> its expert count
        self.row = {layer: i for i, layer in enumerate(layers)}
        bad = [layer for layer in token_layers or [] if layer not in self.row]
        if bad:
            raise MoelangError(f"routing.token_layers {bad} are not MoE layers of this model (MoE layers: {layers})")
        self.vocab_size = vocab_size or adapter.model.config.vocab_size
        widest = max(self.experts.values())
        self.state = RoutingCounts(
            layers=layers,
            experts_per_layer=[self.experts[layer] for layer in layers],
            counts=torch.zeros(len(layers), widest, dtype=torch.int64, device=device),
            weight_sums=torch.zeros(len(layers), widest, dtype=torch.float64, device=device),
            n_tokens=torch.zeros(len(layers), dtype=torch.int64, device=device),
            token_counts={layer: torch.zeros(self.vocab_size * self.experts[layer], dtype=torch.int64, device=device)
                          for layer in token_layers or []},
        )
        self._valid: torch.Tensor | None = None  # flattened attention mask of the current batch
        self._token_ids: torch.Tensor | None = None

    def _record(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        valid = self._valid
        index = top_k_index[valid]  # [n_valid, k]; padding rows dropped
        e, row = self.experts[layer], self.row[layer]
        flat = index.reshape(-1)
        self.state.counts[row, :e] += torch.bincount(flat, minlength=e)[:e]
        self.state.weight_sums[row].index_add_(0, flat, top_k_weights[valid].reshape(-1).to(torch.float64))
        self.state.n_tokens[row] += index.shape[0]
        if layer in self.state.token_counts:
            token = self._token_ids[valid].unsqueeze(-1).expand_as(index)
            self.state.token_counts[layer] += torch.bincount((token * e + index).reshape(-1),
                                                             minlength=self.vocab_size * e)[: self.vocab_size * e]

    @torch.no_grad()
    def run(self, batches, desc: str = "routing") -> None:
        model = self.adapter.model
        device = next(model.parameters()).device
        with self.adapter.record_routing(self._record):
            for input_ids, attention_mask in progress(batches, desc=desc, unit=" batches"):
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                self._valid = attention_mask.reshape(-1).bool()
                self._token_ids = input_ids.reshape(-1)
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        self._valid = self._token_ids = None

    def table(self, model_name: str, checkpoint_step: int, lang: str) -> pa.Table:
        s = self.state
        sizes = np.array(s.experts_per_layer)
        rows = int(sizes.sum())
        # each layer's own experts only (with equal counts: the whole [n_layers, E] block, row-major)
        keep = np.arange(s.counts.shape[1])[None, :] < sizes[:, None]
        return pa.table({
            "model": [model_name] * rows,
            "checkpoint_step": np.full(rows, checkpoint_step, dtype=np.int64),
            "lang": [lang] * rows,
            "layer": np.repeat(np.array(s.layers, dtype=np.int32), sizes),
            "expert": np.concatenate([np.arange(e, dtype=np.int32) for e in sizes]),
            "count": s.counts.cpu().numpy()[keep],
            "weight_sum": s.weight_sums.cpu().numpy()[keep],
            "n_tokens": np.repeat(s.n_tokens.cpu().numpy(), sizes),
        }, schema=PROFILE_SCHEMA)

    def token_table(self, model_name: str, checkpoint_step: int, lang: str) -> pa.Table:
        parts = []
        for layer, flat in sorted(self.state.token_counts.items()):
            e = self.experts[layer]
            values = flat.cpu().numpy()
            nonzero = np.flatnonzero(values)
            parts.append(pa.table({
                "model": [model_name] * len(nonzero),
                "checkpoint_step": np.full(len(nonzero), checkpoint_step, dtype=np.int64),
                "lang": [lang] * len(nonzero),
                "layer": np.full(len(nonzero), layer, dtype=np.int32),
                "token_id": (nonzero // e).astype(np.int32),
                "expert": (nonzero % e).astype(np.int32),
                "count": values[nonzero],
            }, schema=TOKEN_SCHEMA))
        return pa.concat_tables(parts) if parts else TOKEN_SCHEMA.empty_table()


def profile_model(model_ref: str | Path, token_files: dict[str, str | Path], options: RoutingOptions | dict, out_dir: str | Path,
                  model_name: str, checkpoint_step: int) -> None:
    """Profile one model on every language; writes ``{out_dir}/{lang}.parquet`` (and token tables)."""
    options = RoutingOptions.coerce(options)
    from moelang.models import ModelAdapter, load_for_inference

    model = load_for_inference(model_ref, options)
    adapter = ModelAdapter(model)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    eos_id = model.config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, (list, tuple)) else eos_id  # some configs list several
    token_layers = options.token_layers or []
    shard = tuple(options.shard or (0, 1))
    log.info("routing %s: %s windowing, sequences of %s %d tokens", model_name, options.windowing,
             "exactly" if options.windowing == "stream" else "at most", options.seq_len)
    for lang, token_file in token_files.items():
        chunks = routing_sequences(token_file, options, eos_id, shard=shard)
        batches = length_batches(chunks, options.batch_tokens, pad_id)
        profiler = RoutingProfiler(adapter, token_layers=token_layers)
        profiler.run(batches, desc=f"routing {model_name} {lang}")
        write_table(profiler.table(model_name, checkpoint_step, lang), Path(out_dir) / f"{lang}.parquet")
        if token_layers:
            write_table(profiler.token_table(model_name, checkpoint_step, lang), Path(out_dir) / f"{lang}.tokens.parquet")
        log.info("routing %s %s: %d tokens over %d MoE layers", model_name, lang,
                 int(profiler.state.n_tokens[0]), len(profiler.state.layers))


def merge_profiles(paths: list[str | Path]) -> pa.Table:
    """Add up profiles (or token tables) of the same (model, checkpoint, language) made on shards of
    its tokens."""
    import polars as pl

    frame = pl.concat([pl.read_parquet(p) for p in paths])
    schema = TOKEN_SCHEMA if "token_id" in frame.columns else PROFILE_SCHEMA
    sums = [name for name in ("count", "weight_sum", "n_tokens") if name in schema.names]
    keys = [name for name in schema.names if name not in sums]
    merged = frame.group_by(keys, maintain_order=True).agg(pl.col(*sums).sum()).sort(keys)
    return merged.select(schema.names).to_arrow().cast(schema)


def merge_profile_dirs(shard_dirs: list[str | Path], out_dir: str | Path) -> list[str]:
    """Merge the shard directories of one model (each holding ``<lang>.parquet`` and maybe
    ``<lang>.tokens.parquet``) into ``out_dir``, file by file; returns the merged file names."""
    shard_dirs = [Path(d) for d in shard_dirs]
    names = sorted(p.name for p in shard_dirs[0].glob("*.parquet"))
    if not names:
        raise MoelangError(f"merge-routing: '{shard_dirs[0]}' holds no profile; rerun its profile-routing shard job")
    for directory in shard_dirs[1:]:
        other = sorted(p.name for p in directory.glob("*.parquet"))
        if other != names:
            raise MoelangError(f"merge-routing: '{directory}' holds {other}, '{shard_dirs[0]}' holds {names}; "
                               f"the shards must profile the same languages (rerun them with one config)")
    with atomic_dir(out_dir) as tmp:
        for name in progress(names, desc="merge routing", unit=" files"):
            write_table(merge_profiles([d / name for d in shard_dirs]), tmp / name)
    log.info("merge-routing: %d files from %d shards into %s", len(names), len(shard_dirs), out_dir)
    return names

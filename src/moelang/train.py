"""The one training engine: pre-training, continual pre-training and every adaptation method.

Causal-LM training on the token Parquet files of the tokenize stage:

* **data**: each language's train documents, in a seeded order, joined with the end-of-text token
  and cut into fixed-length windows (packing); every sequence of a batch comes from a language drawn
  with the mixture weights; each language's windows are visited in a fresh seeded order every epoch;
* **optimisation**: AdamW (betas, eps) with weight decay on the trainable matrices only (never on
  norms, biases, or frozen tensors), cosine schedule with linear warm-up down to
  ``min_lr_ratio`` x lr, gradient accumulation, clipping, the MoE load-balancing loss with its weight,
  fp32 or bf16 autocast; the optimizer always steps fp32 weights (:func:`fp32_master_weights`): the
  paper configs load their models in bf16, and AdamW on bf16 weights rounds away every update smaller
  than half a bf16 step, about 1/512 of a weight (measured: at lr 1e-5, 6 steps left 85% of a tiny
  model's weights where they were), so trainable half-precision tensors train in fp32 and exports are
  written in the dtype loaded;
* **parallelism** under torchrun (one process per GPU): ``ddp`` (through ``accelerate``) replicates the
  model and averages gradients; ``fsdp`` (PyTorch FSDP2, ``fully_shard`` per decoder layer, then the
  root) shards parameters, gradients and optimizer state across the processes, for full training of
  models whose replicas would not fit. One process: plain training either way;
* **checkpoints** every ``checkpoint_every`` steps in a state directory *outside* the stage's
  outputs (Snakemake deletes a failed job's outputs): trainable tensors, optimizer, scheduler, RNG
  states, data position, log. A killed run started again resumes from its last complete checkpoint and
  ends with exactly the weights of an uninterrupted run with the same number of processes: bit-identical
  on CPU, tested with 1 process and with 2 and 4 gloo processes under DDP and under FSDP (on GPUs, as
  far as the kernels are deterministic). DDP keeps its first gradient-bucket layout for the whole run
  (``find_unused_parameters``): otherwise it rebuilds the buckets after the first iteration, a resumed
  run's first step would reduce in another order, and with more than 2 processes the weights would
  differ in the last bits (measured: up to 6e-8 after 12 steps with 4 processes). FSDP's reduce-scatter
  buffers have one layout from the start. Tensors are keyed by parameter name: stored whole by the
  first process under DDP and with one process, sharded under FSDP (each process writes its own rows,
  :func:`save_sharded_checkpoint`); the shards join into the whole tensors, so a checkpoint of one
  parallelism resumes under the other (equal up to float summation order). The newest
  ``keep_last_states`` checkpoints are kept;
* **the state directory** belongs to its inputs: :func:`run_fingerprint` (start weights and config,
  trainable-parameter set, token files, the caller's tokenizer and model source) is written into it
  when a run starts, and a state with another fingerprint (or none) is discarded, with its staged
  exports, in one log line saying what changed; a change of settings is refused instead. One run
  writes a state at a time (``<state_dir>.lock``, :func:`exclusive_state`); a second stops at once,
  naming the holder. Under torchrun each worker is killed by the kernel when its launcher dies
  (:func:`die_with_launcher`). Exports are staged in the state and :func:`publish` puts them into the
  outputs before it removes the state, so a kill at any point loses at most the steps since the last
  checkpoint;
* **methods and losses**: a training method (:mod:`moelang.models.methods`) decides what trains
  through hooks (``prepare``, ``before_step``, ``step_context``, ``export_state``, ``finalize``); the engine knows no
  trainable-subset mechanism. A loss function (:data:`LossFn`) turns the model's output, the batch
  and each sequence's language into the loss and the metrics of the log;
* **log**: one row per optimizer step in ``train_log.parquet`` (see :data:`LOG_SCHEMA`, then the loss
  function's other metrics), a progress bar;
* **exports** with ``save_pretrained`` (safetensors) at chosen steps, loadable by any later stage and by
  lm-eval through ``AutoModelForCausalLM``.

Checkpoints use safetensors for tensors and JSON for the rest: no pickle.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from moelang.errors import MoelangError
from moelang.io import atomic_dir, atomic_path, log, progress
from moelang.models.loading import count_parameters
from moelang.models.methods import TrainingMethod
from moelang.options import TrainSettings

LOG_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),  # optimizer steps done (1-based)
        ("tokens", pa.int64()),  # tokens trained on so far (all processes)
        ("loss", pa.float64()),  # language-modelling loss of the step (mean over micro-batches)
        ("aux_loss", pa.float64()),  # load-balancing loss before its weight (NaN if the model has none)
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),  # before clipping
        ("tokens_per_s", pa.float64()),
    ]
)
# A loss function's other metrics (see LossFn) follow these columns, float64, in the order it returns them.


def log_schema(rows: list[dict]) -> pa.Schema:
    """:data:`LOG_SCHEMA` and the extra metric columns of ``rows`` (float64)."""
    extra: dict[str, None] = {}
    for row in rows[:1]:
        extra.update((k, None) for k in row if k not in LOG_SCHEMA.names)
    return pa.schema(list(LOG_SCHEMA) + [(name, pa.float64()) for name in extra])


# ``loss_fn(model, batch, outputs, langs) -> (loss, metrics)``: ``model`` as the engine calls it,
# ``batch`` this process's [micro_batch, seq_len] token ids (also the labels), ``outputs`` the model's
# output for them, ``langs`` each sequence's language. ``loss`` is what is backpropagated;
# ``metrics`` (tensors or floats) are averaged over micro-batches and processes into the step's log
# row: "loss" (the language-modelling loss; default: ``loss``) and "aux_loss" (default: NaN) fill
# :data:`LOG_SCHEMA`'s columns, any other name becomes a column of its own.
LossFn = Callable[[torch.nn.Module, torch.Tensor, Any, list[str]], tuple[torch.Tensor, dict[str, Any]]]


def router_z_loss(router_logits) -> torch.Tensor:
    """ST-MoE's router z-loss: per MoE layer the mean over tokens of ``logsumexp(logits)^2``, averaged
    over the layers (the OLMoE recipe weights it 0.001). It keeps router logits small, which bf16
    needs. ``router_logits``: one ``[tokens, experts]`` tensor per MoE layer (transformers'
    ``output_router_logits``); the packed batches have no padding, so every token counts."""
    layers = [logits for logits in router_logits if logits is not None]
    return torch.stack([torch.logsumexp(l.float(), dim=-1).square().mean() for l in layers]).mean()


def lm_loss(aux_loss_coef: float, uses_aux: bool, z_loss_coef: float = 0.0) -> LossFn:
    """The default loss: the model's own (language modelling, plus ``aux_loss_coef`` x its
    load-balancing loss when ``uses_aux``), logged as its two parts; with ``z_loss_coef`` > 0 also
    ``z_loss_coef`` x :func:`router_z_loss`, logged as ``z_loss`` (before its weight)."""
    def loss_fn(model, batch, outputs, langs):
        aux = getattr(outputs, "aux_loss", None)
        with_aux = uses_aux and aux is not None
        lm = outputs.loss - aux_loss_coef * aux if with_aux else outputs.loss
        metrics = {"loss": lm, "aux_loss": aux if with_aux else float("nan")}
        if z_loss_coef <= 0:
            return outputs.loss, metrics
        z = router_z_loss(outputs.router_logits)
        return outputs.loss + z_loss_coef * z, metrics | {"z_loss": z}

    return loss_fn


# Settings a checkpoint may be resumed under with another value: they change neither the result's
# definition nor the checkpoint's content (a sharded checkpoint's shards join into the whole tensors).
RESUMABLE_ACROSS = ("checkpoint_every", "parallelism", "keep_last_states", "activation_checkpointing")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def packed_windows(token_file: str | Path, seq_len: int, eos_id: int, seed: int, split: str = "train") -> np.ndarray:
    """[n_windows, seq_len] int32 windows of one language: its ``split`` documents in a seeded order,
    each followed by ``eos_id``, concatenated and cut (the incomplete tail is dropped)."""
    table = pq.read_table(token_file, columns=["split", "input_ids"])
    mask = pa.compute.equal(table.column("split"), split)
    ids = table.column("input_ids").filter(mask).combine_chunks()
    if len(ids) == 0:
        raise MoelangError(f"training data: '{token_file}' has no '{split}' documents; check the corpus split")
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy()
    order = np.random.default_rng(_seed_for("doc-order", seed, Path(token_file).name)).permutation(len(ids))
    lengths = np.diff(offsets)[order]
    starts = offsets[:-1][order]
    # Vectorised gather: token t of the i-th document (new order) goes to out_start[i] + t, where each
    # document is followed by one separator.
    out_starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    token_doc = np.repeat(np.arange(len(order)), lengths)
    within = np.arange(len(token_doc)) - np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    out = np.full(int((lengths + 1).sum()), eos_id, dtype=np.int32)  # int32: half the memory of int64
    out[out_starts[token_doc] + within] = flat[starts[token_doc] + within]
    n_windows = len(out) // seq_len
    if n_windows == 0:
        raise MoelangError(f"training data: '{token_file}' has {len(out)} tokens, fewer than one sequence of "
                           f"{seq_len}; lower seq_len or add text")
    return out[: n_windows * seq_len].reshape(n_windows, seq_len)


class PackedStream:
    """Batches of packed windows from a language mixture, with a resumable position."""

    def __init__(self, token_files: dict[str, str | Path], mixture: dict[str, float], seq_len: int, eos_id: int,
                 seed: int):
        if not token_files:
            raise MoelangError("training data: no token file given")
        weights = {lang: float(mixture.get(lang, 1.0)) for lang in token_files} if mixture else \
            {lang: 1.0 for lang in token_files}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise MoelangError(f"training mixture {weights}: weights must be >= 0 and not all 0")
        self.languages = sorted(token_files)
        total = sum(weights.values())
        self.probabilities = np.array([weights[lang] / total for lang in self.languages])
        self.seed = seed
        self.token_files = {lang: Path(token_files[lang]) for lang in self.languages}
        self.windows = {lang: packed_windows(token_files[lang], seq_len, eos_id, seed) for lang in self.languages}
        self.rng = np.random.Generator(np.random.PCG64(_seed_for("mixture", seed)))
        self.consumed = {lang: 0 for lang in self.languages}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}
        log.info("training data: %s", ", ".join(f"{l} {len(self.windows[l])} windows (p={p:.3f})"
                                                 for l, p in zip(self.languages, self.probabilities)))

    def _window(self, lang: str, j: int) -> np.ndarray:
        windows = self.windows[lang]
        epoch, i = divmod(j, len(windows))
        cached = self._perm_cache.get(lang)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng(_seed_for("epoch", self.seed, lang, epoch)).permutation(len(windows))
            self._perm_cache[lang] = cached = (epoch, perm)
        return windows[cached[1][i]]

    def next_batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        choices = self.rng.choice(len(self.languages), size=n, p=self.probabilities)
        rows, langs = [], []
        for c in choices:
            lang = self.languages[c]
            rows.append(self._window(lang, self.consumed[lang]))
            self.consumed[lang] += 1
            langs.append(lang)
        return torch.from_numpy(np.stack(rows).astype(np.int64)), langs

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "consumed": dict(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.consumed = {lang: int(state["consumed"].get(lang, 0)) for lang in self.languages}


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, settings: TrainSettings,
                   peak_lrs: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices (and on norms and biases with
    ``decay_norms_and_biases``). ``peak_lrs``: submodule name -> its own peak learning rate (the
    schedule's factor applies to it as to ``settings.lr``), for example LayerMoE's router classifiers."""
    peak_lrs = peak_lrs or {}

    def peak_lr(name: str) -> float:
        return next((lr for prefix, lr in peak_lrs.items() if name == prefix or name.startswith(prefix + ".")),
                    settings.lr)

    grouped: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = settings.weight_decay if param.ndim >= 2 or settings.decay_norms_and_biases else 0.0
        grouped.setdefault((peak_lr(name), decay), []).append(param)
    if not grouped:
        raise MoelangError("training: no parameter is trainable; check the method's selection")
    # the base rate's groups first, decayed before not decayed (the order checkpoints were written in)
    order = sorted(grouped, key=lambda key: (key[0] != settings.lr, -key[1], key[0]))
    groups = [{"params": grouped[key], "lr": key[0], "initial_lr": key[0], "weight_decay": key[1]} for key in order]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, foreach=False)


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up from
    ``warmup_start_ratio`` (0: from 1 / warmup_steps at the first step), then cosine from 1 down to
    ``min_lr_ratio`` at the last step, or at ``cosine_horizon_steps`` when that is set (a horizon far
    beyond the run, as in the authors' OLMo config, leaves the rate nearly constant after warm-up)."""
    if settings.warmup_steps and step < settings.warmup_steps:
        start = settings.warmup_start_ratio
        return start + (1 - start) * (step + 1) / settings.warmup_steps
    horizon = settings.cosine_horizon_steps or settings.steps
    span = max(1, horizon - settings.warmup_steps - 1)
    progress_ = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))


# --------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON)
# --------------------------------------------------------------------------------------------------

def _state_options(sharded: bool, load: bool = False, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not sharded:  # the parameters themselves, no copy
        return StateDictOptions(**kw)
    if load:  # the first process reads the files and sends each tensor to the others, which keep their shard
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, **kw)
    # whole tensors gathered on the CPU of the first process only, so that the others' memory stays flat
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def gather_state(model, optimizer, sharded: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Trainable tensors and optimizer state keyed by parameter name, as whole tensors.

    Under FSDP this is a collective: every process must call it, and only the main process gets
    the tensors (empty dicts elsewhere)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    options = _state_options(sharded)
    tensors = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trainable}
    return tensors, get_optimizer_state_dict(model, optimizer, options=options)


def _optimizer_tensors(optim_state: dict) -> dict[str, torch.Tensor]:
    # "<parameter name>.<state key>": AdamW's keys (step, exp_avg, exp_avg_sq) have no dot
    return {f"{name}.{key}": value for name, state in optim_state["state"].items()
            for key, value in state.items() if torch.is_tensor(value)}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], optim_state: dict, step: int, tokens: int,
                    stream: PackedStream, log_rows: list[dict], settings: TrainSettings, processes: int = 1) -> None:
    """Write what :func:`gather_state` returned, with the rest of the run's state (main process only)."""
    with atomic_dir(path) as tmp:
        save_file(_cpu(tensors), str(tmp / "trainable.safetensors"))
        save_file(_cpu(_optimizer_tensors(optim_state)), str(tmp / "optimizer.safetensors"))
        _write_run_state(tmp, optim_state["param_groups"], step, tokens, stream, log_rows, settings, processes)


def _write_run_state(directory: Path, param_groups: list[dict], step: int, tokens: int, stream: PackedStream,
                     log_rows: list[dict], settings: TrainSettings, processes: int, **extra) -> None:
    """A checkpoint's files besides the tensors: RNG states, ``state.json`` (``extra`` joins it), the log."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = state
    save_file(rng, str(directory / "rng.safetensors"))
    meta = {
        "step": step,
        "tokens": tokens,
        "param_groups": param_groups,  # "params": parameter names
        "stream": stream.state_dict(),
        "python_random": _jsonable(random.getstate()),
        "settings": asdict(settings),
        "processes": processes,
    } | extra
    (directory / "state.json").write_text(json.dumps(meta, indent=1))
    pq.write_table(pa.Table.from_pylist(log_rows, schema=log_schema(log_rows)), directory / "train_log.parquet")


# Under FSDP with several processes each process writes its own shards (FSDP2 cuts every tensor along
# its first dimension as torch.chunk does): no process ever holds the whole state, and the processes
# write at once. OLMoE-1B-7B's state (fp32 weights and two AdamW moments, 83 GB) would otherwise
# be gathered into the first process's memory and written by it alone at every checkpoint.
SHARD_DIM = 0


def shard_file(kind: str, rank: int, processes: int) -> str:
    """The name of process ``rank``'s file of ``kind`` (``trainable`` or ``optimizer``) in a sharded checkpoint."""
    return f"{kind}-rank{rank:05d}-of-{processes:05d}.safetensors"


def _local_shards(state: dict[str, Any], what: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """This process's part of each tensor of ``state`` and the whole shapes of those that are shards;
    a plain tensor (AdamW's step count) is the same on every process and stored whole by each."""
    from torch.distributed.tensor import DTensor, Shard

    local, whole = {}, {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            if tuple(value.placements) != (Shard(SHARD_DIM),):
                raise MoelangError(f"checkpoint: {what} {key} is placed {value.placements}, not sharded along dimension "
                                   f"{SHARD_DIM}; this parallelism is not supported by sharded checkpoints")
            whole[key] = list(value.shape)
            value = value.to_local()
        local[key] = value
    return _cpu(local), whole


def save_sharded_checkpoint(path: Path, model, optimizer, step: int, tokens: int, stream: PackedStream,
                            log_rows: list[dict], settings: TrainSettings, rank: int, processes: int,
                            barrier: Callable[[], None]) -> None:
    """Every process of an FSDP run writes its shards of the trainable tensors and of the optimizer
    state (:func:`shard_file`); the first one also writes the rest of the run's state, with the whole
    shape of every sharded tensor (``state.json``: ``sharded``). A collective: every process calls it.
    The files go to a hidden ``.step-N.partial`` directory renamed to ``step-N`` once all are written."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    partial = path.with_name(f".{path.name}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a killed run
        partial.mkdir(parents=True)
    barrier()
    options = _state_options(False)
    trainable, whole = _local_shards(get_model_state_dict(model, options=options), "parameter")
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    moments, whole_moments = _local_shards(_optimizer_tensors(optim_state), "optimizer state")
    save_file(trainable, str(partial / shard_file("trainable", rank, processes)))
    save_file(moments, str(partial / shard_file("optimizer", rank, processes)))
    barrier()
    if rank == 0:
        _write_run_state(partial, optim_state["param_groups"], step, tokens, stream, log_rows, settings, processes,
                         sharded={"dim": SHARD_DIM, "trainable": whole, "optimizer": whole_moments})
        if path.exists():
            shutil.rmtree(path)
        os.replace(partial, path)
    barrier()


def read_whole_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """The whole tensors of a checkpoint's ``kind`` (``trainable`` or ``optimizer``), in either form:
    one file, or the shards of every process joined along the sharded dimension."""
    if (path / f"{kind}.safetensors").is_file():
        return load_file(str(path / f"{kind}.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    processes, sharded = meta["processes"], meta["sharded"]
    parts = [load_file(str(path / shard_file(kind, rank, processes))) for rank in range(processes)]
    whole = {}
    for key, value in parts[0].items():
        if key not in sharded[kind]:
            whole[key] = value
            continue
        whole[key] = torch.cat([part[key] for part in parts], dim=sharded["dim"])
        if list(whole[key].shape) != sharded[kind][key]:
            raise MoelangError(f"checkpoint {path}: the shards of {key} join to {list(whole[key].shape)}, not "
                               f"{sharded[kind][key]}; delete {path.parent} to start over")
    return whole


def _load_own_shards(path: Path, model, optimizer, param_groups: list[dict], rank: int, processes: int) -> None:
    """Each process of an FSDP run puts its own shards of a sharded checkpoint back (same process count)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    # the live parameters under the names the checkpoint was saved with (wrapper prefixes removed)
    params = get_model_state_dict(model, options=_state_options(False))

    def like(key: str, name: str, value: torch.Tensor):
        live = params[name]
        if not isinstance(live, DTensor):
            return value.to(live.device)
        if tuple(value.shape) != tuple(live.to_local().shape):
            raise MoelangError(f"checkpoint {path}: this process's shard of {key} is {list(value.shape)}, the model's "
                               f"is {list(live.to_local().shape)}; delete {path.parent} to start over")
        return DTensor.from_local(value.to(live.device), live.device_mesh, live.placements, shape=live.shape,
                                  stride=live.stride(), run_check=False)

    tensors = load_file(str(path / shard_file("trainable", rank, processes)))
    set_model_state_dict(model, {k: like(k, k, v) for k, v in tensors.items()},
                         options=_state_options(False, strict=False))
    state: dict[str, dict] = {}
    for key, value in load_file(str(path / shard_file("optimizer", rank, processes))).items():
        name, what = key.rsplit(".", 1)
        state.setdefault(name, {})[what] = like(key, name, value) if value.ndim else value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": param_groups},
                             options=_state_options(False))


def _jsonable(obj):
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    return obj


def _tuplify(obj):
    if isinstance(obj, list):
        return tuple(_tuplify(x) for x in obj)
    return obj


def latest_checkpoint(state_dir: Path) -> Path | None:
    candidates = []
    for path in state_dir.glob("step-*"):
        if (path / "state.json").is_file():
            try:
                candidates.append((int(path.name.split("-", 1)[1]), path))
            except ValueError:
                continue
    return max(candidates)[1] if candidates else None


def load_checkpoint(path: Path, model, optimizer, stream: PackedStream, settings: TrainSettings,
                    sharded: bool = False, processes: int = 1) -> tuple[int, int, list[dict]]:
    """Restore a checkpoint into ``model`` (unwrapped; FSDP-sharded when ``sharded``) and ``optimizer``.
    A sharded checkpoint (:func:`save_sharded_checkpoint`) into a sharded model: each process reads
    its own shards. Otherwise the whole tensors (a sharded checkpoint's shards joined): unsharded,
    every process reads them; sharded, only the first one does (with 8 processes on a node, 8 whole
    copies of a large model's weights and optimizer state would not fit in memory) and the others
    receive their shards from it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    meta = json.loads((path / "state.json").read_text())
    saved = {k: v for k, v in meta["settings"].items() if k not in RESUMABLE_ACROSS}
    now = json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k not in RESUMABLE_ACROSS}))
    if json.loads(json.dumps(saved)) != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise MoelangError(f"checkpoint {path} was made with other training settings ({', '.join(diff)}); delete "
                           f"{path.parent} to start over, or restore the settings to resume")
    if any(not isinstance(name, str) for group in meta["param_groups"] for name in group["params"]):
        raise MoelangError(f"checkpoint {path} keys its optimizer state by index (an older moelang); delete "
                           f"{path.parent} to start over")
    if meta.get("processes", 1) != processes:
        # micro_batch_size is per process: another process count would change the global batch mid-run
        raise MoelangError(f"checkpoint {path} was made by {meta.get('processes', 1)} process(es), this run has "
                           f"{processes}; resume with {meta.get('processes', 1)}, or delete {path.parent} to start over")
    if sharded and "sharded" in meta:  # each process reads its own shards, written by this process count
        _load_own_shards(path, model, optimizer, meta["param_groups"], dist.get_rank(), processes)
    else:
        reads = not sharded or dist.get_rank() == 0
        # strict=False: only the trainable tensors are stored
        set_model_state_dict(model, read_whole_tensors(path, "trainable") if reads else {},
                             options=_state_options(sharded, load=True, strict=False))
        state: dict[str, dict] = {}
        for key, value in (read_whole_tensors(path, "optimizer") if reads else {}).items():
            name, what = key.rsplit(".", 1)
            state.setdefault(name, {})[what] = value
        set_optimizer_state_dict(model, optimizer,
                                 {"state": state, "param_groups": meta["param_groups"]} if reads else {},
                                 options=_state_options(sharded, load=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))])
    random.setstate(_tuplify(meta["python_random"]))
    stream.load_state_dict(meta["stream"])
    rows = pq.read_table(path / "train_log.parquet").to_pylist()
    return meta["step"], meta["tokens"], rows


# --------------------------------------------------------------------------------------------------
# The state directory: one writer, the inputs it belongs to, publishing its exports
# --------------------------------------------------------------------------------------------------

EXPORTS = "exports"  # staged exports live inside the state: they belong to its inputs as its checkpoints do
FINGERPRINT = "inputs.json"
_HELD: dict[Path, int] = {}  # state directory -> descriptor of its lock file, in the process that holds it


def staged_path(state_dir: str | Path, name: str) -> Path:
    """Where an export named ``name`` is staged until :func:`publish` puts it into the outputs."""
    return Path(state_dir) / EXPORTS / name


def _is_main_rank() -> bool:
    # torchrun and accelerate set RANK; read before any process group exists, so that the lock is
    # taken before the expensive work (loading a model) starts
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def exclusive_state(state_dir: str | Path):
    """Hold ``<state_dir>.lock`` (``flock``) on the main process while the block runs: a second run on
    the same state stops at once, naming the holder. Nested use in the holding process is a no-op; the
    lock file sits next to the state (not inside it) so that discarding the state keeps the lock."""
    state_dir = Path(state_dir).resolve()
    if not _is_main_rank() or state_dir in _HELD:
        yield
        return
    lock = state_dir.with_name(f"{state_dir.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise MoelangError(f"training state {state_dir}: cannot lock {lock} ({exc.strerror}); use a --state-dir "
                               f"on a file system with flock") from None
        raise MoelangError(f"training state {state_dir} is being written by {holder}; stop that run or wait for it "
                           f"to end before starting another on this state") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _HELD[state_dir] = fd
    try:
        yield
    finally:
        del _HELD[state_dir]
        os.close(fd)  # releases the lock; the kernel does the same for a killed process


PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this worker when its launcher dies.

    torch elastic starts each worker in a session of its own, so killing the job's process group
    (Snakemake, SLURM's step) kills the launcher only, and orphaned workers would go on writing the
    training state next to a resumed run. ``PR_SET_PDEATHSIG`` fires when the thread that forked us
    ends: torch elastic starts workers from the launcher's main thread, so that is the launcher's end.
    No-op outside torchrun (no ``TORCHELASTIC_RUN_ID``) and on systems other than Linux."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("training: prctl(PR_SET_PDEATHSIG) failed (errno %d); this worker may outlive its launcher",
                    ctypes.get_errno())
        return
    # The launcher may have died before the prctl: we were then re-parented (to init or a subreaper).
    if parent == 1 or os.getppid() != parent:
        log.error("training: the torchrun launcher has already exited; this worker stops")
        os.kill(os.getpid(), signal.SIGKILL)


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_digest(directory: str | Path, skip_suffixes: tuple[str, ...] = ()) -> str:
    """SHA-256 over the relative names and contents of a directory's files (sorted)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.endswith(skip_suffixes)):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    # hashlib releases the GIL on large buffers, so the threads of weights_digest run in parallel
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b"").hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of ``model``'s state dict (name, dtype, shape, bytes): exact, any
    changed weight changes it. Hashed in memory, where the weights already are: no second read of
    the safetensors files (hashing a file from the page cache ran at 0.45 GiB/s here). Measured here:
    0.5 GiB of bf16 weights in 0.31 s on 2 shared cores (1.6 GiB/s, about 0.8 GiB/s per core; the
    tensors are hashed by up to 8 threads), so OLMoE-1B-7B (6.9B parameters, 13 GiB in bf16) costs
    about 16 s of one core, 2 s on 8 cores, once per job start, next to the minutes its loading takes."""
    state = model.state_dict()
    names = sorted(state)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda name: _tensor_digest(state[name]), names))
    total = hashlib.sha256()
    for name, digest in zip(names, digests):
        tensor = state[name]
        total.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{digest}\0".encode())
    return total.hexdigest()


def config_digest(config) -> str:
    """SHA-256 of a transformers config, without what names its origin or the library version."""
    values = {k: v for k, v in config.to_dict().items()
              if k not in ("transformers_version", "_name_or_path", "_commit_hash")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(model: torch.nn.Module, stream: PackedStream, inputs: dict[str, str] | None = None) -> dict[str, str]:
    """What a training state belongs to, besides its settings (checked on resuming, with their own
    message): the start model (weights and config), the trainable-parameter set, the token files
    (contents) and the caller's ``inputs`` (the tokenizer, the start model's source). Call before
    the engine wraps or shards the model."""
    config = getattr(model, "config", None)
    trainable = [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]
    with ThreadPoolExecutor(max_workers=min(4, len(stream.token_files))) as pool:
        token_digests = dict(zip(stream.token_files, pool.map(file_digest, stream.token_files.values())))
    parts = {
        "start model weights": weights_digest(model),
        "start model config": config_digest(config) if config is not None else "none",
        "trainable parameters": hashlib.sha256(json.dumps(trainable).encode()).hexdigest(),
        **{f"token file {lang}": digest for lang, digest in token_digests.items()},
    }
    return parts | {k: str(v) for k, v in (inputs or {}).items()}


def claim_state(state_dir: Path, fingerprint: dict[str, str]) -> None:
    """Keep ``state_dir`` if it was made from the same inputs; else discard it (checkpoints and staged
    exports) with one log line saying what changed. Then record ``fingerprint`` (main process)."""
    path = state_dir / FINGERPRINT
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved == fingerprint:
        return
    if state_dir.is_dir() and any(state_dir.iterdir()):
        if saved is None:
            why = "it records no inputs (made by an older moelang)"
        else:
            changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            why = f"its inputs changed ({', '.join(changed)})"
        log.warning("training: discarding the state in %s with its staged exports, %s; training starts over",
                    state_dir, why)
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))


def publish(state_dir: str | Path, outputs: dict[str, str | Path]) -> None:
    """Put each staged export (``outputs``: name -> output path, see :func:`staged_path`) into the
    outputs, then remove the training state: in this order, a job killed at any point still has
    either the state to resume from or its outputs. Main process only.

    Files are hard-linked, not moved: a job killed halfway through publishing loses the outputs it
    published (Snakemake deletes a failed job's outputs), but the state still holds them all, and the
    run started again publishes them again. Each output appears whole (linked under a temporary name,
    then renamed). A state on another file system than the outputs is copied instead."""
    state_dir = Path(state_dir)
    with exclusive_state(state_dir):
        missing = [name for name in outputs if not staged_path(state_dir, name).exists()]
        if missing:
            raise MoelangError(f"training state {state_dir} lacks the staged export(s) {', '.join(missing)}; delete "
                               f"{state_dir} to train again")
        for name, target in outputs.items():
            source = staged_path(state_dir, name)
            if source.is_dir():
                with atomic_dir(target) as tmp:
                    for path in sorted(source.rglob("*")):
                        if path.is_file():
                            dest = tmp / path.relative_to(source)
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            _link_or_copy(path, dest)
            else:
                with atomic_path(target) as tmp:
                    _link_or_copy(source, tmp)
        shutil.rmtree(state_dir)


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, dest)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def export_model(model, tokenizer, out_dir: str | Path, extra_files: dict[str, Callable[[Path], None]] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` (safetensors) with the tokenizer. ``state_dict``: the weights to save, as
    :func:`train` passes them to its ``export_steps`` (the whole weights of an FSDP-sharded ``model``,
    or a training method's weights under the original architecture's names); ``None``: the model's."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    resumed_from: int | None
    seconds: float
    log: list[dict]  # one row per step: LOG_SCHEMA, then the loss function's other metrics
    # moelang.models.loading.count_parameters of the model as the method prepared it (what trained)
    parameters: dict = field(default_factory=dict)

    def tokens_at(self, step: int) -> int:
        """Tokens trained on up to optimizer step ``step`` (0 before the first)."""
        return int(self.log[step - 1]["tokens"]) if step > 0 else 0

    def log_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.log, schema=log_schema(self.log))


def train(model, stream: PackedStream, settings: TrainSettings, state_dir: str | Path, *,
          inputs: dict[str, str] | None = None,
          export_steps: dict[int, Callable[[torch.nn.Module, dict | None], None]] | None = None,
          stop_after: int | None = None, method: TrainingMethod | None = None,
          loss_fn: LossFn | None = None) -> TrainResult:
    """Train ``model`` for ``settings.steps`` optimizer steps.

    ``method`` (:mod:`moelang.models.methods`) says what trains: its ``prepare`` runs first, its
    ``step_context`` around each forward and backward, its ``finalize`` after the last step (the
    model is then a plain model of its architecture again). Default: what the model's
    ``requires_grad`` flags say (a loaded model: every parameter). ``loss_fn`` (see :data:`LossFn`):
    default :func:`lm_loss`, the model's language-modelling loss plus ``settings.aux_loss_coef`` x its
    load-balancing loss.

    ``export_steps`` maps an optimizer step (0 = before training) to a function called on the main
    process as ``export(model, state_dict)`` after that step (for example :func:`export_model` into
    :func:`staged_path`): ``state_dict`` is ``None``, the method's weights under the original
    architecture's names, or under FSDP the whole weights (``model``'s own parameters are then
    shards). ``stop_after`` ends the run after that many steps as if the job had been killed
    (tests; the method is not finalized). Under FSDP with several processes ``model`` stays sharded
    afterwards: export it through ``export_steps``.

    ``state_dir`` is locked for the run (:func:`exclusive_state`) and belongs to the run's inputs
    (:func:`run_fingerprint` of ``model`` as the method prepared it, the method, ``stream``'s token
    files and the caller's ``inputs``): a state made from other inputs is discarded. The state is kept at the end:
    :func:`publish` puts the staged exports into the outputs and then removes it.
    """
    die_with_launcher()
    with exclusive_state(state_dir):
        return _train(model, stream, settings, Path(state_dir), inputs, export_steps, stop_after,
                      method or TrainingMethod(), loss_fn)


def _train(model, stream: PackedStream, settings: TrainSettings, state_dir: Path, inputs: dict[str, str] | None,
           export_steps: dict[int, Callable] | None, stop_after: int | None, method: TrainingMethod,
           loss_fn: LossFn | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    state_dir.mkdir(parents=True, exist_ok=True)
    # find_unused_parameters also stops DDP from rebuilding its gradient buckets in the order the
    # gradients became ready in the first iteration (reducer.hpp: should_rebuild_buckets). A run
    # resumed from a checkpoint would use the first layout again for one step, and with more than 2
    # processes the ring all-reduce's summation order depends on an element's place in its bucket, so
    # that step, and every weight after it, would differ in the last bits from an uninterrupted run.
    # It is also what an MoE needs when an expert gets no token in a micro-batch on one process.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision="bf16" if settings.dtype == "bf16" else "no",
                              cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    # Before the fingerprint: a selection the model does not have fails here, and the trainable set
    # is the method's. Every process prepares its own copy of the model.
    method.prepare(model)
    apply_activation_checkpointing(model, settings)
    parameters = count_parameters(model)  # what trains, for the exports' run records
    # before the fingerprint (a state of a run that stepped half-precision weights is not resumed),
    # the optimizer and a checkpoint's tensors: all of them see the fp32 weights
    loaded_dtypes = fp32_master_weights(model, settings)
    if accelerator.is_main_process:  # before the model is wrapped or sharded below
        claim_state(state_dir, run_fingerprint(model, stream, (inputs or {}) | {"training method": method.describe()}))
    accelerator.wait_for_everyone()  # the others look for a checkpoint only once the state is settled
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    loss_fn = configure_loss(model, settings, loss_fn)
    world = accelerator.num_processes
    rank = accelerator.process_index
    if settings.parallelism == "fsdp":
        # Checked with one process too, so that a config that fails on the cluster fails on a laptop first.
        _check_full_training(model)
    sharded = settings.parallelism == "fsdp" and world > 1
    if sharded:
        _fully_shard(model, accelerator.device, world)
        # The optimizer is built on the shards, so its state is sharded too; accelerate is not asked
        # to prepare anything (its DDP wrapper must not see the model).
        optimizer = make_optimizer(model, settings, getattr(method, "peak_lrs", None))
        unwrapped, inner_optimizer = model, optimizer
    else:
        optimizer = make_optimizer(model, settings, getattr(method, "peak_lrs", None))
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped, inner_optimizer = accelerator.unwrap_model(model), optimizer.optimizer
    model.train()

    # Before loading a checkpoint: its param groups have initial_lr (the scheduler's), and the FSDP
    # optimizer loader fills in only the keys that the live groups already have.
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    start_step, tokens, rows, resumed = 0, 0, [], None
    checkpoint = latest_checkpoint(state_dir)
    if checkpoint is not None:
        try:
            start_step, tokens, rows = load_checkpoint(checkpoint, unwrapped, inner_optimizer, stream, settings,
                                                       sharded, processes=world)
        except MoelangError:
            raise
        except Exception as exc:  # a damaged or foreign checkpoint: the inputs' fingerprint matched
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise MoelangError(f"cannot resume from {checkpoint} ({type(exc).__name__}: {first}); delete {state_dir} "
                               f"to start over") from None
        resumed = start_step
        if start_step:  # scheduled settings as the last completed step left them (an export may follow)
            method.before_step(unwrapped, start_step - 1)
        log.info("training: resuming from %s (step %d of %d)", checkpoint, start_step, settings.steps)
    # The lr of step s is a pure function of s, so a resumed run continues the same schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings), last_epoch=start_step - 1)
    exports = dict(export_steps or {})
    export_dtype = _export_dtype(loaded_dtypes)
    if start_step == 0 and 0 in exports:
        _export(accelerator, unwrapped, exports[0], sharded, method, export_dtype)

    trainable = [p for p in model.parameters() if p.requires_grad]
    # Off a terminal the loop's own line every 5% (with the loss) is the progress report.
    bar = progress(total=settings.steps, initial=start_step, desc="train", unit=" steps",
                   disable=not accelerator.is_main_process, log_lines=False)
    log_every = max(1, settings.steps // 20)
    started = time.perf_counter()
    step = start_step
    for step in range(start_step, settings.steps):
        step_start = time.perf_counter()
        method.before_step(unwrapped, step)
        totals: dict[str, float] = {"loss": 0.0, "aux_loss": 0.0}  # the log's columns, in order
        step_tokens = 0
        for micro in range(settings.grad_accum):
            global_batch, global_langs = stream.next_batch(settings.micro_batch_size * world)
            step_tokens += global_batch.numel()
            batch = global_batch[rank::world].to(accelerator.device)
            langs = global_langs[rank::world]
            sync = micro == settings.grad_accum - 1
            if sharded:  # FSDP2: accumulate unsharded local gradients, reduce-scatter on the last micro-batch
                model.set_requires_gradient_sync(sync)
                context = contextlib.nullcontext()
            else:
                context = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with context, method.step_context(), accelerator.autocast():
                out = model(input_ids=batch, labels=batch)
                loss, metrics = loss_fn(model, batch, out, langs)
                accelerator.backward(loss / settings.grad_accum)
            metrics = {"loss": loss, "aux_loss": float("nan")} | dict(metrics)
            for name, value in metrics.items():
                value = float(value.detach()) if torch.is_tensor(value) else float(value)
                totals[name] = totals.get(name, 0.0) + value / settings.grad_accum
        if sharded:
            # The gradients are DTensor shards: the norm is a partial sum until full_tensor() reduces it.
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.clip_norm, foreach=False).full_tensor()
        else:
            grad_norm = accelerator.clip_grad_norm_(trainable, settings.clip_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens
        if world > 1:  # the logged metrics are means over every process's tokens, not the main one's share
            totals = dict(zip(totals, (float(v) for v in accelerator.reduce(
                torch.tensor(list(totals.values()), device=accelerator.device), reduction="mean"))))
        lm_total = totals["loss"]
        elapsed = time.perf_counter() - step_start
        extra = {k: v for k, v in totals.items() if k not in ("loss", "aux_loss")}
        clash = sorted(set(extra) & set(LOG_SCHEMA.names))
        if clash:
            raise MoelangError(f"training: the loss function's metrics {clash} are names of the log's own columns; "
                               f"rename them")
        rows.append({"step": step + 1, "tokens": tokens, "loss": lm_total,
                     "aux_loss": totals["aux_loss"], "lr": lr,
                     "grad_norm": float(grad_norm), "tokens_per_s": step_tokens / elapsed} | extra)
        bar.update(1)
        bar.set_postfix(loss=f"{lm_total:.3f}", tok_s=f"{rows[-1]['tokens_per_s']:.0f}")
        done = step + 1
        if accelerator.is_main_process and (done % log_every == 0 or done == settings.steps):
            rate = (done - start_step) / (time.perf_counter() - started)
            log.info("train: step %d/%d, loss %.3f, lr %.2e, %.0f tokens/s, about %.0f s left", done, settings.steps,
                     lm_total, lr, rows[-1]["tokens_per_s"], (settings.steps - done) / rate)
        if done in exports:
            _export(accelerator, unwrapped, exports[done], sharded, method, export_dtype)
        if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.steps:
            if sharded:  # every process writes its shards
                save_sharded_checkpoint(state_dir / f"step-{done}", unwrapped, inner_optimizer, done, tokens, stream,
                                        rows, settings, rank, world, accelerator.wait_for_everyone)
            elif accelerator.is_main_process:
                tensors, optim_state = gather_state(unwrapped, inner_optimizer, sharded)
                save_checkpoint(state_dir / f"step-{done}", tensors, optim_state, done, tokens, stream, rows, settings,
                                processes=world)
            if accelerator.is_main_process:
                _prune(state_dir, settings.keep_last_states)
            accelerator.wait_for_everyone()
        if stop_after is not None and done >= stop_after:
            bar.close()
            return TrainResult(done, tokens, lm_total, resumed, time.perf_counter() - started, rows, parameters)
    bar.close()
    accelerator.wait_for_everyone()
    method.finalize(unwrapped)
    if not sharded:
        _restore_dtypes(unwrapped, loaded_dtypes)
    final_loss = rows[-1]["loss"] if rows else float("nan")
    return TrainResult(settings.steps, tokens, final_loss, resumed, time.perf_counter() - started, rows, parameters)


def configure_loss(model, settings: TrainSettings, loss_fn: LossFn | None = None) -> LossFn:
    """Set ``model``'s config for ``settings``' losses (router logits only when a load-balancing or
    z-loss needs them; the balancing weight the model adds itself) and return ``loss_fn``, or the
    default :func:`lm_loss` for ``settings``. Every training loop calls it on the model it trains."""
    config = getattr(model, "config", None)
    uses_aux = settings.aux_loss_coef > 0 and hasattr(config, "router_aux_loss_coef")
    uses_z = settings.z_loss_coef > 0
    if uses_z and not hasattr(config, "output_router_logits"):
        raise MoelangError(f"training option z_loss_coef: {type(model).__name__} has no router logits to regularise; "
                           f"set z_loss_coef: 0")
    # a loss function may need outputs the model gives only when asked (LayerMoE's stage 2: router
    # and classifier logits without a balancing loss); it names those config flags
    flags = set(getattr(loss_fn, "config_flags", ()))
    if config is not None and hasattr(config, "output_router_logits"):
        config.output_router_logits = uses_aux or uses_z or "output_router_logits" in flags
        if config.output_router_logits:  # the model adds its weighted balancing loss itself: 0 when off
            coef = settings.aux_loss_coef if uses_aux else 0.0
            config.router_aux_loss_coef = coef
            # transformers' MoE heads copy the weight from the config when they are built and read only
            # their copy: without this, a family whose default differs (qwen3_moe, mixtral: 0.001)
            # trains with its default while the log subtracts ours from the loss
            if hasattr(model, "router_aux_loss_coef"):
                model.router_aux_loss_coef = coef
    for flag in flags - {"output_router_logits"}:
        if not hasattr(config, flag):
            raise MoelangError(f"the training loss needs {flag}, which {type(model).__name__} does not give")
        setattr(config, flag, True)
    return loss_fn or lm_loss(settings.aux_loss_coef, uses_aux, settings.z_loss_coef)


def apply_activation_checkpointing(model, settings: TrainSettings) -> None:
    """With ``settings.activation_checkpointing``, every decoder layer keeps only its input for the
    backward pass and is recomputed there (transformers' gradient checkpointing, non-reentrant: the
    recomputation restores the random-number state and autocast, and FSDP's hooks stay outside it)."""
    if not settings.activation_checkpointing:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MoelangError(f"training option activation_checkpointing: {type(model).__name__} does not support "
                           f"gradient checkpointing; set activation_checkpointing: false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _check_full_training(model) -> None:
    # A trained subset always leaves frozen tensors: the fused tensors a parametrization or a split
    # reads from, the layers not chosen.
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise MoelangError(f"training: parallelism 'fsdp' is for full training, but this run trains a subset "
                           f"({len(frozen)} frozen parameter tensors); set parallelism: ddp for partial training")


def _fully_shard(model, device: torch.device, world: int) -> None:
    """FSDP2: one unit per decoder layer (its weights are gathered only while it runs), then the root
    for the rest (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    # transformers names its repeated blocks in _no_split_modules (OlmoeDecoderLayer, ...)
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types and m is not model]
    if not blocks:
        log.warning("training: %s names no decoder layer class (_no_split_modules); FSDP shards it as one unit, so "
                    "each process gathers the whole model in every forward", type(model).__name__)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def fp32_master_weights(model: torch.nn.Module, settings: TrainSettings) -> dict[str, torch.dtype]:
    """Make the optimizer step fp32 weights: with bf16 autocast every trainable half-precision
    parameter becomes fp32 (the frozen ones stay as loaded, autocast computes in bf16 either way);
    with fp32 training every half-precision parameter does (fp32 compute was asked for). Returns the
    dtypes they had, by parameter name (empty: nothing changed)."""
    half = (torch.bfloat16, torch.float16)
    changed = {}
    for name, param in model.named_parameters():
        if param.dtype in half and (param.requires_grad or settings.dtype == "fp32"):
            changed[name] = param.dtype
            param.data = param.data.float()
    if changed:
        log.info("training: %d %s tensors train in fp32 (master weights; exports are written in %s)", len(changed),
                 next(iter(changed.values())), next(iter(changed.values())))
    return changed


def _export_dtype(loaded_dtypes: dict[str, torch.dtype]) -> torch.dtype | None:
    return next(iter(loaded_dtypes.values())) if loaded_dtypes else None


def _restore_dtypes(model: torch.nn.Module, loaded_dtypes: dict[str, torch.dtype]) -> None:
    """After training: the parameters made fp32 by :func:`fp32_master_weights` back in their dtype."""
    for name, param in model.named_parameters():
        if name in loaded_dtypes:
            param.data = param.data.to(loaded_dtypes[name])


def _export(accelerator, model, export: Callable, sharded: bool, method: TrainingMethod,
            dtype: torch.dtype | None = None) -> None:
    """Exports are written once, by the main process, while the others wait. Under FSDP every
    process first takes part in gathering the whole weights (FSDP trains every parameter: the method
    has nothing to fold); otherwise the method gives the weights under the architecture's names.
    ``dtype``: the dtype the model was loaded in, when its trainable tensors train in fp32: floating
    tensors are written in it (the export is the model as loaded, trained)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if sharded:
        full = get_model_state_dict(model, options=_state_options(True))
    else:
        full = method.export_state(model) if accelerator.is_main_process else None
    if dtype is not None and accelerator.is_main_process:
        full = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                for name, tensor in (full if full is not None else model.state_dict()).items()}
    if accelerator.is_main_process:
        with _inference_outputs(model):
            export(model, full)
    accelerator.wait_for_everyone()


# Config flags that :func:`configure_loss` turns on for training only: an exported model must not
# carry them (every later forward would compute a balancing loss and record router logits).
TRAINING_OUTPUT_FLAGS = ("output_router_logits", "output_classifier_logits")


@contextlib.contextmanager
def _inference_outputs(model):
    config = getattr(model, "config", None)
    saved = {flag: getattr(config, flag) for flag in TRAINING_OUTPUT_FLAGS if hasattr(config, flag)}
    for flag in saved:
        setattr(config, flag, False)
    try:
        yield
    finally:
        for flag, value in saved.items():
            setattr(config, flag, value)


def _prune(state_dir: Path, keep_last: int = 1) -> None:
    """Keep the ``keep_last`` newest complete checkpoints (``keep_last_states``); remove the older ones
    and what a killed checkpoint write left (``.step-N.partial``, incomplete ``step-N``)."""
    complete = sorted((int(p.name.split("-", 1)[1]), p) for p in state_dir.glob("step-*")
                      if p.name.split("-", 1)[1].isdigit() and (p / "state.json").is_file())
    kept = {p for _, p in complete[-keep_last:]}
    for path in [*state_dir.glob("step-*"), *state_dir.glob(".step-*.partial")]:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)

"""One pass of the frozen layers for a whole learning-rate sweep (issue 13, "beyond the authors").

Every run of a sweep whose trainable parameters all lie in the final layers sees the same batches
through the same frozen layers below them. :func:`train_sweep` trains such runs together, in one
process: per micro-batch it runs the embeddings and the decoder layers below the *boundary* (the
lowest decoder layer any run trains) once, under ``torch.no_grad()``, and feeds the hidden states
entering the boundary layer to every run's own copy of the layers from the boundary up, each with its
own optimizer, schedule and learning rate.

**Each run ends as it would have alone** (:func:`moelang.train.train` with the same model, stream,
settings, method and state directory): the same batches in the same order (the stream is drawn once
per micro-batch, as a lone run draws it), the same seeding, loss (:func:`moelang.train.configure_loss`,
the one ``train()`` uses), loss scaling over the accumulated micro-batches, clipping, AdamW
(:func:`moelang.train.make_optimizer`), :func:`moelang.train.lr_factor` schedule, log rows, exports
and :class:`moelang.train.TrainResult`. Each run keeps its own random-number state (torch, CUDA,
Python), swapped in around its own forward and backward, so a method or model that draws random
numbers above the boundary draws what it would alone; frozen layers that draw random numbers in
training (dropout) cannot be shared, and the pass stops with one line the first time they do. On CPU
the weights are bit-identical to separate runs (``tests/test_sweep.py``).

How a run skips its bottom layers: the run's model is the start model's own forward (embeddings,
rotary position embeddings, attention masks, DeepSeek-V3's dense first layers and grouped routing,
GPT-OSS's per-layer attention types: whatever the family does), with its decoder layers below the
boundary replaced, during the run's forward only, by stand-ins: the first returns the shared hidden
states, the others pass them on. What transformers records below the boundary during a forward
(router logits for the load-balancing loss and the z-loss, hidden states, attentions) is recorded
once in the shared pass and replayed into each run's output at the stand-ins' place, so the losses
see every layer's router, as a lone run's do (the bottom's logits carry no gradient there either:
its weights are frozen).

**What is shared and what is copied.** ``model`` (the start model) is not modified: its weights,
``requires_grad`` flags and train/eval modes are as they were afterwards. Every run gets its own
copy of the module tree whose tensors are the start model's, the method prepares that copy, and then
every tensor of the decoder layers from the boundary up becomes the run's own (a copy: training,
exports and ``finalize`` write only there). Below the boundary, the embeddings, the final norm and the
LM head stay shared (frozen, never written). A run may train only tensors of decoder layers: a method
that trains the embeddings, the final norm, the head or every parameter (``full-ft``) is refused in
one line (train it alone with :func:`moelang.train.train`).

**Memory**: the start model once; per run a copy of the decoder layers from the boundary up, its
trainable tensors' gradients and AdamW state (two fp32 tensors per trainable tensor), and the
activations of its own top-layer forward, kept for its backward until the next run's forward
starts; per micro-batch the hidden states entering the boundary (and the bottom's router logits
when a balancing loss or z-loss needs them). The bottom's activations are never kept for backward:
no autograd runs below the boundary. With OLMoE-1B-7B (16 layers) and the paper's final 2 layers, a
run costs about 2/16 of the decoder's weights plus its optimizer state, against a whole model per
separate job.

**Resume**: each run's state directory is locked, fingerprinted and checkpointed exactly as
:func:`moelang.train.train` does it (:func:`moelang.train.exclusive_state`,
:func:`moelang.train.claim_state` with :func:`moelang.train.run_fingerprint`,
:func:`moelang.train.save_checkpoint` every ``checkpoint_every`` steps, the same files), so a
state written by ``train()`` resumes in a sweep and vice versa. Runs may resume from different
steps (a state discarded because its inputs changed starts over): the sweep starts at the earliest
step and each run joins at its own, where the stream must be at the position its checkpoint
recorded. Unlike ``train()``, the sweep also checkpoints the last step (when ``checkpoint_every``
> 0): a sweep killed after training (while its caller exports or publishes) and started again does
not train the runs that had finished; their results come from their checkpoints.

**Limits**: one process on one device (a sweep under torchrun with several processes is refused:
the runs share one pass, not a data-parallel group); ``parallelism: fsdp`` is for full training and
refused as ``train()`` refuses it for a subset; ``steps``, ``seq_len``, ``micro_batch_size``,
``grad_accum``, ``seed``, ``mixture`` and ``dtype`` must be equal across the runs (they share the
batches and the pass); everything else (``lr``, the schedule, weight decay, clipping, betas, the
balancing and z-loss weights, ``checkpoint_every``) is each run's own.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moelang.errors import MoelangError
from moelang.io import log, progress
from moelang.models.adapters import ModelAdapter
from moelang.models.loading import count_parameters
from moelang.models.methods import TrainingMethod
from moelang.options import TrainSettings
from moelang.train import (
    LOG_SCHEMA,
    LossFn,
    PackedStream,
    TrainResult,
    _check_full_training,
    _export,
    _prune,
    apply_activation_checkpointing,
    claim_state,
    configure_loss,
    die_with_launcher,
    exclusive_state,
    gather_state,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    make_optimizer,
    run_fingerprint,
    save_checkpoint,
)

# Settings every run of a sweep must share: the batches (steps, their size and order, the mixture) and
# the shared pass (dtype: its autocast) are the same for all.
SHARED_SETTINGS = ("steps", "seq_len", "micro_batch_size", "grad_accum", "seed", "mixture", "dtype")


@dataclass
class SweepRun:
    """One run of a sweep: what :func:`moelang.train.train` would get for it alone."""

    settings: TrainSettings
    """The run's own lr, schedule, optimizer and loss weights; :data:`SHARED_SETTINGS` must be equal
    across the runs of one sweep (they share the batches)."""
    method: TrainingMethod
    """What trains (:mod:`moelang.models.methods`, :mod:`moelang.models.lora`); prepared on the run's
    own copy of the model. Use one method object per run."""
    state_dir: Path
    """The run's own training state (checkpoints, fingerprint, staged exports; locked while the sweep runs)."""
    export_steps: dict[int, Callable] | None = None
    """As :func:`moelang.train.train`'s: step -> ``export(model, state_dict)``, ``model`` the run's copy."""
    inputs: dict[str, str] | None = None
    """As :func:`moelang.train.train`'s: the caller's part of the state's fingerprint."""


def train_sweep(model, stream: PackedStream, runs: list[SweepRun], *, loss_fn: LossFn | None = None,
                stop_after: int | None = None) -> list[TrainResult]:
    """Train ``runs`` from the start model ``model`` on ``stream``'s batches, sharing one pass of the
    frozen layers below the lowest trained layer (see the module docstring). Returns each run's
    :class:`moelang.train.TrainResult`, in the order of ``runs``.

    ``loss_fn``: as :func:`moelang.train.train`'s, for every run (default: each run's
    :func:`moelang.train.lm_loss` from its own settings). ``stop_after`` ends the sweep after that
    many steps as if the job had been killed (tests; no method is finalized). After the last step each
    run's method is finalized on its copy; the trained weights reach the caller through
    ``export_steps`` (as a model's do under ``train()``)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise MoelangError(f"sweep: {world} processes (WORLD_SIZE={world}); the runs of a sweep share one pass of the "
                           f"frozen layers in one process on one device: start it without torchrun (or with "
                           f"--nproc-per-node 1), or train the runs apart with moelang.train.train")
    if not runs:
        raise MoelangError("sweep: no run given; pass at least one SweepRun")
    _check_shared_settings(runs)
    dirs = [Path(run.state_dir).resolve() for run in runs]
    repeated = sorted({str(d) for d in dirs if dirs.count(d) > 1})
    if repeated:
        raise MoelangError(f"sweep: runs share the state directory {repeated[0]}; give each run its own state_dir")
    if len({id(run.method) for run in runs}) < len(runs):
        raise MoelangError("sweep: runs share one training method object; give each run its own (a method is "
                           "prepared on its run's model and keeps it)")
    die_with_launcher()
    with contextlib.ExitStack() as locks:
        for state_dir in dirs:
            locks.enter_context(exclusive_state(state_dir))
        return _Sweep(model, stream, runs, loss_fn).train(stop_after)


def _check_shared_settings(runs: list[SweepRun]) -> None:
    first = asdict(runs[0].settings)
    for key in SHARED_SETTINGS:
        values = [asdict(run.settings)[key] for run in runs]
        if any(v != first[key] for v in values):
            raise MoelangError(f"sweep: the runs' training option {key} differs ({values}); the runs of a sweep share "
                               f"their batches and one pass of the frozen layers, so {', '.join(SHARED_SETTINGS)} must "
                               f"be equal: give them one value, or train the runs apart")
    for run in runs:
        if run.settings.parallelism == "fsdp":
            raise MoelangError("training: parallelism 'fsdp' is for full training, but a sweep trains subsets of the "
                               "final layers in one process; set parallelism: ddp for partial training")


# --------------------------------------------------------------------------------------------------
# The shared pass and the stand-ins for the layers below the boundary
# --------------------------------------------------------------------------------------------------

def _collector() -> dict | None:
    """What transformers records during the current forward (``capture_outputs``: router logits,
    hidden states, attentions, by name), or None outside one."""
    from transformers.utils.output_capturing import _active_collector

    return _active_collector.get()


class _Reached(Exception):
    """Raised by the shared pass at the boundary layer: the forward below it is all it needs."""

    def __init__(self, hidden: torch.Tensor, recorded: dict[str, list]):
        super().__init__("frozen pass reached the boundary")
        self.hidden, self.recorded = hidden, recorded


@dataclass
class _Frozen:
    """The shared pass's result for the current micro-batch."""

    hidden: torch.Tensor | None = None  # the hidden states entering the boundary layer
    recorded: dict[str, list] = field(default_factory=dict)  # what transformers recorded below it


class _Below(nn.Module):
    """Stands in for a decoder layer below the boundary in a run's forward: the first returns the
    shared pass's hidden states (and replays what transformers recorded below the boundary into the
    run's own record), the others pass them on. No weights."""

    def __init__(self, frozen: _Frozen, first: bool, like: nn.Module):
        super().__init__()
        self.frozen, self.first = frozen, first
        for attr in ("attention_type", "layer_idx"):  # what a family's decoder loop may read off a layer
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states, *args, **kwargs):
        if not self.first:
            return hidden_states
        frozen = self.frozen
        if frozen.hidden is None or frozen.hidden.shape != hidden_states.shape:
            raise RuntimeError("sweep: a run's forward does not match the shared pass's batch")
        collected = _collector()
        if collected:
            for key, items in frozen.recorded.items():
                if key in collected:
                    collected[key].extend(items)
        return frozen.hidden


@contextlib.contextmanager
def _layers_below(layers: nn.ModuleList, stand_ins: list[nn.Module]):
    """Replace ``layers[:len(stand_ins)]`` with ``stand_ins`` while the block runs."""
    real = [layers[i] for i in range(len(stand_ins))]
    for i, stand_in in enumerate(stand_ins):
        layers[i] = stand_in
    try:
        yield
    finally:
        for i, module in enumerate(real):
            layers[i] = module


def _decoder_layers(model) -> nn.ModuleList:
    return ModelAdapter._decoder_layers(model)


# --------------------------------------------------------------------------------------------------
# Random-number states: one per run
# --------------------------------------------------------------------------------------------------

def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, python = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)


def _same_torch_rng(a: tuple, b: tuple) -> bool:
    if not torch.equal(a[0], b[0]):
        return False
    return a[1] is None or all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@contextlib.contextmanager
def _rng_of(run: "_Run"):
    """The run's random-number state is the process's while the block runs."""
    _set_rng_state(run.rng)
    try:
        yield
    finally:
        run.rng = _rng_state()


# --------------------------------------------------------------------------------------------------
# Copies that share the start model's tensors
# --------------------------------------------------------------------------------------------------

def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree (config included) whose parameters and buffers are the start
    model's own tensor objects: no weight is copied."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _own(model: nn.Module, tensors: list[torch.Tensor], requires_grad: bool) -> None:
    """Give ``model`` its own copy of each of ``tensors`` (shared with the start model), wherever in
    its module tree it is registered (ties inside the copy stay tied). Every module of the copy is its
    own object, so the start model's registrations are untouched."""
    clones: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if id(tensor) in clones:
            continue
        data = tensor.detach().clone()
        clones[id(tensor)] = nn.Parameter(data, requires_grad=requires_grad) \
            if isinstance(tensor, nn.Parameter) else data
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and id(tensor) in clones:
                    store[name] = clones[id(tensor)]


def _tensors_of(modules: list[nn.Module]) -> list[torch.Tensor]:
    seen, out = set(), []
    for top in modules:
        for module in top.modules():
            for store in (module._parameters, module._buffers):
                for tensor in store.values():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        out.append(tensor)
    return out


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    spec: SweepRun
    label: str
    model: nn.Module  # the run's copy, as accelerate prepared it
    layers: Any = None  # its decoder layers (nn.ModuleList; stand-ins replace the bottom ones in its forward)
    lowest: int | None = None  # the lowest decoder layer it trains
    unwrapped: Any = None
    optimizer: Any = None
    inner_optimizer: Any = None
    scheduler: Any = None
    loss_fn: LossFn | None = None
    trainable: list = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    stand_ins: list = field(default_factory=list)
    start_step: int = 0
    tokens: int = 0
    rows: list = field(default_factory=list)
    resumed: int | None = None
    stream_state: dict | None = None  # the stream's position at start_step
    rng: Any = None  # its random-number state (torch, CUDA, Python) between its forwards
    totals: dict = field(default_factory=dict)

    @property
    def settings(self) -> TrainSettings:
        return self.spec.settings


def best_and_worst(losses: list[tuple[str, float]]) -> str:
    """``best LABEL LOSS, worst LABEL LOSS`` of (run label, loss) pairs (a non-finite loss is the worst;
    ties go to the first run); one run: ``LABEL LOSS``."""
    def key(item):
        return item[1] if math.isfinite(item[1]) else math.inf

    if len(losses) == 1:
        return f"{losses[0][0]} {losses[0][1]:.3f}"
    best = min(losses, key=key)
    worst = max(losses, key=key)  # max and min keep the first of equal ones
    return f"best {best[0]} {best[1]:.3f}, worst {worst[0]} {worst[1]:.3f}"


def progress_line(done: int, steps: int, losses: list[tuple[str, float]], tokens_per_s: float,
                  seconds_left: float) -> str:
    """The sweep's progress log line: the step, the best and worst run with their losses, the rate
    (tokens/s of each run) and the time left; one line of bounded length whatever the number of runs
    (each run's numbers are in its ``train_log.parquet``)."""
    return (f"sweep: step {done}/{steps}, {len(losses)} runs, {best_and_worst(losses)}, "
            f"{tokens_per_s:,.0f} tokens/s each, about {seconds_left:.0f} s left")


class _Sweep:
    def __init__(self, model, stream: PackedStream, specs: list[SweepRun], loss_fn: LossFn | None):
        self.model, self.stream, self.specs, self.loss_fn = model, stream, specs, loss_fn
        self.settings = specs[0].settings  # the shared ones (SHARED_SETTINGS)
        names = [Path(spec.state_dir).name for spec in specs]
        # the adaptation's state dirs are {method}/lr-{lr}: name the method too when the rates repeat
        longer = [f"{Path(spec.state_dir).parent.name}/{n}" for spec, n in zip(specs, names)]
        self.labels = [n if names.count(n) == 1 else long if longer.count(long) == 1 else f"{i}:{n}"
                       for i, (n, long) in enumerate(zip(names, longer))]

    def train(self, stop_after: int | None) -> list[TrainResult]:
        model = self.model
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for m in model.modules()]
        try:
            return self._train(stop_after)
        finally:  # the start model as the caller gave it
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for module, mode in modes:
                module.training = mode

    # ----------------------------------------------------------------------------------------------
    def _prepare_runs(self, params: list[nn.Parameter], flags: list[bool]) -> tuple[list[_Run], int]:
        """Copy and prepare every run; find the boundary; give each run its own layers from there up."""
        model = self.model
        layers = _decoder_layers(model)
        shared = {id(t) for t in [*model.parameters(), *model.buffers()]}
        runs = []
        for spec, label in zip(self.specs, self.labels):
            for p, flag in zip(params, flags):  # each method prepares a copy of the model as given
                p.requires_grad_(flag)
            copy_ = _shared_copy(model)
            spec.method.prepare(copy_)
            run = _Run(spec, label, copy_, layers=_decoder_layers(copy_))
            owner = {}
            for index, layer in enumerate(run.layers):
                for p in layer.parameters():
                    owner.setdefault(id(p), index)
            trainable = [(name, p) for name, p in copy_.named_parameters() if p.requires_grad]
            outside = [name for name, p in trainable if id(p) not in owner]
            if outside:
                more = f" and {len(outside) - 2} more" if len(outside) > 2 else ""
                raise MoelangError(f"sweep: run {label} ({spec.method.describe()}) trains {', '.join(outside[:2])}{more}, "
                                   f"outside the decoder layers; a sweep shares everything below the trained layers "
                                   f"(embeddings included), so it cannot share a pass for this method (e.g. full-ft): "
                                   f"train it alone with moelang.train.train")
            run.lowest = min((owner[id(p)] for _, p in trainable), default=None)
            # Trainable tensors of the start model become the run's own now: the next run's prepare
            # (requires_grad_(False) on its copy) would switch them off.
            _own(copy_, [p for _, p in trainable if id(p) in shared], requires_grad=True)
            runs.append(run)
        lowest = [run.lowest for run in runs if run.lowest is not None]
        boundary = min(lowest) if lowest else len(layers)
        for p in params:  # frozen in every run (a run's trainable tensors are its own by now)
            p.requires_grad_(False)
        for run in runs:
            top = [run.layers[i] for i in range(boundary, len(run.layers))]
            _own(run.model, [t for t in _tensors_of(top) if id(t) in shared], requires_grad=False)
        return runs, boundary

    def _train(self, stop_after: int | None) -> list[TrainResult]:
        from accelerate import Accelerator

        settings, stream, model = self.settings, self.stream, self.model
        accelerator = Accelerator(mixed_precision="bf16" if settings.dtype == "bf16" else "no",
                                  cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        model.to(accelerator.device)  # where the runs compute: their copies hold these tensors
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        runs, boundary = self._prepare_runs(params, flags)
        n_layers = len(_decoder_layers(model))
        initial_stream = stream.state_dict()
        for run in runs:
            stream.load_state_dict(initial_stream)  # a run without a checkpoint starts where the stream starts
            self._set_up(run)
        self._log_plan(runs, boundary, n_layers)

        # The shared pass: the start model's own forward in training mode, stopped at the boundary.
        self.frozen = _Frozen()
        self.boundary = boundary
        model.train()
        for run in runs:
            run.stand_ins = [_Below(self.frozen, i == 0, run.layers[i]) for i in range(boundary)]
        config = getattr(model, "config", None)
        # router logits below the boundary when any run's losses need them (each run's config says so)
        self.pass_kwargs = {}
        if config is not None and hasattr(config, "output_router_logits"):
            self.pass_kwargs["output_router_logits"] = any(
                bool(getattr(run.unwrapped.config, "output_router_logits", False)) for run in runs)

        start = min(run.start_step for run in runs)
        earliest = next(run for run in runs if run.start_step == start)
        stream.load_state_dict(initial_stream if start == 0 else earliest.stream_state)
        started = time.perf_counter()
        steps = settings.steps
        bar = progress(total=steps, initial=start, desc=f"sweep of {len(runs)} runs", unit=" steps", log_lines=False)
        log_every = max(1, steps // 20)
        handle = _decoder_layers(model)[boundary].register_forward_pre_hook(self._stop, with_kwargs=True) \
            if 0 < boundary < n_layers else None
        try:
            for step in range(start, steps):
                active = [run for run in runs if run.start_step <= step]
                for run in active:
                    if run.start_step == step and step > start and stream.state_dict() != run.stream_state:
                        raise MoelangError(f"sweep: the checkpoint of {run.spec.state_dir} at step {step} was made at "
                                           f"another position of the training data than this sweep's; delete "
                                           f"{run.spec.state_dir} to start that run over")
                step_start = time.perf_counter()
                step_tokens = self._step(active)
                elapsed = time.perf_counter() - step_start
                done = step + 1
                for run in active:
                    self._optimizer_step(run, step, step_tokens, elapsed)
                bar.update(1)
                losses = [(run.label, run.rows[-1]["loss"]) for run in active]
                bar.set_postfix({"loss": best_and_worst(losses)})
                if done % log_every == 0 or done == steps:
                    rate = (done - start) / (time.perf_counter() - started)
                    log.info("%s", progress_line(done, steps, losses, step_tokens / elapsed, (steps - done) / rate))
                for run in active:
                    self._after_step(run, done)
                if stop_after is not None and done >= stop_after:
                    bar.close()
                    seconds = time.perf_counter() - started
                    return [TrainResult(done if run.start_step <= done else run.start_step, run.tokens,
                                        run.rows[-1]["loss"] if run.rows else float("nan"), run.resumed, seconds,
                                        run.rows, run.parameters) for run in runs]
        finally:
            if handle is not None:
                handle.remove()
        bar.close()
        seconds = time.perf_counter() - started
        results = []
        for run in runs:
            run.spec.method.finalize(run.unwrapped)
            final_loss = run.rows[-1]["loss"] if run.rows else float("nan")
            results.append(TrainResult(steps, run.tokens, final_loss, run.resumed, seconds, run.rows, run.parameters))
        return results

    # ----------------------------------------------------------------------------------------------
    def _set_up(self, run: _Run) -> None:
        """What :func:`moelang.train.train` does before its loop, for one run, in the same order."""
        accelerator, settings, stream = self.accelerator, run.settings, self.stream
        state_dir = Path(run.spec.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        method, model = run.spec.method, run.model
        run.parameters = count_parameters(model)
        claim_state(state_dir, run_fingerprint(model, stream, (run.spec.inputs or {}) | {"training method": method.describe()}))
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        run.loss_fn = configure_loss(model, settings, self.loss_fn)
        apply_activation_checkpointing(model, settings)
        optimizer = make_optimizer(model, settings)
        run.model, run.optimizer = accelerator.prepare(model, optimizer)
        run.unwrapped, run.inner_optimizer = accelerator.unwrap_model(run.model), run.optimizer.optimizer
        run.model.train()
        for group in run.optimizer.param_groups:
            group.setdefault("initial_lr", settings.lr)
        checkpoint = latest_checkpoint(state_dir)
        if checkpoint is not None:
            try:
                run.start_step, run.tokens, run.rows = load_checkpoint(checkpoint, run.unwrapped, run.inner_optimizer,
                                                                       stream, settings, False, processes=1)
            except MoelangError:
                raise
            except Exception as exc:  # a damaged or foreign checkpoint: the inputs' fingerprint matched
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise MoelangError(f"cannot resume from {checkpoint} ({type(exc).__name__}: {first}); delete "
                                   f"{state_dir} to start over") from None
            run.resumed = run.start_step
            log.info("training: resuming from %s (step %d of %d)", checkpoint, run.start_step, settings.steps)
        run.stream_state = stream.state_dict()
        run.rng = _rng_state()
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s, st=settings: lr_factor(s, st),
                                                          last_epoch=run.start_step - 1)
        run.exports = dict(run.spec.export_steps or {})
        if run.start_step == 0 and 0 in run.exports:
            _export(accelerator, run.unwrapped, run.exports[0], False, method)
        run.trainable = [p for p in run.model.parameters() if p.requires_grad]

    def _log_plan(self, runs: list[_Run], boundary: int, n_layers: int) -> None:
        finished = [run.label for run in runs if run.start_step >= run.settings.steps]
        if boundary == 0:
            log.warning("sweep: a run trains decoder layer 0, so the %d runs share no layer, only the batches; each "
                        "runs the whole model", len(runs))
        else:
            log.info("sweep: %d runs share one pass of the embeddings and decoder layers 0-%d (of %d); each trains "
                     "its own copy of layers %d-%d (%s trainable parameters)", len(runs), boundary - 1, n_layers,
                     boundary, n_layers - 1, ", ".join(f"{run.label} {run.parameters.get('trainable', 0)}" for run in runs))
        if finished:
            log.info("sweep: %s finished before (their states hold the last step); not trained again",
                     ", ".join(finished))

    # ----------------------------------------------------------------------------------------------
    def _stop(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        collected = _collector() or {}
        # "_"-keys are the collector's own bookkeeping (which hidden states to keep), not records
        raise _Reached(hidden, {key: list(items) for key, items in collected.items() if not key.startswith("_")})

    def _frozen_pass(self, batch: torch.Tensor) -> None:
        """Run the embeddings and the layers below the boundary once for ``batch``, without autograd."""
        if self.boundary == 0:
            return
        before = _rng_state()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                self.model(input_ids=batch, **self.pass_kwargs)
        except _Reached as reached:
            self.frozen.hidden, self.frozen.recorded = reached.hidden, reached.recorded
        else:
            raise RuntimeError(f"sweep: the shared pass never reached decoder layer {self.boundary}")
        if not _same_torch_rng(before, _rng_state()):
            raise MoelangError(f"sweep: the frozen layers below decoder layer {self.boundary} draw random numbers in "
                               f"training (dropout?), which each run would draw on its own; set the model's dropout "
                               f"to 0, or train the runs apart with moelang.train.train")

    def _step(self, active: list[_Run]) -> int:
        """One optimizer step's micro-batches: the shared pass, then each run's forward and backward."""
        settings, accelerator = self.settings, self.accelerator
        for run in active:
            run.totals = {"loss": 0.0, "aux_loss": 0.0}  # the log's columns, in order
        step_tokens = 0
        for _ in range(settings.grad_accum):
            batch, langs = self.stream.next_batch(settings.micro_batch_size)
            step_tokens += batch.numel()
            batch = batch.to(accelerator.device)
            self._frozen_pass(batch)
            for run in active:
                with _rng_of(run), _layers_below(run.layers, run.stand_ins), run.spec.method.step_context(), \
                        accelerator.autocast():
                    out = run.model(input_ids=batch, labels=batch)
                    loss, metrics = run.loss_fn(run.model, batch, out, langs)
                    accelerator.backward(loss / settings.grad_accum)
                metrics = {"loss": loss, "aux_loss": float("nan")} | dict(metrics)
                for name, value in metrics.items():
                    value = float(value.detach()) if torch.is_tensor(value) else float(value)
                    run.totals[name] = run.totals.get(name, 0.0) + value / settings.grad_accum
                del out, loss, metrics  # this run's graph and logits, before the next run's forward
            self.frozen.hidden, self.frozen.recorded = None, {}
        return step_tokens

    def _optimizer_step(self, run: _Run, step: int, step_tokens: int, elapsed: float) -> None:
        grad_norm = self.accelerator.clip_grad_norm_(run.trainable, run.settings.clip_norm)
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.tokens += step_tokens
        totals = run.totals
        extra = {k: v for k, v in totals.items() if k not in ("loss", "aux_loss")}
        clash = sorted(set(extra) & set(LOG_SCHEMA.names))
        if clash:
            raise MoelangError(f"training: the loss function's metrics {clash} are names of the log's own columns; "
                               f"rename them")
        # tokens_per_s: the step's tokens over the time of the whole sweep step (every run's share of it)
        run.rows.append({"step": step + 1, "tokens": run.tokens, "loss": totals["loss"], "aux_loss": totals["aux_loss"],
                         "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": step_tokens / elapsed} | extra)

    def _after_step(self, run: _Run, done: int) -> None:
        """Exports and checkpoints after optimizer step ``done``, as :func:`moelang.train.train` makes them
        (and a checkpoint of the last step too, so that a finished run is not trained again)."""
        settings = run.settings
        if done in run.exports:
            _export(self.accelerator, run.unwrapped, run.exports[done], False, run.spec.method)
        if settings.checkpoint_every and (done % settings.checkpoint_every == 0 or done == settings.steps):
            state_dir = Path(run.spec.state_dir)
            tensors, optim_state = gather_state(run.unwrapped, run.inner_optimizer, False)
            saved = _rng_state()
            _set_rng_state(run.rng)  # the checkpoint records the run's own random-number state
            try:
                save_checkpoint(state_dir / f"step-{done}", tensors, optim_state, done, run.tokens, self.stream,
                                run.rows, settings, processes=1)
            finally:
                _set_rng_state(saved)
            _prune(state_dir, settings.keep_last_states)

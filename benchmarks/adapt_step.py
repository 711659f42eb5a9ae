"""Adaptation step: SSFT, AEFT, LoRA and Full-FT training steps on an OLMoE-family model with the
paper's depth ratio, the FLOP limit of SSFT's speed-up, and a learning-rate sweep that shares the frozen pass.

    .venv/bin/python benchmarks/adapt_step.py [--quick] [--out DIR]

**Model.** ``transformers.OlmoeConfig`` with the paper's shape where it sets the ratio that matters
(``allenai/OLMoE-1B-7B-0924``: 16 MoE layers, 64 experts, top-8, the final 2 adapted, expert width
half the hidden size) and everything else small enough for a 2-core CPU: hidden 128, expert
intermediate 64, 4 heads, vocab 4,000 (see ``ARCHITECTURE``), randomly initialised with
``moelang.models.init_model`` (one seed for every variant), fp32, the default ``grouped_mm``
experts kernel. Data: a synthetic token Parquet file (``moelang.tokenize.TOKENS_SCHEMA``, random ids),
packed by ``moelang.train.PackedStream``; 8 x 128 tokens per optimizer step.

**Variants**, each in its own process (the script re-invokes itself with ``--variant``), one after the
other, through the project's engine ``moelang.train.train`` with the adaptation settings (AdamW
0.9/0.95, weight decay 0.1, clip 1.0, cosine, no load-balancing loss):

* ``full`` (Full-FT): ``moelang.models.methods.FullTraining``, every parameter;
* ``ssft``: ``ExpertSubset`` with 11 experts (a seeded draw) in each of the final 2 MoE layers, split
  out of the fused tensors, plus those layers' routers, ``mask_router=True`` (the paper's SSFT trains
  about 11 experts per layer: the parent's specific ones plus 5 shared);
* ``aeft``: ``ExpertSubset`` with all 64 experts of the final 2 layers plus their routers (the fused
  tensors themselves train; the router mask would mask nothing, so it is off);
* ``lora``: ``moelang.models.lora.LoRATraining``, rank 8 on the fused expert tensors and the routers
  of the final 2 layers.

Throughput is the median of the engine's own per-step ``tokens_per_s`` (its log) after the warm-up
steps (the first steps allocate the optimizer state). **Peak memory** is CPU RSS: the child process's
``ru_maxrss`` at the end minus its ``ru_maxrss`` just before the model is built (after every import,
peft included in every variant), i.e. what the model, its gradients, the optimizer state, the
activations kept for backward and the data added to the process; the whole-process figure is
reported too. torch has no allocation counters for CPU memory; on a GPU ``torch.cuda.max_memory_allocated``
is recorded as well.

**FLOP limit.** :func:`matmul_flops_per_token` counts the multiply-adds (2 FLOPs each) of every matrix
product of a training step per token, from the config alone:

* per layer, forward: attention projections ``2 H d (2 n_heads + 2 n_kv)`` (d = H / n_heads),
  attention scores and weighted values ``4 n_heads d c`` with c the keys a query sees (causal:
  (S + 1) / 2 on average over a sequence of S; ``attention="full"``: S, what an eager kernel
  computes), router ``2 H E``, experts ``top_k x 3 x 2 H I`` (gate, up, down); the LM head ``2 H V``;
* backward of a product: 1x its forward for the gradient of its input and 1x for the gradient of its
  weight, each only where needed. **Full-FT**: both everywhere (the embeddings train, so even the first
  layer needs input gradients): 2x the forward, a step is 3x the forward;
* **final-K expert methods** (SSFT, AEFT) with K = 2 adapted layers, f the first of them: the LM head
  needs only its input gradient (1x); every layer above f needs input gradients through attention
  (projections 1x; scores 2x, both operands are activations), router and experts 2x (input and
  weight); layer f needs the weight gradients of its router and experts (1x each) and, inside each
  expert, the input gradient of the down projection (on the way to the gate and up projections'
  weight gradients: 1/3 of the expert's forward), but no input gradient of the layer (nothing below
  it trains) and no attention backward; the layers below f no backward at all.
  With the router mask every (token, slot) pair in those layers goes to a trainable expert, so SSFT
  and AEFT cost the same FLOPs per token;
* ignored: element-wise work (norms, activations, softmax, rotary, the loss), the embedding lookup,
  and the optimizer (its cost scales with the trainable parameters, not the tokens: it is one reason
  a measured speed-up can differ from the limit).

The limit is ``full step FLOPs / SSFT step FLOPs``; ``ssft_fraction_of_flop_limit`` is the measured
speed-up over it. On ``allenai/OLMoE-1B-7B-0924`` (sequence 2,048) this gives a 2.49 GFLOP forward per
token, 7.48 Full-FT, 3.08 SSFT: 2.42x. ``tests/test_adapt_step_bench.py`` checks the formula against
``torch.utils.flop_counter.FlopCounterMode`` on a real training step of a tiny model.

**Sweep.** 5 SSFT learning rates (the paper's grid) trained for the same steps on the same batches:
``sweep_separate`` runs ``moelang.train.train`` 5 times (each from its own copy of the start model,
copied outside the timing), ``sweep_shared`` runs them all through one ``moelang.sweep.train_sweep``,
which computes the frozen layers once per batch for every run; each mode in its own process. The
time is the wall time of the training calls; each run's final loss is compared across the two modes.

Writes ``benchmarks/results/adapt_step.json`` and the section of ``benchmarks/RESULTS.md`` between its
markers. ``--quick`` runs the same depth ratio at a toy width (``QUICK_ARCHITECTURE``) for a few steps
(``QUICK_SETTINGS``) and writes its results to ``--out`` or a temporary directory (see ``_results.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _results import add_output_arguments, command_line, output_dir, save_results  # noqa: E402
from train_step import _rss_mib, write_tokens  # noqa: E402  (the same synthetic data and RSS reading)

THREADS = 2
# --quick: one torch thread. Its numbers measure nothing, and on cores that other jobs share (where the
# test suite runs it) two OpenMP threads wait on each other: a toy step then takes 10-300x longer.
QUICK_THREADS = 1
CONTENDED_BELOW = 0.8  # a process whose CPU/wall ratio is below this x THREADS shared its cores
SEED = 0
ADAPTED_LAYERS = 2  # K: the paper adapts the final 2 of OLMoE's 16 MoE layers
SSFT_EXPERTS_PER_LAYER = 11  # about the paper's SSFT set per layer (specific + 5 shared experts)
LORA_RANK = 8
SWEEP_LRS = (1e-5, 1e-4, 4e-4, 1e-3, 4e-3)  # the paper's grid
LR = 4e-4  # the per-method runs: one of the grid's rates

# The paper's depth ratio (16 MoE layers, 64 experts, top-8, expert width H / 2), small widths.
ARCHITECTURE = {
    "vocab_size": 4000,
    "hidden_size": 128,
    "intermediate_size": 64,
    "num_hidden_layers": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SETTINGS = {"seq_len": 128, "micro_batch_size": 8, "steps": 10, "warmup": 3, "sweep_steps": 5}
# --quick: the same depth ratio on a toy width, a few steps: checks the script, measures nothing.
QUICK_ARCHITECTURE = ARCHITECTURE | {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 16,
                                     "num_attention_heads": 2, "num_key_value_heads": 2}
QUICK_SETTINGS = {"seq_len": 32, "micro_batch_size": 2, "steps": 3, "warmup": 1, "sweep_steps": 2}

VARIANTS = ("full", "ssft", "aeft", "lora")
SWEEP_MODES = ("sweep_separate", "sweep_shared")
TARGETS = {  # issue 13, section 4
    "ssft_speedup_vs_full": 1.8,  # at least
    "ssft_fraction_of_flop_limit": 0.8,  # at least
    "full_over_ssft_peak_memory": 1 / 0.6,  # at least: SSFT's peak at most 60% of Full-FT's
    "sweep_time_vs_separate": 0.6,  # at most
}


# --------------------------------------------------------------------------------------------------
# FLOPs from the config
# --------------------------------------------------------------------------------------------------

def matmul_flops_per_token(architecture: dict, seq_len: int, adapted_layers: int | None,
                           attention: str = "causal") -> dict[str, float]:
    """Matrix-product FLOPs per token of one training step of an OLMoE-family model (see the module
    docstring for the rules): ``adapted_layers`` None is Full-FT, K a final-K expert method (SSFT,
    AEFT: the final K layers' experts and routers train). Returns ``forward``, ``backward`` and
    ``step`` (their sum)."""
    if attention not in ("causal", "full"):
        raise ValueError(f"attention {attention!r}: causal or full")
    a = architecture
    hidden, heads = a["hidden_size"], a["num_attention_heads"]
    kv_heads = a.get("num_key_value_heads") or heads
    head_dim = a.get("head_dim") or hidden // heads
    layers = a["num_hidden_layers"]
    keys = (seq_len + 1) / 2 if attention == "causal" else seq_len
    projections = 2 * hidden * head_dim * (2 * heads + 2 * kv_heads)
    scores = 4 * heads * head_dim * keys  # q k^T and the weighted sum of v
    router = 2 * hidden * a["num_experts"]
    experts = a["num_experts_per_tok"] * 3 * 2 * hidden * a["intermediate_size"]
    head = 2 * hidden * a["vocab_size"]
    layer = projections + scores + router + experts
    forward = layers * layer + head
    if adapted_layers is None:
        backward = 2 * forward
    else:
        if not 1 <= adapted_layers <= layers:
            raise ValueError(f"adapted_layers {adapted_layers}: between 1 and {layers}")
        above_first = adapted_layers - 1  # adapted layers whose input gradient is needed
        backward = (head  # input gradient only
                    + above_first * (projections + 2 * scores + 2 * router + 2 * experts)
                    # the first adapted layer: weight gradients, and the down projection's input
                    # gradient, on the way to the gate and up projections' weight gradients
                    + router + experts + experts / 3)
    return {"forward": forward, "backward": backward, "step": forward + backward}


def flop_limit(architecture: dict, seq_len: int, adapted_layers: int) -> dict[str, float]:
    """The speed-up of a final-K step over a Full-FT step if time were matrix-product FLOPs."""
    full = matmul_flops_per_token(architecture, seq_len, None)
    final_k = matmul_flops_per_token(architecture, seq_len, adapted_layers)
    return {"forward_per_token": full["forward"], "full_step_per_token": full["step"],
            "ssft_step_per_token": final_k["step"], "limit": full["step"] / final_k["step"],
            # the part of an SSFT step a shared frozen pass computes once for a whole sweep
            "frozen_forward_fraction_of_ssft_step": frozen_forward(architecture, seq_len, adapted_layers)
            / final_k["step"]}


def frozen_forward(architecture: dict, seq_len: int, adapted_layers: int) -> float:
    """Forward FLOPs per token below the first adapted layer's MoE block (its attention included)."""
    a = architecture
    one_layer = matmul_flops_per_token(a | {"num_hidden_layers": 1, "vocab_size": 0}, seq_len, None)["forward"]
    router = 2 * a["hidden_size"] * a["num_experts"]
    experts = a["num_experts_per_tok"] * 3 * 2 * a["hidden_size"] * a["intermediate_size"]
    return (a["num_hidden_layers"] - adapted_layers + 1) * one_layer - router - experts


# --------------------------------------------------------------------------------------------------
# One variant, in its own process
# --------------------------------------------------------------------------------------------------

def ssft_experts(architecture: dict, layers: list[int]) -> dict[int, list[int]]:
    """The SSFT set: ``SSFT_EXPERTS_PER_LAYER`` experts per adapted layer, a seeded draw (the same in
    every process)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return {index: sorted(int(e) for e in rng.choice(architecture["num_experts"], SSFT_EXPERTS_PER_LAYER,
                                                      replace=False)) for index in layers}


def make_method(variant: str, architecture: dict, layers: list[int]):
    from moelang.models.lora import LoRASettings, LoRATraining
    from moelang.models.methods import ExpertSubset, FullTraining

    if variant == "full":
        return FullTraining()
    if variant == "ssft":
        return ExpertSubset(experts=ssft_experts(architecture, layers), routers=list(layers), mask_router=True)
    if variant == "aeft":
        # every expert trains, so the router mask would mask nothing: off
        return ExpertSubset(experts={i: list(range(architecture["num_experts"])) for i in layers},
                            routers=list(layers))
    if variant == "lora":
        return LoRATraining(LoRASettings(rank=LORA_RANK, layers=len(layers)))
    raise ValueError(variant)


def _settings(settings: dict, steps: int, lr: float):
    from moelang.train import TrainSettings

    # the adaptation stage's optimisation: AdamW (0.9, 0.95), wd 0.1, clip 1.0, no balancing loss
    return TrainSettings(steps=steps, seq_len=settings["seq_len"], micro_batch_size=settings["micro_batch_size"],
                         lr=lr, aux_loss_coef=0.0, dtype="fp32", seed=SEED)


def _setup(architecture: dict):
    """Imports (peft too, so that every process's baseline holds the same modules), threads, the
    baseline RSS, then the start model and the adapted layers' indices."""
    import accelerate  # noqa: F401  (the engine imports it on its first call: not inside a timed call)
    import peft  # noqa: F401  (LoRA imports it; the others import it here so the baselines match)
    import torch
    from transformers import OlmoeConfig

    from moelang.models import ModelAdapter, init_model

    torch.set_num_threads(THREADS)
    baseline = _rss_mib()
    model = init_model(OlmoeConfig(**architecture), seed=SEED)
    layers = [layer.index for layer in ModelAdapter(model).moe_layers[-ADAPTED_LAYERS:]]
    return model, layers, baseline


def _warm_up(model, architecture: dict, settings: dict) -> None:
    """One forward pass outside the timing: the first call of the kernels (thread pool, oneDNN) costs
    more than any later one, and the sweep modes time whole runs, not steps after a warm-up."""
    import torch

    batch = torch.randint(3, architecture["vocab_size"], (settings["micro_batch_size"], settings["seq_len"]))
    with torch.no_grad():
        model(input_ids=batch)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_variant(variant: str, architecture: dict, settings: dict) -> dict:
    """One method in this process: build, train ``settings['steps']`` steps; the measurements."""
    import torch

    from moelang.models import count_parameters
    from moelang.train import PackedStream, train

    model, layers, baseline = _setup(architecture)
    method = make_method(variant, architecture, layers)
    train_settings = _settings(settings, settings["steps"], LR)
    # What must stay frozen stays frozen, what trains moves: checked after the run.
    first_layer_experts = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    last = model.model.layers[layers[-1]].mlp.experts.gate_up_proj.detach().clone()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moelang-adapt-bench-") as tmp:
        tmp = Path(tmp)
        need = train_settings.steps * train_settings.micro_batch_size * train_settings.seq_len
        write_tokens(tmp / "xx.parquet", int(need * 1.2) + 4096, architecture["vocab_size"], SEED)
        stream = PackedStream({"xx": tmp / "xx.parquet"}, {}, train_settings.seq_len, architecture["eos_token_id"],
                              SEED)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        result = train(model, stream, train_settings, state_dir=tmp / "state", method=method)
        seconds = time.perf_counter() - start
        cpu_seconds = _cpu_seconds() - cpu_start
    peak = _rss_mib()
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    with torch.no_grad():  # the method finalized the model: a plain OLMoE again
        moved_first_layer = not torch.equal(first_layer_experts, model.model.layers[0].mlp.experts.gate_up_proj)
        moved_embeddings = not torch.equal(embeddings, model.get_input_embeddings().weight)
        gate_up = model.model.layers[layers[-1]].mlp.experts.gate_up_proj
        moved_last = [e for e in range(gate_up.shape[0]) if not torch.equal(last[e], gate_up[e])]
    full = variant == "full"
    assert moved_first_layer == full and moved_embeddings == full, (variant, moved_first_layer, moved_embeddings)
    assert moved_last, (variant, "nothing in the last layer's experts moved")
    if variant == "ssft":
        assert set(moved_last) <= set(method.experts[layers[-1]]), (variant, moved_last)
    timed = [row["tokens_per_s"] for row in result.log[settings["warmup"]:]]
    tokens_per_step = train_settings.micro_batch_size * train_settings.seq_len
    return {
        "variant": variant,
        "method": method.describe(),
        "layers_adapted": None if full else layers,
        "experts_implementation": model.config._experts_implementation,
        "total_params": result.parameters["total"],
        "trainable_params": result.parameters["trainable"],
        "trainable_fraction": result.parameters["trainable_fraction"],
        "tokens_per_s": statistics.median(timed),
        "tokens_per_s_min": min(timed),
        "tokens_per_s_max": max(timed),
        "tokens_per_s_warmup": [row["tokens_per_s"] for row in result.log[:settings["warmup"]]],
        "step_seconds_median": statistics.median(tokens_per_step / t for t in timed),
        "steps_run": result.steps,
        "steps_timed": len(timed),
        "tokens_per_step": tokens_per_step,
        "final_loss": result.final_loss,
        "train_seconds": seconds,
        "rss_baseline_mib": baseline,
        "peak_rss_mib": peak,
        "peak_rss_net_mib": peak - baseline,
        "peak_cuda_mib": cuda_peak,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "experts_updated_in_last_layer": len(moved_last),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "cpu_per_wall_s": cpu_seconds / seconds,
    }


def run_sweep(mode: str, architecture: dict, settings: dict) -> dict:
    """The 5 SSFT learning rates in this process: 5 ``train`` calls, or one ``train_sweep``."""
    import copy

    from moelang.train import PackedStream, train

    model, layers, baseline = _setup(architecture)
    _warm_up(model, architecture, settings)
    steps = settings["sweep_steps"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moelang-adapt-bench-") as tmp:
        tmp = Path(tmp)
        need = steps * settings["micro_batch_size"] * settings["seq_len"]
        write_tokens(tmp / "xx.parquet", int(need * 1.2) + 4096, architecture["vocab_size"], SEED)

        def stream():  # every run sees the same batches
            return PackedStream({"xx": tmp / "xx.parquet"}, {}, settings["seq_len"], architecture["eos_token_id"], SEED)

        final_losses, seconds, cpu_seconds = [], 0.0, 0.0
        if mode == "sweep_separate":
            for i, lr in enumerate(SWEEP_LRS):
                run_model = copy.deepcopy(model)  # each run starts from the start model; not timed
                data = stream()
                cpu_start, start = _cpu_seconds(), time.perf_counter()
                result = train(run_model, data, _settings(settings, steps, lr), state_dir=tmp / f"state-{i}",
                               method=make_method("ssft", architecture, layers))
                seconds += time.perf_counter() - start
                cpu_seconds += _cpu_seconds() - cpu_start
                final_losses.append(result.final_loss)
                del run_model
        else:
            from moelang.sweep import SweepRun, train_sweep

            runs = [SweepRun(settings=_settings(settings, steps, lr), method=make_method("ssft", architecture, layers),
                             state_dir=tmp / f"state-{i}") for i, lr in enumerate(SWEEP_LRS)]
            data = stream()
            cpu_start, start = _cpu_seconds(), time.perf_counter()
            results = train_sweep(model, data, runs)
            seconds = time.perf_counter() - start
            cpu_seconds = _cpu_seconds() - cpu_start
            final_losses = [r.final_loss for r in results]
    peak = _rss_mib()
    return {
        "variant": mode,
        "lrs": list(SWEEP_LRS),
        "steps_per_run": steps,
        "tokens_per_step": settings["micro_batch_size"] * settings["seq_len"],
        "seconds": seconds,
        "final_losses": final_losses,
        "rss_baseline_mib": baseline,
        "peak_rss_mib": peak,
        "peak_rss_net_mib": peak - baseline,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "cpu_per_wall_s": cpu_seconds / seconds,
    }


# --------------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------------

def sweep_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("moelang.sweep") is not None


def run_child(name: str, quick: bool, tmp: Path) -> dict:
    result_file = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--result-file", str(result_file)]
    if quick:
        cmd.append("--quick")
    subprocess.run(cmd, check=True)
    return json.loads(result_file.read_text(encoding="utf-8"))


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser)
    parser.add_argument("--variant", choices=VARIANTS + SWEEP_MODES, help=argparse.SUPPRESS)  # internal: one child
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        THREADS = QUICK_THREADS  # this process and its children (they get --quick too)
    architecture = QUICK_ARCHITECTURE if args.quick else ARCHITECTURE
    settings = QUICK_SETTINGS if args.quick else SETTINGS

    if args.variant:
        run = run_variant if args.variant in VARIANTS else run_sweep
        out = run(args.variant, architecture, settings)
        Path(args.result_file).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return

    out_dir = output_dir(args)
    started = time.perf_counter()
    has_sweep = sweep_available()
    names = VARIANTS + (SWEEP_MODES if has_sweep else ())
    results = {}
    with tempfile.TemporaryDirectory(prefix="moelang-adapt-bench-") as tmp:
        for name in names:  # one after the other: the two cores belong to one process at a time
            print(f"{name} ...", flush=True)
            r = results[name] = run_child(name, args.quick, Path(tmp))
            if name in VARIANTS:
                print(f"  {r['tokens_per_s']:,.0f} tokens/s (median of {r['steps_timed']}), peak RSS "
                      f"{r['peak_rss_net_mib']:,.0f} MiB over the baseline, trainable {r['trainable_params']:,}, "
                      f"{r['cpu_per_wall_s']:.2f} CPU s per wall s", flush=True)
            else:
                print(f"  {r['seconds']:.1f} s for {len(r['lrs'])} runs of {r['steps_per_run']} steps, "
                      f"{r['cpu_per_wall_s']:.2f} CPU s per wall s", flush=True)
    if not has_sweep:
        print("moelang.sweep is not there (the shared-pass sweep, issue 13): the sweep part is skipped",
              file=sys.stderr)
    contended = [v for v, r in results.items() if r["cpu_per_wall_s"] < CONTENDED_BELOW * THREADS]
    if contended:
        print(f"WARNING: {', '.join(contended)} got less than {CONTENDED_BELOW:.0%} of {THREADS} cores (another "
              f"process was running?): the numbers are not comparable; run again on idle cores", file=sys.stderr)

    full, ssft = results["full"], results["ssft"]
    assert len({r["total_params"] for r in results.values() if "total_params" in r}) == 1
    limit = flop_limit(architecture, settings["seq_len"], ADAPTED_LAYERS)
    speedup = ssft["tokens_per_s"] / full["tokens_per_s"]
    summary = {
        "ssft_speedup_vs_full": speedup,
        "ssft_fraction_of_flop_limit": speedup / limit["limit"],
        "full_over_ssft_peak_memory": full["peak_rss_net_mib"] / ssft["peak_rss_net_mib"],
        "sweep_time_vs_separate": (results["sweep_shared"]["seconds"] / results["sweep_separate"]["seconds"]
                                   if has_sweep else None),
    }
    met = {key: None if value is None else
           (value <= TARGETS[key] if key == "sweep_time_vs_separate" else value >= TARGETS[key])
           for key, value in summary.items()}
    command = command_line("adapt_step.py")
    result = {
        "command": command,
        **summary,
        "targets": TARGETS,
        "targets_met": met,
        "flops": {"method": "matmul_flops_per_token (module docstring), causal attention", **limit},
        "machine": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch_threads": THREADS},
        "model": {"family": "olmoe (transformers.OlmoeConfig)", **architecture,
                  "experts_implementation": full["experts_implementation"], "total_params": full["total_params"]},
        "training": {"seq_len": settings["seq_len"], "micro_batch_size": settings["micro_batch_size"],
                     "tokens_per_step": full["tokens_per_step"], "steps": settings["steps"],
                     "warmup_steps_discarded": settings["warmup"], "lr": LR, "sweep_lrs": list(SWEEP_LRS),
                     "sweep_steps_per_run": settings["sweep_steps"], "adapted_layers": ADAPTED_LAYERS,
                     "engine": "moelang.train.train over moelang.train.PackedStream (synthetic tokens)"},
        "peak_memory": "CPU ru_maxrss of each variant's process at the end minus its ru_maxrss just before the model "
                       "is built (after all imports); MiB",
        "sweep_skipped": None if has_sweep else "moelang.sweep (train_sweep) is not in this checkout",
        "contended": contended,
        "benchmark_seconds": time.perf_counter() - started,
        "details": results,
    }
    if has_sweep:
        separate, shared = results["sweep_separate"]["final_losses"], results["sweep_shared"]["final_losses"]
        result["sweep_final_loss_max_difference"] = max(abs(a - b) for a, b in zip(separate, shared))
    print(json.dumps({k: result[k] for k in (*summary, "targets_met", "benchmark_seconds")}, indent=2))
    section = results_section(result)
    print(section)
    save_results("adapt_step", result, section, out_dir)


def achieved_gflops(result: dict, variant: str) -> float:
    """Matrix-product GFLOP/s of a variant's median step (SSFT and AEFT: the final-K step's FLOPs)."""
    flops = result["flops"]
    per_token = flops["full_step_per_token"] if variant == "full" else flops["ssft_step_per_token"]
    return result["details"][variant]["tokens_per_s"] * per_token / 1e9


def limit_explanation(result: dict) -> str:
    """One sentence on how the measured speed-up relates to the limit; a mechanism is named only
    where the numbers say it (the achieved matrix-product rates of the two steps)."""
    full, ssft = achieved_gflops(result, "full"), achieved_gflops(result, "ssft")
    rates = f"Matrix products ran at {full:.1f} GFLOP/s in the Full-FT step and {ssft:.1f} in the SSFT step"
    if result["contended"]:
        return rates + "; another process shared the cores, so no conclusion is drawn."
    fraction = result["ssft_fraction_of_flop_limit"]
    if fraction > 1.05:
        return (rates + ": the Full-FT step spends more time per FLOP, on work the limit does not count (for "
                "example an AdamW update, gradient zeroing and clipping over every parameter; the element-wise "
                "backward of every layer).")
    if fraction < 0.95:
        return (rates + ": the SSFT step spends more time per FLOP, on work that does not shrink with its backward "
                "(the per-step overhead of the engine and the kernels' fixed cost per call, the same in both steps).")
    return rates + ": time follows the FLOPs."


def _met(result: dict, key: str) -> str:
    met = result["targets_met"][key]
    return "skipped" if met is None else ("met" if met else "**not met**")


def results_section(result: dict) -> str:
    details, flops, a = result["details"], result["flops"], result["model"]
    training = result["training"]
    machine = (f"{result['machine']['machine']}, {result['machine']['cpu_count']} cores, {THREADS} torch threads, "
               f"Python {result['machine']['python']}")
    if details["full"]["device"] == "cuda":
        machine += ", on the GPU"
    layers = details["ssft"]["layers_adapted"]
    rows = "\n".join(
        f"| {name} | {what} | {r['trainable_params']:,} | {r['trainable_fraction']:.4f} | {r['tokens_per_s']:,.0f} "
        f"| {r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f} | {r['peak_rss_net_mib']:,.0f} "
        f"| {r['peak_rss_mib']:,.0f} |"
        for name, what, r in (
            ("full", "every parameter (`FullTraining`)", details["full"]),
            ("ssft", f"{SSFT_EXPERTS_PER_LAYER} experts (split out) + router, layers {layers}, router mask "
                     f"(`ExpertSubset`)", details["ssft"]),
            ("aeft", f"all {a['num_experts']} experts + router, layers {layers} (`ExpertSubset`)", details["aeft"]),
            ("lora", f"LoRA r{LORA_RANK} on the expert tensors and routers, layers {layers} (`LoRATraining`)",
             details["lora"]),
        ))
    s = result
    if s["sweep_time_vs_separate"] is None:
        sweep = (f"sweep_time_vs_separate: **skipped** ({s['sweep_skipped']}; target <= "
                 f"{TARGETS['sweep_time_vs_separate']}x).")
    else:
        shared, separate = details["sweep_shared"], details["sweep_separate"]
        sweep = (f"Sweep of {len(SWEEP_LRS)} SSFT learning rates ({', '.join(f'{lr:g}' for lr in SWEEP_LRS)}), "
                 f"{training['sweep_steps_per_run']} steps each on the same batches, each way in its own process: "
                 f"{len(SWEEP_LRS)} `train` runs {separate['seconds']:.1f} s (peak RSS "
                 f"{separate['peak_rss_net_mib']:,.0f} MiB over the baseline, one run's model at a time), one "
                 f"`train_sweep` {shared['seconds']:.1f} s ({shared['peak_rss_net_mib']:,.0f} MiB, every run at once); "
                 f"sweep_time_vs_separate = **{s['sweep_time_vs_separate']:.2f}x** (target <= "
                 f"{TARGETS['sweep_time_vs_separate']}x, {_met(s, 'sweep_time_vs_separate')}); the runs' final losses "
                 f"differ by at most {s['sweep_final_loss_max_difference']:.1e} between the two.")
    warning = ""
    if s["contended"]:
        warning = (f"\n**Warning:** {', '.join(s['contended'])} shared the cores with another process (CPU/wall below "
                   f"{CONTENDED_BELOW:.0%} of {THREADS}); those numbers are not comparable.")
    return f"""
## Adaptation step (`benchmarks/adapt_step.py`)

Command: `{s['command']}` ({machine}; median of steps {training['warmup_steps_discarded'] + 1}-{training['steps']}, \
the first {training['warmup_steps_discarded']} left out; whole script {s['benchmark_seconds']:.0f} s). One run on a \
2-core machine that other jobs may share: noisy (the range column is the spread of the timed steps; each process's \
CPU/wall ratio is in the JSON).
Model: OLMoE family from `OlmoeConfig` with the paper's depth ratio: {a['num_hidden_layers']} MoE layers, \
{a['num_experts']} experts, top-{a['num_experts_per_tok']}, the final {ADAPTED_LAYERS} adapted; hidden \
{a['hidden_size']}, expert intermediate {a['intermediate_size']}, {a['num_attention_heads']} heads, vocab \
{a['vocab_size']:,}, `{a['experts_implementation']}` experts, **{a['total_params']:,}** parameters, fp32.
Each step is `moelang.train.train` on a `PackedStream` of synthetic tokens ({training['micro_batch_size']} x \
{training['seq_len']} = {training['tokens_per_step']:,} tokens), AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, \
lr {training['lr']:g}, no balancing loss. Each variant runs in its own process. Peak memory: CPU `ru_maxrss` of \
the process at the end minus its `ru_maxrss` just before the model is built (all imports done); the whole \
process's peak beside it.

| variant | trains | params trained | fraction | tokens/s (median) | range | peak RSS over baseline (MiB) \
| whole process (MiB) |
|---|---|---:|---:|---:|---:|---:|---:|
{rows}

FLOPs per token from the config (matrix products, causal attention, sequence {training['seq_len']}; formula in the \
script's docstring, checked against torch's FLOP counter in `tests/test_adapt_step_bench.py`): forward \
{flops['forward_per_token'] / 1e6:.2f} M, Full-FT step {flops['full_step_per_token'] / 1e6:.2f} M, SSFT step \
{flops['ssft_step_per_token'] / 1e6:.2f} M: the speed-up limit is **{flops['limit']:.2f}x**; the frozen forward \
below the first adapted MoE block is {flops['frozen_forward_fraction_of_ssft_step']:.0%} of an SSFT step.

- ssft_speedup_vs_full = **{s['ssft_speedup_vs_full']:.2f}x** (target >= {TARGETS['ssft_speedup_vs_full']}x, \
{_met(s, 'ssft_speedup_vs_full')}); AEFT {details['aeft']['tokens_per_s'] / details['full']['tokens_per_s']:.2f}x, \
LoRA {details['lora']['tokens_per_s'] / details['full']['tokens_per_s']:.2f}x.
- ssft_fraction_of_flop_limit = **{s['ssft_fraction_of_flop_limit']:.2f}** (target >= \
{TARGETS['ssft_fraction_of_flop_limit']}, {_met(s, 'ssft_fraction_of_flop_limit')}). {limit_explanation(s)}
- full_over_ssft_peak_memory = **{s['full_over_ssft_peak_memory']:.2f}x** (SSFT's peak \
{1 / s['full_over_ssft_peak_memory']:.0%} of Full-FT's; target at most 60%, {_met(s, 'full_over_ssft_peak_memory')}).
- {sweep}{warning}
"""


if __name__ == "__main__":
    main()

"""LayerMoE stage 1: a training step of a grown MoE (new experts and routers train), the project's
way against the naive way, with the FLOP and byte limits; and an upcycled dense model's forward
against the dense model's.

    .venv/bin/python benchmarks/expand_step.py [--quick] [--out DIR]

**Stage-1 step.** The model is ``benchmarks/train_step.py``'s OLMoE-family architecture (vocab 8,000,
hidden 256, expert intermediate 512, 4 layers, 8 experts, top-2), randomly initialised, then grown by
``moelang.models.layermoe.build.expand_model`` by 2 new experts per layer (the embedded default's 8
new experts over 4 layers), each copying a random existing expert. Each variant trains it with the
engine (``moelang.train.train``, stage 1's settings: AdamW 0.9/0.999, weight decay 0, cosine, load
balancing 0.01) on synthetic tokens (8 x 256 per step), in its own process:

* ``split`` (the project's stage 1, ``moelang.expand``): ``ExpertSubset`` with the new experts of
  every layer and the routers: the new experts live in their own small experts module; gradients
  and AdamW state exist for them alone;
* ``masked`` (the naive way): the fused expert tensors and the routers are trainable and a gradient
  hook zeroes the rows of the original experts (with weight decay 0, AdamW then leaves those rows
  unmoved; with weight decay it would not). Gradients and AdamW state exist for every expert.

**Limits.** Bytes: the gradient plus AdamW's two moments of the trained tensors, 12 bytes per fp32
parameter, for each variant (the floor of what training adds to the weights). FLOPs per token of a
step (multiply-adds x 2): the forward (attention projections and scores, router, top-k experts of
3 matrices, LM head), the input gradients of every layer above the first MLP (1x their forward; the
first layer's attention and the embeddings need none), and the weight gradients of the trained
tensors: the routers in full; the experts' 1x their forward for the (token, slot) pairs they
receive, which is every pair for ``masked`` and the fraction routed to new experts for ``split``
(measured on the batch). ``limit = masked FLOPs / split FLOPs``.

**Upcycled forward.** A dense Llama of the same width (hidden 256, FFN 512, 4 layers) against the
same model upcycled to 2 experts per layer, top-2 (the paper's setting at init: both experts are the
FFN): inference tokens/s of a forward (eval, no grad), and its FLOP ratio (the upcycled MLP computes
2 FFNs per token plus a router).

Results are written to ``benchmarks/results/expand_step.json`` and the ``expand_step`` section of
``benchmarks/RESULTS.md``. Run it alone: two torch processes on 2 cores slow each other 10-80x.
``--quick``: the same layers and experts at ``train_step.py``'s toy width (``QUICK_ARCHITECTURE``), 2 x 32
tokens a step, 4 steps, 2 forward repeats, results to ``--out`` or a temporary directory (see ``_results.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from typing import NamedTuple
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from _results import add_output_arguments, command_line, output_dir, save_results  # noqa: E402
from train_step import ARCHITECTURE, QUICK_ARCHITECTURE, _rss_mib, write_tokens  # noqa: E402

SEED = 0
THREADS = 2
# --quick: one torch thread. Its numbers measure nothing, and on cores that other jobs share (where the
# test suite runs it) two OpenMP threads wait on each other: a toy step then takes 10-300x longer.
QUICK_THREADS = 1
NEW_PER_LAYER = 2


class Form(NamedTuple):
    """The sizes of the full form or of ``--quick``."""

    architecture: dict
    seq_len: int
    micro_batch: int
    steps: int  # optimizer steps of each stage-1 variant
    repeats: int  # timed forward passes of each forward variant


FULL = Form(ARCHITECTURE, seq_len=256, micro_batch=8, steps=24, repeats=10)
QUICK = Form(QUICK_ARCHITECTURE, seq_len=32, micro_batch=2, steps=4, repeats=2)
TIMED_FROM_STEP = 3  # the first 2 steps (optimizer state allocated, kernels warmed) are left out


def grown_model(architecture: dict):
    import torch
    from transformers import OlmoeConfig

    from moelang.models import init_model
    from moelang.models.layermoe.build import expand_model

    base = init_model(OlmoeConfig(**architecture), seed=SEED)
    model, _ = expand_model(base, [NEW_PER_LAYER] * architecture["num_hidden_layers"], seed=SEED)
    del base
    torch.manual_seed(SEED)
    return model


def stage1_flops_per_token(architecture: dict, seq_len: int, new_slot_fraction: float) -> dict[str, float]:
    a = architecture
    h, i, v, layers, k = a["hidden_size"], a["intermediate_size"], a["vocab_size"], a["num_hidden_layers"], \
        a["num_experts_per_tok"]
    experts = a["num_experts"] + NEW_PER_LAYER
    attention = 2 * h * h * 4 + 4 * h * (seq_len + 1) / 2  # q, k, v, o projections; scores and values (causal)
    router = 2 * h * experts
    expert_fwd = k * 3 * 2 * h * i
    forward = layers * (attention + router + expert_fwd) + 2 * h * v
    # input gradients: every layer's MLP (router and experts) and every attention above the first
    # layer; the LM head's input gradient
    input_grads = layers * (router + expert_fwd) + (layers - 1) * attention + 2 * h * v
    router_wgrad = layers * router
    masked = forward + input_grads + router_wgrad + layers * expert_fwd
    split = forward + input_grads + router_wgrad + layers * expert_fwd * new_slot_fraction
    return {"forward": forward, "masked": masked, "split": split, "limit": masked / split}


def run_stage1(variant: str, form: Form, tmp: Path) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from moelang.models import ModelAdapter
    from moelang.models.methods import ExpertSubset, TrainingMethod
    from moelang.train import PackedStream, TrainSettings, train

    architecture, seq_len, micro_batch, steps = form.architecture, form.seq_len, form.micro_batch, form.steps
    rss_before = _rss_mib()
    model = grown_model(architecture)
    adapter = ModelAdapter(model)
    originals = {m.index: m.router.num_original for m in adapter.moe_layers}
    if variant == "split":
        method = ExpertSubset(experts={m.index: list(range(originals[m.index], m.num_experts))
                                       for m in adapter.moe_layers}, routers=list(originals))
    else:
        model.requires_grad_(False)
        for m in adapter.moe_layers:
            m.router.requires_grad_(True)
            for param in m.experts.parameters():
                param.requires_grad_(True)
                param.register_hook(lambda g, n=originals[m.index]: torch.cat([torch.zeros_like(g[:n]), g[n:]]))
        method = TrainingMethod()
    # the fraction of (token, slot) pairs that new experts receive, on the first batch
    routed = {"new": 0, "all": 0}

    def count(layer, index, weights):
        routed["new"] += int((index >= originals[layer]).sum())
        routed["all"] += index.numel()

    tokens = tmp / "tokens.parquet"
    write_tokens(tokens, seq_len * micro_batch * (steps + 4), architecture["vocab_size"], SEED)
    stream = PackedStream({"xx": tokens}, {"xx": 1.0}, seq_len, 2, SEED)
    with torch.no_grad(), adapter.record_routing(count):
        model(torch.as_tensor(stream.windows["xx"][:micro_batch], dtype=torch.long))
    settings = TrainSettings(steps=steps, seq_len=seq_len, micro_batch_size=micro_batch, lr=1e-3, warmup_steps=0,
                             min_lr_ratio=0.0, betas=(0.9, 0.999), weight_decay=0.0, aux_loss_coef=0.01, seed=SEED)
    result = train(model, stream, settings, tmp / f"state-{variant}", method=method)
    trained = result.parameters["trainable"]  # masked: every expert's tensors (their gradients are computed)
    speeds = [row["tokens_per_s"] for row in result.log[TIMED_FROM_STEP - 1:]]
    return {"variant": variant, "tokens_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
            "trained_params": int(trained), "total_params": int(result.parameters["total"]),
            "grad_and_adam_mib": trained * 12 / 2**20, "peak_rss_mib": _rss_mib() - rss_before,
            "new_slot_fraction": routed["new"] / routed["all"]}


def run_forward(variant: str, form: Form) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from transformers import LlamaConfig

    from moelang.models import init_model
    from moelang.models.layermoe.build import expand_model

    a, seq_len, micro_batch, repeats = form.architecture, form.seq_len, form.micro_batch, form.repeats
    fields = {k: a[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
    model = init_model(LlamaConfig(**fields), seed=SEED).eval()
    if variant == "upcycled":
        model, _ = expand_model(model, [1] * a["num_hidden_layers"], top_k=2, seed=SEED)
    ids = torch.randint(3, a["vocab_size"], (micro_batch, seq_len), generator=torch.Generator().manual_seed(SEED))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    return {"variant": variant, "tokens_per_s": ids.numel() / seconds, "seconds": seconds}


def forward_flop_ratio(architecture: dict, seq_len: int) -> float:
    a = architecture
    h, i, v, layers = a["hidden_size"], a["intermediate_size"], a["vocab_size"], a["num_hidden_layers"]
    attention = 2 * h * h * 4 + 4 * h * (seq_len + 1) / 2
    dense = layers * (attention + 3 * 2 * h * i) + 2 * h * v
    upcycled = layers * (attention + 2 * 3 * 2 * h * i + 2 * h * 2) + 2 * h * v
    return upcycled / dense


def child(kind: str, variant: str, quick: bool) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--variant", variant] + (["--quick"] if quick else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser)
    parser.add_argument("--child", choices=("stage1", "forward"), help=argparse.SUPPRESS)  # internal: one child
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        THREADS = QUICK_THREADS  # this process and its children (they get --quick too)
    form = QUICK if args.quick else FULL
    architecture, seq_len = form.architecture, form.seq_len
    if args.child == "stage1":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_stage1(args.variant, form, Path(tmp))))
        return
    if args.child == "forward":
        print(json.dumps(run_forward(args.variant, form)))
        return
    out_dir = output_dir(args)
    stage1 = {v: child("stage1", v, args.quick) for v in ("split", "masked")}
    forward = {v: child("forward", v, args.quick) for v in ("dense", "upcycled")}
    flops = stage1_flops_per_token(architecture, seq_len, stage1["split"]["new_slot_fraction"])
    result = {
        "command": command_line("expand_step.py"),
        "machine": f"{platform.machine()}, {THREADS} torch threads, Python {platform.python_version()}",
        "stage1": stage1, "flops_per_token": flops,
        "speedup": stage1["split"]["tokens_per_s"] / stage1["masked"]["tokens_per_s"],
        "fraction_of_flop_limit": stage1["split"]["tokens_per_s"] / stage1["masked"]["tokens_per_s"] / flops["limit"],
        "byte_ratio": stage1["masked"]["grad_and_adam_mib"] / stage1["split"]["grad_and_adam_mib"],
        "forward": forward, "forward_flop_ratio": forward_flop_ratio(architecture, seq_len),
        "forward_slowdown": forward["dense"]["tokens_per_s"] / forward["upcycled"]["tokens_per_s"],
    }
    print(json.dumps(result, indent=1))
    save_results("expand_step", result, results_section(result, form), out_dir, indent=1)


def results_section(r: dict, form: Form) -> str:
    architecture, seq_len, micro_batch, steps = form.architecture, form.seq_len, form.micro_batch, form.steps
    s, m = r["stage1"]["split"], r["stage1"]["masked"]
    rows = "\n".join(
        f"| {v['variant']} | {v['trained_params']:,} of {v['total_params']:,} | {v['grad_and_adam_mib']:.1f} | "
        f"{v['tokens_per_s']:,.0f} | {v['min']:,.0f}-{v['max']:,.0f} | {v['peak_rss_mib']:.0f} |" for v in (s, m))
    f, fw = r["flops_per_token"], r["forward"]
    return f"""## LayerMoE stage 1 and the upcycled forward (`benchmarks/expand_step.py`)

Command: `{r['command']}` ({r['machine']}; median of steps {TIMED_FROM_STEP}-{steps}).
Model: `train_step.py`'s OLMoE architecture (hidden {architecture['hidden_size']}) grown by {NEW_PER_LAYER} new \
experts per layer ({architecture['num_experts'] + NEW_PER_LAYER} experts, top-{architecture['num_experts_per_tok']});
{micro_batch} x {seq_len} tokens a step; stage 1's settings (AdamW 0.9/0.999, weight decay 0, load balancing 0.01).

| variant | trained parameters | gradient + AdamW state (MiB) | tokens/s (median) | range | peak RSS added (MiB) |
|---|---|---:|---:|---:|---:|
{rows}

split / masked: **{r['speedup']:.2f}x** tokens/s; FLOP limit {f['limit']:.2f}x ({f['masked'] / 1e6:.1f} vs
{f['split'] / 1e6:.1f} MFLOP a token; new experts receive {s['new_slot_fraction']:.1%} of the (token, slot)
pairs), so **{r['fraction_of_flop_limit']:.2f}** of the limit; gradient + AdamW state {r['byte_ratio']:.1f}x smaller.

Upcycled forward (dense Llama, same width, 2 experts per layer, top-2) against the dense one:
{fw['dense']['tokens_per_s']:,.0f} vs {fw['upcycled']['tokens_per_s']:,.0f} tokens/s, **{r['forward_slowdown']:.2f}x**
slower, FLOP ratio {r['forward_flop_ratio']:.2f}x (each token runs 2 copies of the FFN).
"""


if __name__ == "__main__":
    main()

"""Training step: full training against training only two experts of the last two MoE layers, one run;
and the two ways of training chosen experts (expert-rows parametrization, split experts module).

    .venv/bin/python benchmarks/train_step.py [--steps 30] [--warmup 2] [--quick] [--out DIR]

A ~18M-parameter OLMoE-family model (``transformers.OlmoeConfig``: vocab 8,000, hidden 256, expert
intermediate 512, 4 layers, 4 heads, 8 experts, top-2; default experts implementation), randomly
initialised with ``moelang.models.init_model`` (same seed for both variants), trained on a synthetic
token Parquet file (``moelang.tokenize.TOKENS_SCHEMA``, random ids in [3, vocab)) through the
project's own engine: ``moelang.train.PackedStream`` and ``moelang.train.train`` (AdamW, cosine
schedule, load-balancing loss, clipping, fp32), seq_len 256, micro-batch 8, no gradient accumulation:

* ``full``: every parameter trainable;
* ``experts``: ``train_only(ModelAdapter(model), experts={L: [0, 1]}, routers=[L])`` for the last two
  MoE layers L: experts 0 and 1 of those layers (expert-rows parametrizations) plus their routers;
* ``experts_split``: the same selection as the training method
  ``moelang.models.methods.ExpertSubset``: the chosen experts as their own small experts module
  (``moelang.models.adapters.split_experts``), the fused tensors frozen; same gradients, no full
  copy of the fused tensors per forward and no full weight gradient;
* ``last2_all`` (control): all experts and the routers of the same two layers: the same backward depth
  as ``experts`` with 4x its trainable experts, so comparing the two separates "fewer experts train"
  from "backward stops earlier".

Throughput is the median of the engine's own per-step ``tokens_per_s`` (its log) after ``--warmup``
steps. Each variant runs in its own subprocess (the script re-invokes itself with ``--variant``), so
peak memory is that process's ``ru_maxrss`` (whole process: Python, torch, data, model, optimizer,
activations); on a GPU also ``torch.cuda.max_memory_allocated``. Writes ``benchmarks/results/train_step.json``
and the section of ``benchmarks/RESULTS.md`` between its markers. ``--quick``: the same layers, experts and
variants at a toy width (``QUICK_ARCHITECTURE``, ``QUICK_SETTINGS``), 3 steps, results to ``--out`` or a
temporary directory (see ``_results.py``).
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

THREADS = 2
# --quick: one torch thread. Its numbers measure nothing, and on cores that other jobs share (where the
# test suite runs it) two OpenMP threads wait on each other: a toy step then takes 10-300x longer.
QUICK_THREADS = 1
DEFAULT_STEPS = 30
DEFAULT_WARMUP = 2
CONTENDED_BELOW = 0.8  # a variant whose CPU/wall ratio is below this x THREADS shared its cores
SEED = 0
ARCHITECTURE = {
    "vocab_size": 8000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SETTINGS = {"seq_len": 256, "micro_batch_size": 8, "grad_accum": 1, "dtype": "fp32", "seed": SEED}
# --quick: the same depth, experts and top-k at a toy width, a few steps: checks the script, measures nothing
QUICK_ARCHITECTURE = ARCHITECTURE | {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 16,
                                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
QUICK_SETTINGS = SETTINGS | {"seq_len": 32, "micro_batch_size": 2}
QUICK_STEPS, QUICK_WARMUP = 3, 1
VARIANTS = ("full", "experts", "experts_split", "last2_all")  # last2_all: control, see the module docstring
TRAINED_EXPERTS = [0, 1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_tokens(path: Path, n_tokens: int, vocab: int, seed: int) -> int:
    """A token Parquet file of random documents (train split) with at least ``n_tokens`` tokens."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moelang.tokenize import TOKENS_SCHEMA

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(64, 1024))
        docs.append(rng.integers(3, vocab, size=n, dtype=np.int32))
        total += n
    table = pa.table(
        {
            "doc_id": pa.array([f"synthetic-{i}" for i in range(len(docs))], pa.string()),
            "split": pa.array(["train"] * len(docs), pa.string()),
            "input_ids": pa.array([d.tolist() for d in docs], pa.list_(pa.int32())),
            "n_tokens": pa.array([len(d) for d in docs], pa.int32()),
        },
        schema=TOKENS_SCHEMA,
    )
    pq.write_table(table, path)
    return total


def run_variant(variant: str, steps: int, warmup: int, architecture: dict = ARCHITECTURE,
                settings: dict = SETTINGS) -> dict:
    """One variant in this process: build, select, train ``steps`` steps; the measurements."""
    import torch

    torch.set_num_threads(THREADS)
    from transformers import OlmoeConfig

    from moelang.models import ModelAdapter, count_parameters, init_model, train_only
    from moelang.models.methods import ExpertSubset
    from moelang.train import PackedStream, TrainSettings, train

    config = OlmoeConfig(**architecture)
    model = init_model(config, seed=SEED)
    adapter = ModelAdapter(model)
    last_two = [layer.index for layer in adapter.moe_layers[-2:]]
    method = None
    if variant == "experts_split":
        method = ExpertSubset(experts={index: list(TRAINED_EXPERTS) for index in last_two}, routers=last_two)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # train() prepares the model itself; this one, without memory, is only counted
            prepared = AutoModelForCausalLM.from_config(config)
        method.prepare(prepared)
        trainable_names = [n for n, p in prepared.named_parameters() if p.requires_grad]
        counts = count_parameters(prepared)
        del prepared
    elif variant == "experts":
        trainable_names = train_only(adapter, experts={index: list(TRAINED_EXPERTS) for index in last_two},
                                     routers=last_two)
    elif variant == "last2_all":
        trainable_names = train_only(adapter, experts={layer.index: list(range(layer.num_experts))
                                                       for layer in adapter.moe_layers[-2:]}, routers=last_two)
    else:
        trainable_names = train_only(adapter, everything=True)
    if method is None:
        counts = count_parameters(model)
    train_settings = TrainSettings(steps=steps, **settings)
    # Sanity check of the selection: what must stay frozen stays frozen, what trains moves.
    last = adapter.moe_layer(last_two[-1]).experts
    before = {"embeddings": model.get_input_embeddings().weight.detach().clone(),
              "last_layer_gate_up": last.gate_up_proj.detach().clone()}
    rss_model = _rss_mib()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="moelang-train-bench-") as tmp:
        tmp = Path(tmp)
        need = steps * train_settings.micro_batch_size * train_settings.seq_len
        n_tokens = write_tokens(tmp / "xx.parquet", int(need * 1.2) + 4096, architecture["vocab_size"], SEED)
        stream = PackedStream({"xx": tmp / "xx.parquet"}, {}, train_settings.seq_len, architecture["eos_token_id"],
                              SEED)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        usage_start, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = train(model, stream, train_settings, state_dir=tmp / "state", method=method)
        seconds = time.perf_counter() - start
        usage_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (usage_end.ru_utime - usage_start.ru_utime) + (usage_end.ru_stime - usage_start.ru_stime)
    rss_peak = _rss_mib()
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    load_after = os.getloadavg()[0]
    with torch.no_grad():
        moved_embeddings = not torch.equal(before["embeddings"], model.get_input_embeddings().weight)
        gate_up = last.gate_up_proj  # the engine folded parametrizations and split experts back in
        moved_experts = [e for e in range(gate_up.shape[0])
                         if not torch.equal(before["last_layer_gate_up"][e], gate_up[e])]
    expected_experts = list(TRAINED_EXPERTS) if variant.startswith("experts") else list(range(gate_up.shape[0]))
    assert moved_experts == expected_experts, (variant, moved_experts, expected_experts)
    assert moved_embeddings == (variant == "full"), (variant, moved_embeddings)

    timed = [row["tokens_per_s"] for row in result.log[warmup:]]
    return {
        "variant": variant,
        "experts_implementation": model.config._experts_implementation,
        "layers_selected": None if variant == "full" else last_two,
        "trainable_tensors": len(trainable_names),
        "total_params": counts["total"],
        "trainable_params": counts["trainable"],
        "trainable_fraction": counts["trainable_fraction"],
        "per_expert_params": counts.get("per_expert"),
        "tokens_per_s": statistics.median(timed),
        "tokens_per_s_min": min(timed),
        "tokens_per_s_max": max(timed),
        "tokens_per_s_warmup": [row["tokens_per_s"] for row in result.log[:warmup]],
        "steps_run": result.steps,
        "steps_timed": len(timed),
        "tokens_per_step": train_settings.micro_batch_size * train_settings.seq_len * train_settings.grad_accum,
        "train_seconds": seconds,
        "final_loss": result.final_loss,
        "synthetic_tokens": n_tokens,
        "peak_rss_mib": rss_peak,
        "peak_cuda_mib": cuda_peak,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "step_seconds_median": statistics.median(train_settings.micro_batch_size * train_settings.seq_len / t
                                                 for t in timed),
        "rss_before_training_mib": rss_model,
        "torch_threads": torch.get_num_threads(),
        "experts_updated_in_last_layer": moved_experts,
        # 1-minute load average around the run: well above THREADS means another process shared the cores
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": load_after,
        # CPU seconds of this process per wall second of training: near THREADS on idle cores, lower when shared
        "cpu_per_wall_s": cpu_seconds / seconds,
    }


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per variant (default {DEFAULT_STEPS}; --quick {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"first steps left out of the median (default {DEFAULT_WARMUP}; --quick {QUICK_WARMUP})")
    add_output_arguments(parser)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        THREADS = QUICK_THREADS  # this process and its children (they get --quick too)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.steps <= args.warmup:
        parser.error("--steps must be greater than --warmup")
    architecture = QUICK_ARCHITECTURE if args.quick else ARCHITECTURE
    settings = QUICK_SETTINGS if args.quick else SETTINGS

    if args.variant:
        out = run_variant(args.variant, args.steps, args.warmup, architecture, settings)
        Path(args.result_file).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return
    out_dir = output_dir(args)

    results = {}
    with tempfile.TemporaryDirectory(prefix="moelang-train-bench-") as tmp:
        for variant in VARIANTS:  # one after the other: the two cores belong to one run at a time
            print(f"variant {variant}: {args.steps} steps ...", flush=True)
            result_file = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--result-file", str(result_file)] + (["--quick"] if args.quick else [])
            subprocess.run(cmd, check=True)
            results[variant] = json.loads(result_file.read_text(encoding="utf-8"))
            r = results[variant]
            print(f"  {r['tokens_per_s']:,.0f} tokens/s (median of {r['steps_timed']}), "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB, trainable {r['trainable_params']:,}, "
                  f"{r['cpu_per_wall_s']:.2f} CPU s per wall s", flush=True)
    contended = [v for v, r in results.items() if r["cpu_per_wall_s"] < CONTENDED_BELOW * THREADS]
    if contended:
        print(f"WARNING: {', '.join(contended)} got less than {CONTENDED_BELOW:.0%} of {THREADS} cores (another "
              f"process was running?): the throughputs are not comparable; run again on idle cores", file=sys.stderr)

    full, experts, control = results["full"], results["experts"], results["last2_all"]
    split = results["experts_split"]
    assert full["total_params"] == experts["total_params"] == control["total_params"] == split["total_params"]
    assert split["trainable_params"] == experts["trainable_params"]
    command = command_line("train_step.py")
    per_variant_keys = ("tokens_per_s", "step_seconds_median", "peak_rss_mib", "peak_cuda_mib", "trainable_params",
                        "trainable_fraction", "steps_timed")
    layers = experts["layers_selected"]
    result = {
        "command": command,
        "machine": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch_threads": THREADS},
        "model": {"family": "olmoe (transformers.OlmoeConfig)", **architecture,
                  "experts_implementation": full["experts_implementation"],
                  "total_params": full["total_params"], "per_expert_params": full["per_expert_params"]},
        "training": {**settings, "steps": args.steps, "warmup_steps_discarded": args.warmup,
                     "tokens_per_step": full["tokens_per_step"],
                     "engine": "moelang.train.train over moelang.train.PackedStream (synthetic tokens)"},
        "full": {"description": "all parameters trainable", **{k: full[k] for k in per_variant_keys}},
        "experts": {"description": f"experts {TRAINED_EXPERTS} + router of layers {layers} (train_only, expert-rows "
                                   f"parametrizations)", **{k: experts[k] for k in per_variant_keys}},
        "experts_split": {"description": f"the same selection as ExpertSubset: the chosen experts split into their "
                                         f"own small experts module", **{k: split[k] for k in per_variant_keys}},
        "last2_all": {"description": f"control: all experts + router of layers {layers} (same backward depth as "
                                     f"experts)", **{k: control[k] for k in per_variant_keys}},
        "contended_variants": contended,
        "speedup_experts_vs_full": experts["tokens_per_s"] / full["tokens_per_s"],
        "speedup_last2_all_vs_full": control["tokens_per_s"] / full["tokens_per_s"],
        "speedup_experts_vs_last2_all": experts["tokens_per_s"] / control["tokens_per_s"],
        "speedup_split_vs_rows": split["tokens_per_s"] / experts["tokens_per_s"],
        "peak_rss_split_minus_rows_mib": split["peak_rss_mib"] - experts["peak_rss_mib"],
        "peak_cuda_split_vs_rows": (split["peak_cuda_mib"] / experts["peak_cuda_mib"]
                                    if split["peak_cuda_mib"] and experts["peak_cuda_mib"] else None),
        "details": results,
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {THREADS} torch threads, Python {platform.python_version()}"
    if full["device"] == "cuda":
        machine += ", on the GPU"
    a = architecture
    model_text = (f"vocab {a['vocab_size']:,}, hidden {a['hidden_size']}, expert intermediate {a['intermediate_size']}, "
                  f"{a['num_hidden_layers']} layers, {a['num_attention_heads']} heads, {a['num_experts']} experts, "
                  f"top-{a['num_experts_per_tok']}, `{full['experts_implementation']}` experts")
    rows = "\n".join(
        f"| {name} | {what} | {r['trainable_params']:,} | {r['trainable_fraction']:.3f} | {r['tokens_per_s']:,.0f} "
        f"| {r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f} | {r['peak_rss_mib']:,.0f} "
        f"| {'-' if r['peak_cuda_mib'] is None else format(r['peak_cuda_mib'], ',.0f')} |"
        for name, what, r in (
            ("full", "everything", full),
            ("experts", f"experts {TRAINED_EXPERTS} + router, layers {layers} (rows parametrization)", experts),
            ("experts_split", f"the same, chosen experts split out (`ExpertSubset`)", split),
            ("last2_all (control)", f"all {a['num_experts']} experts + router, layers {layers}", control),
        ))
    section = f"""
## Training step (`benchmarks/train_step.py`)

Command: `{command}` ({machine}; median of steps {args.warmup + 1}-{args.steps}, the first {args.warmup} left out).
Model: OLMoE family from `OlmoeConfig`, {model_text}, **{full['total_params']:,}** parameters (`count_parameters`), fp32.
Each step is `moelang.train.train` on a `PackedStream` of synthetic tokens ({settings['micro_batch_size']} x {settings['seq_len']} = {full['tokens_per_step']:,} tokens),
AdamW, load-balancing loss. Each variant runs in its own process; peak RSS is that whole process (Python and torch included).

| variant | trains | params trained | fraction | tokens/s (median) | range | peak RSS (MiB) | peak GPU memory (MiB) |
|---|---|---:|---:|---:|---:|---:|---:|
{rows}

speedup_experts_vs_full = **{result['speedup_experts_vs_full']:.2f}x**
(control: last2_all vs full {result['speedup_last2_all_vs_full']:.2f}x, experts vs last2_all {result['speedup_experts_vs_last2_all']:.2f}x).
Split experts vs the rows parametrization: {result['speedup_split_vs_rows']:.2f}x the tokens/s, peak RSS {result['peak_rss_split_minus_rows_mib']:+,.0f} MiB{split_gpu_text(result)}.
{explanation(result)}{contention_note(contended)}
"""
    print(section)
    save_results("train_step", result, section, out_dir)


def split_gpu_text(result: dict) -> str:
    ratio = result["peak_cuda_split_vs_rows"]
    return "" if ratio is None else f", peak GPU memory {ratio:.2f}x"


def contention_note(contended: list[str]) -> str:
    if not contended:
        return ""
    return (f"\n**Warning:** {', '.join(contended)} shared the cores with another process during the run (CPU/wall "
            f"below {CONTENDED_BELOW:.0%} of {THREADS}); these numbers are not comparable.")


def explanation(result: dict) -> str:
    """One or two sentences; the mechanism is stated only where the numbers agree with it."""
    full, experts = result["full"], result["experts"]
    speedup = result["speedup_experts_vs_full"]
    same_depth = abs(result["speedup_experts_vs_last2_all"] - 1) <= 0.10
    n_layers = result["model"]["num_hidden_layers"]
    mem = experts["peak_rss_mib"] - full["peak_rss_mib"]
    mem_text = f"Peak RSS is {abs(mem):,.0f} MiB {'lower' if mem < 0 else 'higher'} than full training."
    if result["contended_variants"]:
        return "Another process shared the cores during this run, so no conclusion is drawn from it."
    if speedup > 1.10 and same_depth:
        return (f"Training {experts['trainable_fraction']:.1%} of the parameters is {speedup:.2f}x faster, not the "
                f"{1 / experts['trainable_fraction']:.0f}x the fraction would suggest: the gain comes from backward "
                f"stopping at the first trainable layer ({n_layers - 2} of {n_layers} layers skipped), not from "
                f"training fewer experts (the control training all {result['model']['num_experts']} experts of the "
                f"same layers is as fast, experts/control {result['speedup_experts_vs_last2_all']:.2f}x), because the "
                f"fused expert matmul computes the whole tensor's weight gradient either way. {mem_text}")
    if speedup > 1.10:
        return (f"Training {experts['trainable_fraction']:.1%} of the parameters is {speedup:.2f}x faster; the "
                f"control with all experts of the same layers trainable differs by "
                f"{result['speedup_experts_vs_last2_all']:.2f}x, so backward depth alone does not explain it. "
                f"{mem_text}")
    return (f"Training {experts['trainable_fraction']:.1%} of the parameters is not faster here ({speedup:.2f}x). "
            f"{mem_text}")


if __name__ == "__main__":
    main()

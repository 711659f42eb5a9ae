"""The resource plan's memory estimate (``moelang.plan``) against one measured training step on the CPU.

    .venv/bin/python benchmarks/plan_memory.py [--quick] [--out DIR]

Each case builds a small random model of the OLMoE or Qwen2 family (``moelang.models.init_model``),
prepares it with the stage's training method (full training, an expert subset with the router mask,
LoRA, LayerMoE's stage 1 on an upcycled Qwen2), and runs one step of the engine's own pieces
(``configure_loss``, ``make_optimizer``, ``apply_activation_checkpointing``, autocast as
``dtype`` says) in a subprocess of its own. Measured, without tracemalloc:

* **weights + gradients + optimizer**: the bytes of the distinct storages of the parameters, their
  ``.grad`` and AdamW's state tensors after the step;
* **activations**: what the forward pass keeps for the backward pass, on the second step: the distinct
  storages autograd saves (``torch.autograd.graph.saved_tensors_hooks``, parameters left out) and the
  outputs the step holds (logits, router logits). A checkpointed layer saves out of the hooks' sight,
  so with ``activation_checkpointing`` it is the heap's growth over the forward pass instead (glibc's
  ``mallinfo2``: every CPU tensor is a malloc block), in fp32: bf16 matmuls on the CPU grow oneDNN's
  primitive caches by megabytes a step (measured: 15-30 MB a step on the quick OLMoE, not freed),
  which are no activations and which a GPU run does not have;
* **peak RSS**: ``ru_maxrss`` after the step minus the RSS before the model was built (the whole
  process: it includes the allocator's slack and the backward pass's transients).

The plan's side is :func:`moelang.plan.training_memory` of the same model built on the meta device and
prepared by the same method. The issue's tolerances: weights + gradients + optimizer within 15%,
activations within 30%. Writes ``benchmarks/results/plan_memory.json`` and its section of
``benchmarks/RESULTS.md``. ``--quick`` runs the smallest shapes and only the cases ``QUICK_CASES`` (each
case is a process of its own, about 5 s of imports; ``tests/test_plan_measured.py`` runs seven cases at
these shapes in-process), results to ``--out`` or a temporary directory (see ``_results.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
from _results import add_output_arguments, command_line, output_dir, save_results  # noqa: E402

OLMOE = dict(vocab_size=8000, hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=256,
             num_hidden_layers=4, num_experts=16, num_experts_per_tok=4, max_position_embeddings=1024,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
QWEN2 = dict(vocab_size=8000, hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376,
             num_hidden_layers=4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
QUICK = {"hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 1000,
         "num_attention_heads": 4, "num_key_value_heads": 4}

# name -> (family, weights dtype, TrainSettings fields, method)
CASES = {
    "olmoe full fp32": ("olmoe", "float32", {"dtype": "fp32"}, "full"),
    "olmoe full bf16 weights": ("olmoe", "bfloat16", {"dtype": "bf16"}, "full"),
    "olmoe full bf16, aux + z-loss": ("olmoe", "bfloat16", {"dtype": "bf16", "aux_loss_coef": 0.01,
                                                            "z_loss_coef": 0.001}, "full"),
    "olmoe full fp32 weights, bf16 autocast": ("olmoe", "float32", {"dtype": "bf16"}, "full"),
    "olmoe full fp32, activation checkpointing": ("olmoe", "float32", {"dtype": "fp32",
                                                                       "activation_checkpointing": True}, "full"),
    "olmoe 4 experts of the last layer, router mask": ("olmoe", "bfloat16", {"dtype": "bf16", "aux_loss_coef": 0.0},
                                                       "subset"),
    "olmoe LoRA r8 on the last layer": ("olmoe", "bfloat16", {"dtype": "bf16", "aux_loss_coef": 0.0}, "lora"),
    "qwen2 full fp32": ("qwen2", "float32", {"dtype": "fp32"}, "full"),
    "qwen2 full bf16 weights": ("qwen2", "bfloat16", {"dtype": "bf16"}, "full"),
    "qwen2 full fp32, activation checkpointing": ("qwen2", "float32", {"dtype": "fp32",
                                                                       "activation_checkpointing": True}, "full"),
    "qwen2 upcycled, LayerMoE stage 1": ("qwen2", "bfloat16", {"dtype": "bf16", "aux_loss_coef": 0.01}, "stage1"),
}
# The paper architectures at their real widths (hidden 2,048, OLMoE's 64 experts of width 1,024 with
# top-8 and vocabulary 50,304; Qwen1.5-1.8B's FFN 5,504 and vocabulary 151,936), cut to one decoder
# layer as the rehearsals cut them (rehearsal/*.yaml), one sequence of 256 tokens as the rehearsals'
# adaptation steps: the plan checked at the shapes the paper configs run. Full runs only (each is a
# process of 3 to 11 GB).
REAL_WIDTH = {"olmoe": "allenai/OLMoE-1B-7B-0924", "qwen2": "Qwen/Qwen1.5-1.8B"}
REAL_WIDTH_CASES = {
    "OLMoE-1B-7B width, 1 layer: 4 experts, router mask": ("olmoe", "bfloat16", {"dtype": "bf16",
                                                                                  "aux_loss_coef": 0.0}, "subset"),
    "OLMoE-1B-7B width, 1 layer: full, checkpointing": ("olmoe", "bfloat16", {"dtype": "bf16", "aux_loss_coef": 0.01,
                                                                              "activation_checkpointing": True}, "full"),
    "Qwen1.5-1.8B width, 1 layer: LayerMoE stage 1": ("qwen2", "bfloat16", {"dtype": "bf16", "aux_loss_coef": 0.01,
                                                                             "activation_checkpointing": True}, "stage1"),
}
REAL_WIDTH_BATCH = (1, 256)


def real_width_fields(family: str) -> dict:
    """The shipped config.json of the family's paper architecture, one decoder layer."""
    from moelang.models.loading import KNOWN_CONFIGS

    shipped = json.loads((KNOWN_CONFIGS / (REAL_WIDTH[family].replace("/", "--") + ".json")).read_text())
    drop = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "max_window_layers"}
    return {k: v for k, v in shipped.items() if not k.startswith("_") and k not in drop} | {"num_hidden_layers": 1}


# --quick: the two cases with the most machinery of their own (the heap measurement of a checkpointed
# step; an upcycled model with LayerMoE's stage-1 method)
QUICK_CASES = ("olmoe full fp32, activation checkpointing", "qwen2 upcycled, LayerMoE stage 1")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def live_bytes() -> int:
    """Bytes the process has allocated with malloc and not freed (glibc's mallinfo2: the arenas' used
    blocks plus the mmapped ones); None where glibc has no mallinfo2."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def has_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def prepare(model, method: str):
    """The stage's training method applied to ``model`` (real or meta); returns the method."""
    from moelang.models import ModelAdapter
    from moelang.models.layermoe.admission import AdmittedExpertSubset
    from moelang.models.lora import LoRASettings, LoRATraining
    from moelang.models.methods import ExpertSubset, FullTraining

    last = ModelAdapter(model).num_layers - 1
    if method == "full":
        chosen = FullTraining()
    elif method == "subset":
        chosen = ExpertSubset(experts={last: [0, 1, 2, 3]}, routers=[last], mask_router=True)
    elif method == "lora":
        chosen = LoRATraining(LoRASettings(rank=8, alpha=16.0, targets=("experts", "router"), layers=1, seed=0))
    elif method == "stage1":
        adapter = ModelAdapter(model)
        grown = [m for m in adapter.moe_layers if m.num_experts > m.router.num_original]
        chosen = AdmittedExpertSubset(experts={m.index: list(range(m.router.num_original, m.num_experts)) for m in grown},
                                      routers=[m.index for m in grown], admit_steps=0)
    else:
        raise ValueError(method)
    chosen.prepare(model)
    return chosen


def build(family: str, fields: dict, dtype: str, method: str, meta: bool):
    import copy

    from moelang.models import build_config, init_model
    from moelang.models.layermoe.build import expand_model
    from moelang.plan import meta_model

    config = build_config({"model_type": family, **fields})
    model = meta_model(copy.deepcopy(config)) if meta else init_model(config, seed=0, dtype=dtype)
    if method == "stage1":
        model, _ = expand_model(model, [2] * fields["num_hidden_layers"], top_k=2)
    return model, prepare(model, method)


def _storages(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(family: str, fields: dict, dtype: str, settings_fields: dict, method: str, micro_batch: int,
            seq_len: int) -> dict:
    """One training step, measured (see the module docstring)."""
    import torch

    from moelang.options import TrainSettings
    from moelang.train import apply_activation_checkpointing, configure_loss, fp32_master_weights, make_optimizer

    torch.manual_seed(0)
    rss_start = _rss_bytes()
    settings = TrainSettings(steps=1, micro_batch_size=micro_batch, seq_len=seq_len, **settings_fields)
    model, chosen = build(family, fields, dtype, method, meta=False)
    apply_activation_checkpointing(model, settings)
    fp32_master_weights(model, settings)  # as the engine does: the optimizer steps fp32 copies of bf16 weights
    loss_fn = configure_loss(model, settings)
    optimizer = make_optimizer(model, settings)
    model.train()
    batch = torch.randint(3, fields["vocab_size"], (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.dtype == "bf16")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for _ in range(2):  # the second step is measured: the first makes the kernels' one-time caches
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        before = live_bytes()
        with cast, chosen.step_context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=batch, labels=batch)
            loss, _ = loss_fn(model, batch, out, ["x"] * micro_batch)
            heap = live_bytes() - before
            for tensor in [out.logits, *(getattr(out, "router_logits", None) or ())]:
                if tensor is not None:  # the outputs the step holds until its end
                    saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            loss.backward()
        del out, loss
        optimizer.step()
    # a checkpointed layer keeps its tensors out of the hooks' sight: there the heap's growth counts
    # (in fp32: bf16 matmuls on the CPU grow oneDNN's caches by megabytes a step, which are no activations)
    kept = heap if settings.activation_checkpointing else sum(saved.values())
    params = [p for p in model.parameters()]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": _storages(params), "gradients": _storages(p.grad for p in params),
            "optimizer": _storages(state), "activations": kept, "heap_growth_in_forward": heap,
            "peak_rss_delta": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start}


def planned(family: str, fields: dict, dtype: str, settings_fields: dict, method: str, micro_batch: int,
            seq_len: int) -> dict:
    """The plan's estimate of the same step (meta device)."""
    from moelang.options import TrainSettings
    from moelang.plan import Precision, RouterOutputs, model_shape, training_memory

    settings = TrainSettings(steps=1, micro_batch_size=micro_batch, seq_len=seq_len, **settings_fields)
    model, chosen = build(family, fields, dtype, method, meta=True)
    shape = model_shape(model)
    routers = RouterOutputs(aux=settings.aux_loss_coef > 0 and hasattr(model.config, "router_aux_loss_coef"),
                            z=settings.z_loss_coef > 0)
    memory, _ = training_memory(shape, settings, Precision.of(dtype, settings.dtype), routers, processes=1)
    return {"weights": memory.weights, "gradients": memory.gradients, "optimizer": memory.optimizer,
            "activations": memory.activations, "peak": memory.total}


def compare(name: str, quick: bool, micro_batch: int, seq_len: int) -> dict:
    if name in REAL_WIDTH_CASES:
        family, dtype, settings_fields, method = REAL_WIDTH_CASES[name]
        fields = real_width_fields(family)
        micro_batch, seq_len = REAL_WIDTH_BATCH
    else:
        family, dtype, settings_fields, method = CASES[name]
        fields = {**(OLMOE if family == "olmoe" else QWEN2), **(QUICK if quick else {})}
        if family == "qwen2" and quick:
            fields["intermediate_size"] = 176
    measured = measure(family, fields, dtype, settings_fields, method, micro_batch, seq_len)
    plan = planned(family, fields, dtype, settings_fields, method, micro_batch, seq_len)
    state = lambda d: d["weights"] + d["gradients"] + d["optimizer"]  # noqa: E731
    return {"case": name, "micro_batch": micro_batch, "seq_len": seq_len, "measured": measured, "plan": plan,
            "state_ratio": state(plan) / state(measured), "activation_ratio": plan["activations"] / measured["activations"],
            "peak_ratio_to_rss": plan["peak"] / measured["peak_rss_delta"] if measured["peak_rss_delta"] > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case in this process (the subprocess)
    args = parser.parse_args()
    micro_batch, seq_len = (2, 64) if args.quick else (4, 256)
    if args.case:
        print(json.dumps(compare(args.case, args.quick, micro_batch, seq_len)))
        return
    out_dir = output_dir(args)
    if not has_mallinfo2():
        sys.exit("benchmarks/plan_memory.py: needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
    rows = []
    for name in QUICK_CASES if args.quick else [*CASES, *REAL_WIDTH_CASES]:  # each case in a fresh process: its peak RSS is its own
        done = subprocess.run([sys.executable, __file__, "--case", name] + (["--quick"] if args.quick else []),
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{name:48} state x{row['state_ratio']:.3f}  activations x{row['activation_ratio']:.3f}  "
              f"(measured {row['measured']['activations'] / 1e6:.1f} MB)")
    result = {"machine": platform.platform(), "python": platform.python_version(), "micro_batch": micro_batch,
              "seq_len": seq_len, "cases": rows}
    lines = ["## Resource plan against measured training steps (`benchmarks/plan_memory.py`)", "",
             f"Command: `{command_line('plan_memory.py')}`. One training step per case on the CPU ({platform.machine()}), micro-batch {micro_batch} x {seq_len} "
             f"tokens (the real-width cases: their own); plan / measured (the issue's tolerances: state within 15%, activations within 30%).", "",
             "| case | weights+grads+optimizer, MB measured | plan / measured | activations, MB measured | "
             "plan / measured | plan peak / peak RSS delta |", "|---|---|---|---|---|---|"]
    for row in rows:
        m = row["measured"]
        state = (m["weights"] + m["gradients"] + m["optimizer"]) / 1e6
        rss = f"{row['peak_ratio_to_rss']:.2f}" if row["peak_ratio_to_rss"] else "-"
        label = row["case"] + (f" ({row['micro_batch']} x {row['seq_len']} tokens)" if row["case"] in REAL_WIDTH_CASES
                               else "")
        lines.append(f"| {label} | {state:.1f} | {row['state_ratio']:.3f} | {m['activations'] / 1e6:.1f} | "
                     f"{row['activation_ratio']:.3f} | {rss} |")
    save_results("plan_memory", result, "\n".join(lines), out_dir, indent=1)


if __name__ == "__main__":
    main()

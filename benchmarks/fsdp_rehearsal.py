"""Rehearse config/olmoe-m7.yaml's CPT on CPU: FSDP over 2 processes (gloo) at OLMoE-1B-7B's width.

    .venv/bin/python benchmarks/fsdp_rehearsal.py [--layers 2] [--seq-len 128] [--steps 6] [--checkpoint-every 2]
    .venv/bin/python benchmarks/fsdp_rehearsal.py --quick [--out DIR]  # toy width, about 30 s (the test suite runs it)

The model is OLMoE-1B-7B's architecture (``src/moelang/models/known_configs``: hidden 2,048, 64 experts,
top-8, expert width 1,024, vocabulary 50,304, 16 heads) with random weights, cut to ``--layers``
decoder layers, in bf16 as the paper config loads it (``model.dtype: bfloat16``). The training
settings are the paper config's ``model.cpt.train`` (AdamW, lr 1e-4, z-loss, load balancing, bf16
autocast, ``parallelism: fsdp``) with the steps, sequence length, batch and checkpoint interval cut,
and no warm-up, so that the few steps run at the paper's peak rate. The data: random tokens of two
languages. Every run is ``torchrun --standalone --nproc_per_node 2`` of :func:`moelang.train.train`,
exporting step 0 and the last step and publishing them as the CPT stage does.

1. **whole**: an uninterrupted run;
2. **killed**: the same run, whose launcher gets SIGKILL while it waits after the checkpoint of step
   ``--kill-at`` (as SLURM kills a job step: the workers die with it, see
   :func:`moelang.train.die_with_launcher`); the state's checkpoint is checked to be in the sharded
   form (one file of weights and one of AdamW state per process, each holding about 1/2 of every
   tensor's rows, exactly ``torch.chunk``'s);
3. **resumed**: the killed run started again with the same process count: its final export must
   equal the uninterrupted one's bit for bit, and its log's losses too.

Measured: each process's peak RSS, seconds per step, seconds per checkpoint, the checkpoint's and an
export's size on disk. Writes ``benchmarks/results/fsdp_rehearsal.json`` and the section of
``benchmarks/RESULTS.md``; ``--quick`` writes them to ``--out`` or a temporary directory (see ``_results.py``). Stops unless the memory it needs is available:
measured 8.8 GiB per process with 2 layers and 6.1 GiB with 1 (about 3.3 + 2.8 x layers), because
between micro-batches (``grad_accum`` > 1) FSDP2 keeps every process's gradient unsharded (the whole
model's, 2.1 GB at 2 layers), on top of its shards of weights, gradients and AdamW state (4.2 GB) and
the unsharded layer being computed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from _results import add_output_arguments, output_dir, save_results  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
KNOWN = ROOT / "src/moelang/models/known_configs/allenai--OLMoE-1B-7B-0924.json"
# the toy width of --quick: the same family and code paths, small enough for the test suite
TOY = {"hidden_size": 64, "intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512,
       "num_attention_heads": 4, "num_key_value_heads": 4}


def needed_gib(layers: int, processes: int) -> float:
    """Memory the OLMoE width needs: the measured peak RSS per process (1 layer: 6.05 GiB, 2: 8.84), and 1 GiB."""
    return processes * (3.3 + 2.8 * layers) + 1


# --------------------------------------------------------------------------------------------------
# The worker: one process of a torchrun job
# --------------------------------------------------------------------------------------------------

def worker(spec_path: str) -> None:
    import moelang.train as engine
    from moelang.models import build_config, init_model
    from moelang.train import PackedStream, TrainSettings, export_model, publish, staged_path, train

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    settings = TrainSettings.from_dict(spec["settings"])
    model = init_model(build_config(spec["architecture"]), seed=0, dtype=spec["model_dtype"])
    stream = PackedStream(spec["tokens"], settings.mixture, settings.seq_len, spec["architecture"]["eos_token_id"],
                          settings.seed)
    state_dir = spec["state_dir"]
    names = {0: "step-0", settings.steps: f"step-{settings.steps}"}
    exports = {step: (lambda m, sd, name=name: export_model(m, None, staged_path(state_dir, name), state_dict=sd))
               for step, name in names.items()}

    checkpoint_seconds = []
    save = engine.save_sharded_checkpoint

    def timed_save(path, *args, **kwargs):
        start = time.perf_counter()
        save(path, *args, **kwargs)
        checkpoint_seconds.append(time.perf_counter() - start)
        if spec["pause_after"] is not None and path.name == f"step-{spec['pause_after']}":
            (Path(spec["work"]) / f"paused-rank{rank}").write_text(path.name)
            time.sleep(3600)  # the driver kills the launcher now: a job killed after a checkpoint

    engine.save_sharded_checkpoint = timed_save  # _train looks it up in the module when it checkpoints
    result = train(model, stream, settings, state_dir, export_steps=exports)
    if rank == 0:
        publish(state_dir, {name: Path(spec["out"]) / name for name in names.values()})
    step_tokens = settings.seq_len * settings.micro_batch_size * settings.grad_accum * int(os.environ["WORLD_SIZE"])
    trained = result.log[result.resumed_from or 0:]
    metrics = {"rank": rank, "resumed_from": result.resumed_from,
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "step_seconds": [step_tokens / row["tokens_per_s"] for row in trained],
               "checkpoint_seconds": checkpoint_seconds, "log": result.log}
    (Path(spec["work"]) / f"{spec['name']}-rank{rank}.json").write_text(json.dumps(metrics))


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------

def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def architecture(args) -> dict:
    fields = {k: v for k, v in json.loads(KNOWN.read_text()).items() if k not in ("_comment", "architectures")}
    fields["num_hidden_layers"] = args.layers
    if args.quick:
        fields |= TOY
        fields["eos_token_id"] = TOY["vocab_size"] - 1
    return fields


def paper_settings(args) -> dict:
    import yaml

    train = yaml.safe_load((ROOT / "config/olmoe-m7.yaml").read_text())["model"]["cpt"]["train"]
    return train | {"steps": args.steps, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
                    "grad_accum": args.grad_accum, "checkpoint_every": args.checkpoint_every, "warmup_steps": 0,
                    "keep_last_states": 1, "seed": 0, "mixture": {"en": 1.0, "es": 1.0}}


def write_tokens(path: Path, vocab: int, seed: int, docs: int = 400) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moelang.tokenize import TOKENS_SCHEMA

    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab - 1, size=int(rng.integers(20, 200))).astype("int32").tolist() for _ in range(docs)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(docs)], "split": ["train"] * docs,
                             "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                             "n_tokens": pa.array([len(d) for d in ids], type=pa.int32())}, schema=TOKENS_SCHEMA), path)
    return str(path)


def launch(work: Path, name: str, spec: dict, nproc: int) -> subprocess.Popen:
    spec = spec | {"name": name, "out": str(work / f"out-{name}")}
    (work / f"{name}.spec.json").write_text(json.dumps(spec))
    log = (work / f"{name}.log").open("w")
    return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(Path(__file__).resolve()),
                             "--worker", str(work / f"{name}.spec.json")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}, start_new_session=True)


def finish(process: subprocess.Popen, work: Path, name: str) -> None:
    if process.wait() != 0:
        raise SystemExit(f"fsdp_rehearsal: the {name} run failed (exit {process.returncode}); its log: "
                         f"{work / f'{name}.log'}\n" + (work / f"{name}.log").read_text()[-3000:])


def workers_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def check_sharded_layout(checkpoint: Path, architecture_fields: dict, nproc: int) -> dict:
    """The checkpoint is the sharded form: per process one weights file and one AdamW file, each
    process's rows of every tensor as torch.chunk cuts them (computed here from the model's shapes,
    on the meta device), no whole-tensor file. Returns each process's share and file sizes."""
    import torch
    from safetensors import safe_open

    from moelang.models import build_config
    from moelang.train import shard_file

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in
                  AutoModelForCausalLM.from_config(build_config(architecture_fields)).named_parameters()}
    names = sorted(p.name for p in checkpoint.iterdir())
    expected = sorted([shard_file(kind, r, nproc) for kind in ("trainable", "optimizer") for r in range(nproc)]
                      + ["rng.safetensors", "state.json", "train_log.parquet"])
    assert names == expected, f"checkpoint files {names}, expected {expected}"
    total = sum(torch.Size(s).numel() for s in shapes.values())
    shares, sizes = [], {}
    for rank in range(nproc):
        numel = 0
        for kind in ("trainable", "optimizer"):
            path = checkpoint / shard_file(kind, rank, nproc)
            sizes[path.name] = path.stat().st_size
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    name, stat = (key, None) if kind == "trainable" else key.rsplit(".", 1)
                    shape = tuple(f.get_slice(key).get_shape())
                    if stat == "step":
                        continue
                    rows = torch.chunk(torch.empty(shapes[name][0], device="meta"), nproc)[rank].shape[0]
                    assert shape == (rows, *shapes[name][1:]), f"{path.name}: {key} is {shape}, expected {rows} rows"
                    numel += torch.Size(shape).numel() if kind == "trainable" else 0
            if kind == "trainable":
                with safe_open(str(path), "pt") as f:
                    assert set(f.keys()) == set(shapes), f"{path.name} lacks tensors"
        shares.append(numel / total)
    assert all(abs(share - 1 / nproc) < 0.02 for share in shares), shares
    return {"parameter_share_per_rank": shares, "file_bytes": sizes, "parameters": total}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_output_arguments(parser)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=4, help="the checkpoint step after which the launcher is killed")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not 0 < args.kill_at < args.steps or args.kill_at % args.checkpoint_every:
        raise SystemExit("fsdp_rehearsal: --kill-at must be a checkpoint step before the last step")
    out_dir = output_dir(args)
    if not args.quick and available_gib() < needed_gib(args.layers, args.nproc):
        raise SystemExit(f"fsdp_rehearsal: {available_gib():.1f} GiB of memory available, the OLMoE width with "
                         f"{args.layers} layers needs {needed_gib(args.layers, args.nproc):.0f}; wait for other jobs, "
                         f"use --layers 1, or --quick")
    import torch
    from safetensors.torch import load_file

    work = Path(args.work or tempfile.mkdtemp(prefix="fsdp-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    fields = architecture(args)
    spec = {"architecture": fields, "model_dtype": "bfloat16", "settings": paper_settings(args), "work": str(work),
            "tokens": {lang: write_tokens(work / f"{lang}.parquet", fields["vocab_size"], seed)
                       for seed, lang in enumerate(("en", "es"))}, "pause_after": None}
    try:
        started = time.perf_counter()
        finish(launch(work, "whole", spec | {"state_dir": str(work / "state-whole")}, args.nproc), work, "whole")
        whole_seconds = time.perf_counter() - started

        killed_spec = spec | {"state_dir": str(work / "state-killed"), "pause_after": args.kill_at}
        launcher = launch(work, "killed", killed_spec, args.nproc)
        deadline = time.time() + 1800
        while not all((work / f"paused-rank{r}").is_file() for r in range(args.nproc)):
            if launcher.poll() is not None or time.time() > deadline:
                finish(launcher, work, "killed")
                raise SystemExit("fsdp_rehearsal: the killed run ended before its checkpoint")
            time.sleep(0.05)
        workers = workers_of(launcher.pid)
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's process group, as a scheduler kills a job
        launcher.wait()
        deadline = time.time() + 30
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert workers and not any(alive(pid) for pid in workers), "workers outlived their launcher"
        state = work / "state-killed"
        # killed between writing the checkpoint and pruning the one before it (keep_last_states: 1 keeps
        # up to 2 while one is written): the newest is the one to resume from
        checkpoints = sorted(int(p.name.split("-")[1]) for p in state.glob("step-*"))
        assert checkpoints[-1] == args.kill_at and len(checkpoints) <= 2, checkpoints
        layout = check_sharded_layout(state / f"step-{args.kill_at}", fields, args.nproc)
        checkpoint_bytes = directory_bytes(state / f"step-{args.kill_at}")

        resumed_spec = spec | {"state_dir": str(state)}
        finish(launch(work, "killed", resumed_spec, args.nproc), work, "resumed")  # same name: same outputs
        assert not state.exists(), "the state outlived publishing"

        whole = [json.loads((work / f"whole-rank{r}.json").read_text()) for r in range(args.nproc)]
        resumed = [json.loads((work / f"killed-rank{r}.json").read_text()) for r in range(args.nproc)]
        assert resumed[0]["resumed_from"] == args.kill_at, resumed[0]["resumed_from"]
        final = f"step-{args.steps}"
        a = load_file(str(work / "out-whole" / final / "model.safetensors"))
        b = load_file(str(work / "out-killed" / final / "model.safetensors"))
        start = load_file(str(work / "out-whole" / "step-0" / "model.safetensors"))
        assert a.keys() == b.keys() == start.keys()
        differing = sorted(k for k in a if not torch.equal(a[k], b[k]))
        strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
        log_equal = strip(whole[0]["log"]) == strip(resumed[0]["log"])
        changed = sum(int((a[k] != start[k]).sum()) for k in a) / sum(t.numel() for t in a.values())
        result = {
            "command": "benchmarks/fsdp_rehearsal.py" + (" --quick" if args.quick else "")
            + f" --layers {args.layers} --seq-len {args.seq_len} --micro-batch {args.micro_batch} --grad-accum "
              f"{args.grad_accum} --steps {args.steps} --checkpoint-every {args.checkpoint_every} --kill-at "
              f"{args.kill_at} --nproc {args.nproc}",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per process",
            "architecture": fields, "parameters": layout["parameters"],
            "model_dtype": "bfloat16", "train_dtype": spec["settings"]["dtype"],
            "tokens_per_step": args.seq_len * args.micro_batch * args.grad_accum * args.nproc,
            "bit_identical_weights": not differing, "differing_tensors": differing, "log_identical": log_equal,
            "losses": [r["loss"] for r in whole[0]["log"]],
            "fraction_of_weights_changed_by_training": changed,
            "resumed_from": resumed[0]["resumed_from"], "states_when_killed": [f"step-{c}" for c in checkpoints],
            "peak_rss_bytes_per_rank": [m["peak_rss_bytes"] for m in whole],
            "peak_rss_bytes_per_rank_resumed": [m["peak_rss_bytes"] for m in resumed],
            "seconds_per_step_median": statistics.median(whole[0]["step_seconds"]),
            "checkpoint_seconds": whole[0]["checkpoint_seconds"],
            "checkpoint_bytes": checkpoint_bytes, "checkpoint_files": layout["file_bytes"],
            "parameter_share_per_rank": layout["parameter_share_per_rank"],
            "export_bytes": directory_bytes(work / "out-whole" / final),
            "whole_run_seconds": whole_seconds,
        }
        print(json.dumps({k: v for k, v in result.items() if k not in ("architecture", "losses")}, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        if differing or not log_equal:
            raise SystemExit(f"fsdp_rehearsal: the resumed run differs from the uninterrupted one: {differing[:5]}, "
                             f"log equal: {log_equal}")
        save_results("fsdp_rehearsal", result, results_section(result), out_dir, indent=1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def results_section(result: dict) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    arch = result["architecture"]
    return f"""
## FSDP CPT rehearsal at OLMoE-1B-7B's width (`benchmarks/fsdp_rehearsal.py`)

Command: `.venv/bin/python {result['command']}` ({result['machine']}).
Model: OLMoE-1B-7B's architecture with random weights, hidden {arch['hidden_size']}, {arch['num_experts']} experts,
top-{arch['num_experts_per_tok']}, expert width {arch['intermediate_size']}, vocabulary {arch['vocab_size']:,},
{arch['num_attention_heads']} heads, cut to {arch['num_hidden_layers']} layers: **{result['parameters']:,}** parameters,
bf16 weights (`model.dtype: bfloat16`), `model.cpt.train` of `config/olmoe-m7.yaml` (bf16 autocast, `parallelism: fsdp`)
with {result['tokens_per_step']} tokens per step, 2 processes (torchrun, gloo).

| measure | value |
|---|---|
| final export after a SIGKILL at step {result['resumed_from']} and a restart, against an uninterrupted run | {'bit-identical' if result['bit_identical_weights'] else 'DIFFERENT'} weights, {'identical' if result['log_identical'] else 'DIFFERENT'} train log |
| weight elements changed by the {len(result['losses'])} steps | {result['fraction_of_weights_changed_by_training']:.1%} |
| peak RSS per process (uninterrupted run) | {', '.join(gib(b) for b in result['peak_rss_bytes_per_rank'])} GiB |
| peak RSS per process (resumed run) | {', '.join(gib(b) for b in result['peak_rss_bytes_per_rank_resumed'])} GiB |
| seconds per step (median) | {result['seconds_per_step_median']:.1f} |
| seconds per checkpoint | {', '.join(f'{s:.1f}' for s in result['checkpoint_seconds'])} |
| checkpoint on disk (sharded: weights + AdamW state per process) | {gib(result['checkpoint_bytes'])} GiB |
| parameter share of each process's shard | {', '.join(f'{s:.4f}' for s in result['parameter_share_per_rank'])} |
| one export on disk (safetensors, bf16) | {gib(result['export_bytes'])} GiB |

The checkpoint is {result['checkpoint_bytes'] / result['parameters']:.2f} bytes a parameter (the fp32 master weights and AdamW's
two fp32 moments: 12, the arithmetic of config/README.md's "Disk" section), the export {result['export_bytes'] / result['parameters']:.2f}.
The peak RSS of a process is its shards of the weights, gradients and AdamW state (4 x 1/2 of the
bf16 weights' size) plus, between micro-batches, the whole model's gradient unsharded: with gradient
sync off (every micro-batch but the last) FSDP2 accumulates gradients unsharded and reduce-scatters
them once. At OLMoE-1B-7B's 16 layers that buffer is 13.8 GB on every GPU, whatever the GPU count.
Seconds per step: 2 shared cores, other jobs running.
"""


if __name__ == "__main__":
    main()

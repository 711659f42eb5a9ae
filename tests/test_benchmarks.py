"""Every benchmark keeps working: its quick form (``python benchmarks/<name>.py --quick --out DIR``, run the
way a user runs it) exits 0 and writes a JSON with the keys of the committed full form's
(``benchmarks/results/<name>.json``), finite numbers, the ones that count something positive, derived
numbers that agree with what they are derived from, and nothing written into the committed results.
No timing is asserted: a quick form's numbers measure nothing (a toy size, other jobs on the cores).
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
RESULTS_MD = BENCHMARKS / "RESULTS.md"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))

# Numbers that count or time something, so must be > 0 ("*" matches any key at its level).
POSITIVE = {
    "adapt_step": ["ssft_speedup_vs_full", "ssft_fraction_of_flop_limit", "full_over_ssft_peak_memory",
                   "sweep_time_vs_separate", "flops.*_per_token", "flops.limit", "model.total_params",
                   "details.*.tokens_per_s", "details.*.seconds", "details.*.peak_rss_mib", "details.full.trainable_params",
                   "details.ssft.trainable_params", "details.aeft.trainable_params", "details.lora.trainable_params",
                   "benchmark_seconds"],
    "fsdp_rehearsal": ["parameters", "tokens_per_step", "fraction_of_weights_changed_by_training", "resumed_from",
                       "peak_rss_bytes_per_rank.*", "peak_rss_bytes_per_rank_resumed.*", "seconds_per_step_median",
                       "checkpoint_seconds.*", "checkpoint_bytes", "checkpoint_files.*", "parameter_share_per_rank.*",
                       "export_bytes", "whole_run_seconds", "losses.*"],
    "expand_step": ["stage1.*.tokens_per_s", "stage1.*.trained_params", "stage1.*.total_params",
                    "stage1.*.grad_and_adam_mib", "stage1.*.new_slot_fraction", "flops_per_token.*", "speedup",
                    "fraction_of_flop_limit", "byte_ratio", "forward.*.tokens_per_s", "forward.*.seconds",
                    "forward_flop_ratio", "forward_slowdown"],
    "plan_memory": ["micro_batch", "seq_len", "cases.*.measured.weights", "cases.*.measured.gradients",
                    "cases.*.measured.optimizer", "cases.*.measured.activations", "cases.*.plan.*",
                    "cases.*.state_ratio", "cases.*.activation_ratio"],
    "routing_profile": ["models.*.parameters", "models.*.tokens", "models.*.tokens_per_s.*",
                        "models.*.fraction_of_forward", "models.*.speedup_vs_naive", "speedup_vs_naive",
                        "fraction_of_forward"],
    "sharding": ["docs_in", "docs_kept", "tokens", "shards", "cores", "repeats", "best.*.*"],
    "tokenize_overlap": ["n_docs", "n_chars", "n_tokens", "repeats", "seconds.*", "tokens_per_s.*",
                         "speedup_vs_naive", "fraction_of_encode_batch", "naive_over_encode_batch"],
    "train_step": ["model.total_params", "training.steps", "full.tokens_per_s", "experts.tokens_per_s",
                   "experts_split.tokens_per_s", "last2_all.tokens_per_s", "*.trainable_params", "*.peak_rss_mib",
                   "speedup_*_vs_*", "details.*.tokens_per_s", "details.*.train_seconds", "details.*.final_loss"],
}
# Maps whose keys are names a form chooses (routing_profile's models: toy ones in the quick form), not
# fields: their entries are compared with each other's shape instead of by name.
NAMED_ENTRIES = {"routing_profile": {"models"}}


def snapshot() -> dict[str, bytes]:
    return {str(p.relative_to(BENCHMARKS)): p.read_bytes() for p in [RESULTS_MD, *sorted(RESULTS.glob("*"))]}


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def shape(value, path: str = "", named: frozenset = frozenset()):
    """The JSON's keys and value kinds, nested; a named map becomes ``{"<entry>": the entries' shape}``,
    a list of maps ``{"<item>": the items' shape}``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        shapes = [shape(v, f"{path}[]", named) for v in value]
        assert all(s == shapes[0] for s in shapes), f"{path}: items of different shapes"
        return {"<item>": shapes[0]}
    if not isinstance(value, dict):
        return kind(value)
    if path in named:
        shapes = [shape(v, f"{path}.<entry>", named) for v in value.values()]
        assert shapes and all(s == shapes[0] for s in shapes), f"{path}: entries of different shapes"
        return {"<entry>": shapes[0]}
    return {key: shape(v, f"{path}.{key}".lstrip("."), named) for key, v in value.items()}


def shape_differences(quick, full, path: str = "") -> list[str]:
    """Where the quick form's shape differs from the full form's (a null matches any kind: a GPU
    number on one machine is null on another)."""
    if isinstance(quick, dict) and isinstance(full, dict):
        out = [f"{path}.{k}".lstrip(".") + ": only in the full form" for k in full if k not in quick]
        out += [f"{path}.{k}".lstrip(".") + ": only in the quick form" for k in quick if k not in full]
        for key in quick.keys() & full.keys():
            out += shape_differences(quick[key], full[key], f"{path}.{key}".lstrip("."))
        return out
    if quick == full or "null" in (quick, full):
        return []
    return [f"{path}: {quick} in the quick form, {full} in the full form"]


def numbers(value, path: str = ""):
    """Every number in the JSON, with its dotted path."""
    if isinstance(value, dict):
        for key, v in value.items():
            yield from numbers(v, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")
    elif kind(value) == "number":
        yield path, value


def at(value, pattern: str, path: str = ""):
    """The (path, value) pairs a dotted pattern names; ``*`` in a part matches like a shell glob (a list's
    items are named by their index)."""
    head, _, rest = pattern.partition(".")
    regex = re.compile(re.escape(head).replace(r"\*", ".*") + r"\Z")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in ((str(k), v) for k, v in items):
        if regex.match(key):
            here = f"{path}.{key}".lstrip(".")
            if rest:
                yield from at(v, rest, here)
            else:
                yield here, v


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def consistent(name: str, r: dict) -> None:
    """Derived numbers agree with what they are derived from, and the facts a benchmark checks hold."""
    if name == "tokenize_overlap":
        assert r["languages"] == ["en", "es"]
        for way in ("moelang", "naive", "encode_batch"):  # every way counted the same tokens
            assert close(r["tokens_per_s"][way] * r["seconds"][way], r["n_tokens"]), way
        assert close(r["speedup_vs_naive"], r["seconds"]["naive"] / r["seconds"]["moelang"])
        assert close(r["fraction_of_encode_batch"], r["seconds"]["encode_batch"] / r["seconds"]["moelang"])
    elif name == "train_step":
        d = r["details"]
        assert d["full"]["trainable_params"] == d["full"]["total_params"] == r["model"]["total_params"]
        assert d["experts"]["trainable_params"] == d["experts_split"]["trainable_params"]
        assert d["experts"]["trainable_params"] < d["last2_all"]["trainable_params"] < d["full"]["trainable_params"]
        assert d["experts"]["experts_updated_in_last_layer"] == [0, 1]
        assert close(r["speedup_experts_vs_full"], d["experts"]["tokens_per_s"] / d["full"]["tokens_per_s"])
        assert all(v["steps_timed"] == r["training"]["steps"] - r["training"]["warmup_steps_discarded"]
                   for v in d.values())
    elif name == "adapt_step":
        d, f = r["details"], r["flops"]
        assert close(f["limit"], f["full_step_per_token"] / f["ssft_step_per_token"])
        assert close(r["ssft_speedup_vs_full"], d["ssft"]["tokens_per_s"] / d["full"]["tokens_per_s"])
        assert close(r["ssft_fraction_of_flop_limit"], r["ssft_speedup_vs_full"] / f["limit"])
        assert d["ssft"]["trainable_params"] < d["aeft"]["trainable_params"] < d["full"]["trainable_params"]
        # the shared-pass sweep trains the same runs as separate ones
        assert r["sweep_final_loss_max_difference"] <= 1e-5
    elif name == "expand_step":
        s = r["stage1"]
        assert s["split"]["trained_params"] < s["masked"]["trained_params"]
        assert s["split"]["total_params"] == s["masked"]["total_params"]
        assert 0 < s["split"]["new_slot_fraction"] < 1
        assert close(r["speedup"], s["split"]["tokens_per_s"] / s["masked"]["tokens_per_s"])
        assert close(r["byte_ratio"], s["masked"]["grad_and_adam_mib"] / s["split"]["grad_and_adam_mib"])
        assert r["flops_per_token"]["split"] < r["flops_per_token"]["masked"]
    elif name == "routing_profile":
        for model in r["models"].values():
            assert model["counts_agree"] is True  # the profiler and the usual loop count the same experts
            assert model["tokens"] == 2048
        assert r["speedup_vs_naive"] == list(r["models"].values())[-1]["speedup_vs_naive"]
    elif name == "fsdp_rehearsal":  # the checks of tests/test_multiprocess.py's run of the same form
        assert r["bit_identical_weights"] and r["log_identical"] and r["resumed_from"] == 4
        assert r["states_when_killed"] == ["step-2", "step-4"]
        assert r["parameter_share_per_rank"] == [0.5, 0.5]
        # a state is 3 fp32 tensors a parameter: the master weights and AdamW's two moments (config/README.md)
        assert 12 * r["parameters"] < r["checkpoint_bytes"] < 12 * r["parameters"] + 200_000
    elif name == "plan_memory":
        for case in r["cases"]:  # the tolerances: state within 15%, activations within 30%
            state = lambda d: d["weights"] + d["gradients"] + d["optimizer"]  # noqa: E731
            assert close(case["state_ratio"], state(case["plan"]) / state(case["measured"]))
            assert abs(case["state_ratio"] - 1) <= 0.15 and abs(case["activation_ratio"] - 1) <= 0.30, case["case"]
    elif name == "sharding":
        assert r["docs_in"] == 2200 and r["docs_kept"] == 2000  # the 10% duplicates removed, across parts
        best = r["best"]["sharded"]  # each time the best of the repeats on its own
        for stage in ("corpus", "tokenize"):
            assert best[f"{stage}_s"] >= best[f"{stage}_parts_s"] + best[f"{stage}_gather_s"] - 1e-9


def test_every_benchmark_is_checked_here_and_run_by_make_bench():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    listed = re.search(r"^BENCHMARKS\s*:=\s*(.+)$", makefile, re.M)
    assert listed, "Makefile: no BENCHMARKS list"
    assert sorted(listed.group(1).split()) == SCRIPTS
    assert sorted(POSITIVE) == SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_form_runs_and_writes_the_full_forms_keys(name, tmp_path):
    committed = snapshot()
    proc = run_benchmark(name, "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stderr[-4000:]}"
    assert snapshot() == committed, "a quick run wrote into benchmarks/results or RESULTS.md"
    result = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
    assert (tmp_path / f"{name}.md").read_text(encoding="utf-8").startswith("## ")
    assert "--quick" in result.get("command", "--quick")  # sharding and plan_memory record no command

    named = frozenset(NAMED_ENTRIES.get(name, ()))
    full = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    differences = shape_differences(shape(result, named=named), shape(full, named=named))
    assert not differences, (f"{name}: the quick JSON's keys differ from benchmarks/results/{name}.json (if the "
                             f"full form changed on purpose, run it: make bench):\n" + "\n".join(differences))

    not_finite = [path for path, v in numbers(result) if not math.isfinite(v)]
    assert not not_finite, f"{name}: not finite: {not_finite}"
    for pattern in POSITIVE[name]:
        found = list(at(result, pattern))
        assert found, f"{name}: nothing at {pattern}"
        bad = [(path, v) for path, v in found if kind(v) != "number" or not v > 0]
        assert not bad, f"{name}: not a positive number: {bad}"
    consistent(name, result)


def test_quick_form_refuses_the_committed_results(tmp_path):
    committed = snapshot()
    proc = run_benchmark("sharding", "--quick", "--out", str(RESULTS))
    assert proc.returncode != 0
    assert "--quick never writes into" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot() == committed

"""The plan's memory against one measured CPU training step of small OLMoE- and Qwen2-family models
(``benchmarks/plan_memory.py``, its quick shapes): weights + gradients + AdamW state within 15% of the
storages the step holds, activations within 30% of what the forward keeps for the backward pass (the
issue's tolerances)."""


import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("plan_memory")


@pytest.mark.parametrize("case", [
    "olmoe full bf16, aux + z-loss",
    "olmoe full fp32 weights, bf16 autocast",
    "olmoe 4 experts of the last layer, router mask",
    "olmoe LoRA r8 on the last layer",
    "olmoe full fp32, activation checkpointing",
    "qwen2 full fp32",
    "qwen2 upcycled, LayerMoE stage 1",
])
def test_plan_against_a_measured_step(bench, case):
    if "checkpointing" in case and not bench.has_mallinfo2():
        pytest.skip("the checkpointed case reads the heap with glibc's mallinfo2")
    row = bench.compare(case, quick=True, micro_batch=2, seq_len=64)
    assert row["state_ratio"] == pytest.approx(1.0, abs=0.15), row
    assert row["activation_ratio"] == pytest.approx(1.0, abs=0.30), row

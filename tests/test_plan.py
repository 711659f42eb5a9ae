"""``moelang plan``: parameter counts against the published sizes and the configs' arithmetic, the
memory and FLOP formulas against hand computations, the start-up check. Meta-device models only."""

import math

import pyarrow.parquet as pq
import pytest

from moelang import config as cfg
from moelang import plan as P
from moelang.models import load_config
from moelang.options import TrainSettings

OLMOE, QWEN = "allenai/OLMoE-1B-7B-0924", "Qwen/Qwen1.5-1.8B"


def shape_of(name):
    return P.model_shape(P.meta_model(load_config(name, known_first=True)))


@pytest.fixture(scope="module")
def olmoe():
    from moelang.models.methods import FullTraining

    model = P.meta_model(load_config(OLMOE, known_first=True))
    FullTraining().prepare(model)
    return P.model_shape(model)


@pytest.fixture(scope="module")
def m7_plan(repo_root):
    return P.plan_config(P.load_config(repo_root / "config" / "olmoe-m7.yaml"))


@pytest.fixture(scope="module")
def qwen_plan(repo_root):
    return P.plan_config(P.load_config(repo_root / "config" / "layermoe-qwen.yaml"))


@pytest.fixture(scope="module")
def repo_root():
    from conftest import REPO

    return REPO


def test_published_sizes(olmoe):
    # OLMoE-1B-7B: 6.9B parameters, 1.3B active (embeddings included); Qwen1.5-1.8B: 1.8B
    assert olmoe.total == pytest.approx(6.9e9, rel=0.01)
    assert olmoe.active + olmoe.embed == pytest.approx(1.3e9, rel=0.03)
    assert shape_of(QWEN).total == pytest.approx(1.8e9, rel=0.025)


def test_counts_equal_the_architecture_arithmetic(olmoe):
    # independent: the OLMoE config's numbers multiplied out (q/k/v/o, q and k norms, two layer norms,
    # 64 experts of gate, up and down, the router; embeddings, head, final norm)
    v, h, i, e, k, layers = 50304, 2048, 1024, 64, 8, 16
    per_layer = 4 * h * h + 2 * h + 2 * h + e * 3 * h * i + e * h
    assert olmoe.total == layers * per_layer + 2 * v * h + h
    assert olmoe.active == layers * (4 * h * h + 2 * h + k * 3 * h * i + e * h) + v * h
    qwen = shape_of(QWEN)
    h, i, v, layers = 2048, 5504, 151936, 24
    assert qwen.total == layers * (4 * h * h + 3 * h + 3 * h * i + 2 * h) + 2 * v * h + h  # q, k, v have biases


def test_state_memory_per_precision_and_parallelism(olmoe):
    n = olmoe.total
    settings = TrainSettings(steps=10, seq_len=128, micro_batch_size=1)
    fp32, _ = P.training_memory(olmoe, settings, P.Precision.of("float32", "fp32"), P.RouterOutputs(), 1)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)  # 16 bytes a parameter
    # bf16 weights under autocast: the trainable ones become fp32 master weights (moelang.train), so
    # full training is 16 bytes a parameter whatever model.dtype is
    bf16, _ = P.training_memory(olmoe, settings.replace(dtype="bf16"), P.Precision.of("bfloat16", "bf16"),
                                P.RouterOutputs(), 1)
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (4 * n, 4 * n, 8 * n)
    # FSDP over 8 GPUs shards weights and moments; accumulating micro-batches keeps unsharded gradients
    fsdp = settings.replace(dtype="bf16", parallelism="fsdp", grad_accum=4)
    sharded, notes = P.training_memory(olmoe, fsdp, P.Precision.of("bfloat16", "bf16"), P.RouterOutputs(), 8)
    assert (sharded.weights, sharded.optimizer) == (4 * n / 8, 8 * n / 8)
    assert sharded.gradients == 4 * n + 4 * n / 8 and "unsharded gradients" in notes[0]
    one_micro_batch, _ = P.training_memory(olmoe, fsdp.replace(grad_accum=1), P.Precision.of("bfloat16", "bf16"),
                                           P.RouterOutputs(), 8)
    assert one_micro_batch.gradients == 4 * n / 8
    ddp, _ = P.training_memory(olmoe, settings.replace(dtype="bf16"), P.Precision.of("bfloat16", "bf16"),
                               P.RouterOutputs(), 2)
    assert ddp.weights == 4 * n and ddp.gradients == 8 * n  # a replica, gradients and DDP's buckets


def test_activations_scale_with_the_tokens_and_checkpointing_cuts_them(olmoe):
    p = P.Precision.of("bfloat16", "bf16")
    base = TrainSettings(steps=1, seq_len=2048, micro_batch_size=1, dtype="bf16")
    one, _ = P.training_memory(olmoe, base, p, P.RouterOutputs(), 1)
    four, _ = P.training_memory(olmoe, base.replace(micro_batch_size=4), p, P.RouterOutputs(), 1)
    copies = 2 * olmoe.trainable  # autocast's bf16 copies of the fp32 master weights, once per step
    assert four.activations - copies == pytest.approx(4 * (one.activations - copies))
    kept = P.activation_bytes_per_token(olmoe, p, P.RouterOutputs(), checkpointing=False)
    checkpointed = P.activation_bytes_per_token(olmoe, p, P.RouterOutputs(), checkpointing=True)
    # checkpointed: each layer's input (2 bytes x hidden) and the head's logits, log-probabilities
    head = P.head_activation_bytes(olmoe, p) + 8
    assert checkpointed.kept == pytest.approx(16 * 2 * 2048 + head)
    assert kept.kept > 8 * checkpointed.kept
    # the recomputed layer is a transient of the backward pass: the largest layer's activations
    assert checkpointed.transient >= max(P.layer_activation_bytes(layer, olmoe, p, P.RouterOutputs(), True)
                                         for layer in olmoe.layers)


def test_full_training_flops_are_six_n_plus_attention(olmoe):
    # PaLM's and torchtitan's accounting: 6 x the active matmul parameters + 12 x layers x seq x d_attn
    seq = 4096
    assert P.training_flops_per_token(olmoe, seq, False) == 6 * olmoe.active + 12 * 16 * seq * 2048
    # activation checkpointing: one more forward of the decoder layers (the head is not recomputed)
    layers = olmoe.active - olmoe.head
    assert P.training_flops_per_token(olmoe, seq, True) == 6 * olmoe.active + 2 * layers + 16 * 16 * seq * 2048


def test_a_final_layers_method_runs_the_backward_pass_down_to_its_layers_only():
    from moelang.models.methods import ExpertSubset

    model = P.meta_model(load_config(OLMOE, known_first=True))
    ExpertSubset(experts={15: list(range(64))}, routers=[15]).prepare(model)
    shape = P.model_shape(model)
    h, i, k, e, v, seq = 2048, 1024, 8, 64, 50304, 2048
    layer_active = 4 * h * h + 2 * h + k * 3 * h * i + e * h
    # forward everywhere; input gradients of the head only (layer 15 is the lowest trainable: its own
    # input needs none); weight gradients of the trained experts' active part and the router
    expected = (2 * (16 * layer_active + v * h) + 16 * 4 * seq * h + 2 * v * h + 2 * (k * 3 * h * i + e * h))
    assert P.training_flops_per_token(shape, seq, False) == expected


def test_gpu_hours_follow_the_datasheet_peak(m7_plan):
    cpt = next(row for row in m7_plan if row.stage == "cpt")
    assert cpt.gpu_hours == pytest.approx(cpt.flops_total / (989.5e12 * 0.4) / 3600)
    assert cpt.hours_per_job == pytest.approx(cpt.gpu_hours / 8)
    # 4,172 steps of 8,388,608 tokens: 35B tokens of (6 N + 12 L seq d + a recomputed forward) FLOPs
    assert cpt.tokens_per_step == 4 * 4096 * 64 * 8 and cpt.steps == 4172
    shape = shape_of(OLMOE)
    per_token = 8 * shape.active - 2 * shape.head + 16 * 16 * 4096 * 2048
    assert cpt.flops_total == pytest.approx(per_token * 4172 * 8388608)


def test_every_stage_of_the_paper_configs_is_planned_and_fits(m7_plan, qwen_plan):
    stages = {row.stage for row in m7_plan}
    assert {"cpt", "profile_routing", "layer_similarity", "adapt", "expand", "expand_stage1", "expand_stage2",
            "evaluate"} <= stages
    adapt_jobs = [row.job.split(":")[0] for row in m7_plan if row.stage == "adapt"]
    assert adapt_jobs == ["ssft", "seft", "seft_top20", "random", "random_hr", "aeft", "lora", "full-ft"]
    for row in m7_plan + qwen_plan:
        assert row.fits is not False, (row.stage, row.job, row.peak_gb)
    # LayerMoE on Qwen1.5-1.8B: 48 new experts of one FFN each (3 x 2048 x 5504) and their 24 routers'
    # rows are stage 1's trainable parameters (the authors' group 1); the uniform plan 120
    stage1 = {row.job.split(" ")[0]: row for row in qwen_plan if row.stage == "expand_stage1"}
    ffn = 3 * 2048 * 5504
    assert stage1["layermoe"].trainable_params == 48 * ffn + 24 * 3 * 2048
    assert stage1["uniform"].trainable_params == 120 * ffn + 24 * 6 * 2048
    assert stage1["mola"].trainable_params == 96 * ffn + sum(2048 * (n + 1) for n in [1] * 6 + [3] * 6 + [5] * 6 + [7] * 6)


def test_the_plan_is_a_parquet_table_with_its_schema(m7_plan, tmp_path):
    path = tmp_path / "plan.parquet"
    from moelang.io import write_table

    write_table(P.plan_table(m7_plan), path)
    table = pq.read_table(path)
    assert table.schema.equals(P.PLAN_SCHEMA)
    assert table.num_rows == len(m7_plan)


def test_a_config_that_cannot_fit_stops_in_one_line_naming_what_to_change(repo_root):
    config = P.load_config(repo_root / "config" / "olmoe-m7.yaml")
    config["model"]["cpt"]["train"].update(parallelism="ddp", activation_checkpointing=False)
    config["resources"]["cpt"] = {"gpu": 1}
    problems = [line for line in P.fit_problems(config) if line.startswith("stage cpt")]
    assert len(problems) == 1 and "\n" not in problems[0]
    line = problems[0]
    peak = float(line.split("needs an estimated ")[1].split(" GB")[0])
    assert peak > 80  # a whole replica with AdamW: 6.9B x 8 bytes alone
    for words in ("its GPU's 80 GB", "model.cpt.train.micro_batch_size", "activation_checkpointing",
                  "resources.cpt.gpu", "parallelism"):
        assert words in line
    # the shipped config (FSDP over 8 GPUs, activation checkpointing) fits: m7_plan's rows say so


def test_a_cpu_config_is_planned_as_the_processes_tensor_memory(repo_root):
    config = cfg.load(repo_root / "config" / "config.yaml")
    config["model"]["device"] = "cpu"
    rows = P.plan_config(config)
    trained = [row for row in rows if row.steps]
    assert trained and all(row.device == "cpu" and row.gpus_per_job == 0 and row.fits is None for row in trained)
    assert all(row.gpu_hours is None and row.peak_gb > 0 for row in trained)


def test_unknown_gpu_and_utilisation_are_refused(repo_root):
    config = cfg.load(repo_root / "config" / "config.yaml")
    with pytest.raises(cfg.ConfigError, match="GPU 'v100'"):
        P.plan_config(config, gpu="v100")
    with pytest.raises(cfg.ConfigError, match="utilisation"):
        P.plan_config(config, utilisation=0)
    assert math.isclose(P.GPUS["a100"].bf16_tflops, 312.0) and P.GPUS["h200"].memory_gb == 141

"""The resource plan of a config: memory per GPU, FLOPs, GPU-hours and disk of every stage, before
anything is queued (``moelang plan``; the workflow's start-up check, :func:`fit_problems`).

Everything is computed from the config (validated and merged as the workflow does it) and the
architectures' ``config.json`` (a local directory, the Hugging Face cache, or the copies that ship in
``moelang/models/known_configs``): models are built on the meta device (shapes, no weights), and every
parameter count is :func:`moelang.models.loading.count_parameters` of such a model, prepared by the
stage's own training method (:mod:`moelang.models.methods`, :mod:`moelang.models.lora`,
:mod:`moelang.models.layermoe`), so the trainable sets are the ones the stages train.

**Memory per GPU** (per process: with ``model.device: cpu`` it is the process's tensor memory), as
:mod:`moelang.train` and :mod:`moelang.sweep` hold it:

* *weights*: the frozen parameters in the dtype they are loaded in (``model.dtype``; every one in
  fp32 when the training dtype is ``fp32``), the trainable ones in fp32: the optimizer steps fp32
  master weights (:func:`moelang.train.fp32_master_weights`), so a bf16 model's trainable tensors
  are made fp32 before the optimizer is built (and exported in bf16);
* *gradients*: one fp32 gradient per trainable parameter. DDP over several processes adds its
  reduction buckets (a second copy); FSDP shards them, but while ``grad_accum`` > 1 micro-batches
  accumulate without communication (``set_requires_gradient_sync(False)``), FSDP2 keeps each
  parameter's *unsharded* gradient: a whole model's gradients on every GPU;
* *optimizer*: AdamW's two moments per trainable parameter, fp32 like the master weights (PyTorch's
  ``zeros_like``), sharded under FSDP; with the weights and gradients, 16 bytes a trainable parameter;
* *activations*: what autograd keeps for the backward pass at the configured micro-batch and
  sequence length (:func:`activation_bytes_per_token`, per family: attention with SDPA's
  flash/memory-efficient kernels, no s x s matrix; the MoE dispatch of every routed token-slot;
  RMSNorms' fp32 copies; router probabilities and logits; the logits in the loss's fp32), counted
  per layer from the layers' shapes and which of their weights train; with
  ``activation_checkpointing`` each decoder layer keeps only its input, and one layer is recomputed at
  a time in the backward pass;
* *transient*: the largest short-lived buffers of the step (the fp32 gradients of the logits at the
  start of the backward pass);
* *other*: what a stage adds: a sweep's per-run copies of the layers it trains (:mod:`moelang.sweep`),
  split-out expert copies, LoRA's merged weights, FSDP's gathered layers, the CUDA context.

**FLOPs** per optimizer step: forward ``2 x active parameters`` per token plus attention
``4 x seq x d_attn`` per layer (PaLM's and torchtitan's accounting, causal masking not halved); the
backward pass computes input gradients from the top down to the lowest trainable layer
(``2 x active`` and ``8 x seq x d_attn`` per layer) and weight gradients for trainable weights only
(``2 x`` their active part), so full training is the familiar ``6 N + 12 L seq d`` per token and a
final-layers method costs about a third of it; activation checkpointing adds one more forward of the
recomputed layers. **GPU-hours** = FLOPs / (peak dense bf16 or fp32 FLOP/s of the chosen GPU x
utilisation) / 3600; ``utilisation`` is the model-FLOPs utilisation the user expects (default 0.4).

**Disk**: the exported models (``save_pretrained`` of the whole model, in ``model.dtype``), the
training states (fp32 trainable tensors and AdamW moments; the engine keeps the last one, and writes the
next before it deletes the last, so two at a time), and the data (corpus text and token ids,
uncompressed upper bounds).

What cannot be known before the run is estimated and says so in the ``notes`` column: the expert sets
the routing stage chooses (counted at their bound, every expert of the layer), the allocation's split
of the new experts over layers (the total is the config's budget; the split is taken even), and the
evaluation tasks' sizes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from moelang.errors import ConfigError, MoelangError
from moelang.options import TrainSettings

GB = 1e9  # memory and disk in decimal gigabytes, as GPU datasheets give memory (an "80 GB" H100 has 85.5e9 bytes)


# --------------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_gb: float
    bf16_tflops: float
    """Peak dense BF16 tensor-core TFLOP/s (the datasheets' "with sparsity" figures halved)."""
    fp32_tflops: float
    """Peak FP32 TFLOP/s (PyTorch leaves TF32 off for matmuls by default, and moelang does not turn it on)."""
    source: str


GPUS: dict[str, Gpu] = {
    "h100": Gpu("h100", "NVIDIA H100 SXM5 80GB", 80, 989.5, 67.0,
                "NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (989.5 dense), "
                "FP32 67 TFLOPS, 80 GB HBM3 (SXM)"),
    "a100": Gpu("a100", "NVIDIA A100 SXM4 80GB", 80, 312.0, 19.5,
                "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), "
                "FP32 19.5 TFLOPS, 80 GB HBM2e"),
    "h200": Gpu("h200", "NVIDIA H200 SXM 141GB", 141, 989.5, 67.0,
                "NVIDIA H200 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (989.5 dense), "
                "FP32 67 TFLOPS, 141 GB HBM3e (SXM)"),
}
DEFAULT_GPU = "h100"
DEFAULT_UTILISATION = 0.4
DEFAULT_GPU_MEMORY_GB = 80.0
CUDA_CONTEXT_GB = 1.0  # the CUDA context, cuBLAS workspaces and kernels of one process (about 0.5-1 GB)


# --------------------------------------------------------------------------------------------------
# Model shapes, read off a meta-device model
# --------------------------------------------------------------------------------------------------

@dataclass
class LayerShape:
    """One decoder layer's parameter groups (counts, not bytes) and what trains in it."""

    index: int
    params: int  # every parameter of the layer
    attention: int  # the attention block (projections and their norms)
    norms: int  # the layer's two RMSNorms
    dense_mlp: int  # a dense layer's MLP (0 in an MoE layer)
    mlp_width: int  # a dense layer's MLP width
    experts: int  # routed experts (0: dense)
    per_expert: int
    expert_width: int
    top_k: int
    router: int
    shared: int  # always-on shared experts and their gates
    shared_width: int
    qk_norm: bool  # OLMoE normalises q and k
    trainable: int = 0
    trainable_attention: bool = False
    trainable_norms: bool = False
    trainable_router: bool = False
    trainable_dense: bool = False
    trainable_experts: int = 0  # how many routed experts train
    split_experts: int = 0  # of those, how many are copied out of the fused tensors (moelang.models.adapters.split_experts)
    masked: bool = True  # the adaptation's router mask: every token-slot goes to a trained expert

    @property
    def active(self) -> int:
        """Matmul parameters one token uses."""
        return self.attention + self.router + self.dense_mlp + self.shared + self.top_k * self.per_expert

    @property
    def trainable_active(self) -> int:
        """Trainable matmul parameters one token's weight gradients touch (every slot of a layer whose
        experts train reaches a trained expert: the router mask of the adaptation, or all experts)."""
        experts = self.top_k * self.per_expert if self.trainable_experts else 0
        return ((self.attention if self.trainable_attention else 0) + (self.router if self.trainable_router else 0)
                + (self.dense_mlp if self.trainable_dense else 0) + (self.shared if self.trainable_dense else 0) + experts)


@dataclass
class ModelShape:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: list[LayerShape]
    embed: int
    head: int  # the LM head (0 when tied to the embeddings)
    total: int  # count_parameters' total
    trainable: int  # count_parameters' trainable
    trainable_embed: bool = False
    trainable_head: bool = False
    extra_trainable: int = 0  # trainable tensors outside the model's own (LoRA factors)

    @property
    def active(self) -> int:
        return sum(layer.active for layer in self.layers) + (self.head or self.embed)

    @property
    def lowest_trainable(self) -> int:
        """The lowest decoder layer with a trainable tensor (0 when the embeddings train; the layer
        count when nothing in a layer trains)."""
        if self.trainable_embed:
            return 0
        return min((layer.index for layer in self.layers if layer.trainable), default=len(self.layers))


def _numel(module) -> int:
    """The module's parameters as the model is saved: without split-out expert copies and LoRA factors
    (count_parameters' total)."""
    if module is None:
        return 0
    return sum(p.numel() for name, p in module.named_parameters()
               if ".lora_A." not in name and ".lora_B." not in name and not name.startswith("chosen.")
               and ".chosen." not in name)


def model_shape(model) -> ModelShape:
    """The shape of ``model`` (a meta-device model, prepared by a training method or not)."""
    from moelang.models import ModelAdapter, count_parameters
    from moelang.models.adapters import unwrapped

    config = model.config
    adapter = ModelAdapter(model)
    moe = {m.index: m for m in adapter.moe_layers}
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = []
    for index, layer in enumerate(adapter.layers):
        attention = _numel(layer.self_attn)
        norms = sum(_numel(m) for name, m in layer.named_children() if "norm" in name)
        m = moe.get(index)
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        shape = LayerShape(index=index, params=_numel(layer), attention=attention, norms=norms, dense_mlp=0,
                           mlp_width=0, experts=0, per_expert=0, expert_width=0, top_k=0, router=0, shared=0,
                           shared_width=0, qk_norm=hasattr(layer.self_attn, "q_norm"), trainable=trainable,
                           trainable_attention=any(p.requires_grad for p in layer.self_attn.parameters()),
                           trainable_norms=any(p.requires_grad for name, m_ in layer.named_children() if "norm" in name
                                               for p in m_.parameters()))
        if m is None:
            shape.dense_mlp = _numel(layer.mlp)
            shape.mlp_width = int(layer.mlp.down_proj.in_features) if hasattr(layer.mlp, "down_proj") else 0
            shape.trainable_dense = any(p.requires_grad for p in layer.mlp.parameters())
        else:
            names = m.expert_tensor_names(adapter.spec)
            fused = sum(getattr(m.experts, n).numel() for n in names)
            shape.experts, shape.per_expert = m.num_experts, fused // m.num_experts
            shape.expert_width, shape.top_k = m.expert_width, min(m.top_k, m.num_experts)
            shape.router = _numel(m.router)
            shape.shared = sum(_numel(unwrapped(s)) for s in m.shared)
            shape.shared_width = next((int(s.down_proj.in_features) for s in m.shared if hasattr(s, "down_proj")), 0)
            shape.trainable_router = any(p.requires_grad for p in m.router.parameters())
            shape.trainable_dense = any(p.requires_grad for s in m.shared for p in s.parameters())
            chosen = getattr(m.experts, "chosen", None)  # split-out experts (moelang.models.adapters.SPLIT_CHILD)
            if chosen is not None:
                shape.split_experts = int(chosen.down_proj.shape[0])
                shape.trainable_experts = shape.split_experts
            elif any(getattr(m.experts, n).requires_grad for n in names):
                shape.trainable_experts = m.num_experts
            lora = [name for name, p in m.block.named_parameters() if ".lora_" in name and p.requires_grad]
            if any(name.startswith("experts.") for name in lora):  # LoRA factors on the experts' fused tensors
                shape.trainable_experts = m.num_experts
            if any(not name.startswith("experts.") for name in lora):  # ... on the router's weight
                shape.trainable_router = True
        layers.append(shape)
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed.weight
    counts = count_parameters(model)
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name)
    return ModelShape(model_type=config.model_type, hidden=hidden, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=int(embed.weight.shape[0]), layers=layers, embed=embed.weight.numel(),
                      head=0 if tied or out is None else out.weight.numel(), total=int(counts["total"]),
                      trainable=int(counts["trainable"]), trainable_embed=embed.weight.requires_grad,
                      trainable_head=out is not None and out.weight.requires_grad, extra_trainable=lora)


def meta_model(config):
    """``config``'s model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    import moelang.models  # noqa: F401 (registers the expanded families)

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """Bytes per element of the weights and residual stream (``model.dtype``) and of the matmul
    outputs (bf16 under autocast), and whether autocast casts fp32 inputs to bf16 copies."""

    weights: int
    matmul: int
    autocast: bool

    @property
    def casts(self) -> bool:
        return self.autocast and self.weights == 4

    @classmethod
    def of(cls, weights_dtype: str, train_dtype: str | None) -> "Precision":
        weights = 2 if weights_dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
        autocast = train_dtype == "bf16"
        return cls(weights, 2 if autocast or weights == 2 else 4, autocast)


@dataclass(frozen=True)
class RouterOutputs:
    """What the loss asks of the routers: logits kept for the load-balancing loss and the z-loss."""

    aux: bool = False
    z: bool = False


def _norm(dim: int, p: Precision, saves_input: bool, trainable_weight: bool) -> float:
    # RMSNorm in fp32: the fp32 input, rsqrt, and (for the weight's gradient) the normalised value
    kept = (4 * dim + 4) if saves_input else 0
    return kept + (p.weights * dim if trainable_weight else 0)


def _linear_input(dim: int, p: Precision, copies: int = 1) -> float:
    """A linear layer's saved input: the input itself, or autocast's bf16 copy, one per call."""
    return copies * 2 * dim if p.casts else p.weights * dim


def layer_activation_bytes(layer: LayerShape, shape: ModelShape, p: Precision, routers: RouterOutputs,
                           input_grad: bool) -> float:
    """Bytes per token that autograd keeps for the backward pass of one decoder layer, full or
    partial training. ``input_grad``: the layer's input needs a gradient (something below trains), so
    every operation on the way saves what its input gradient needs; otherwise only the trainable
    weights' own chain does. A frozen linear saves only its weight (a parameter, not counted here)."""
    h, d, dkv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    total = 0.0
    attention_grad = input_grad or layer.trainable_attention or layer.trainable_norms
    if attention_grad:
        total += _norm(h, p, input_grad, layer.trainable_norms)
        if layer.trainable_attention:
            total += _linear_input(h, p, copies=3)  # q, k, v read the same normalised input
        if layer.qk_norm:
            total += _norm(d, p, True, layer.trainable_attention) + _norm(dkv, p, True, layer.trainable_attention)
        sdpa = 2 if p.autocast else p.weights
        total += sdpa * (d + 2 * dkv) + p.matmul * d + 4 * shape.heads  # q, k, v, output, logsumexp
        if layer.trainable_attention:
            total += _linear_input(d, p) if p.casts else 0  # o_proj's input: the SDPA output, or its bf16 copy
    mlp_grad = attention_grad or layer.trainable_dense or layer.trainable_router or layer.trainable_experts
    if not mlp_grad:
        return total
    total += _norm(h, p, attention_grad, layer.trainable_norms)
    if layer.experts:
        e, k, i = layer.experts, layer.top_k, layer.expert_width
        if layer.trainable_router:
            total += _linear_input(h, p)
        total += 4 * e + 8 * k  # router probabilities (fp32), top-k ids
        # per routed token-slot: the gathered input (for the experts' weight gradients), the gate-up
        # output, the activation and its product with up (for every gradient through the experts),
        # the down output (for the routing weight's gradient), the slot's index. transformers' experts
        # kernels (grouped_mm, eager's per-expert linear on a slice) compute in the weights' dtype:
        # autocast does not cast them. Without the router mask a chosen subset sees only its share
        # of the slots
        experts = p.weights if p.casts else p.matmul
        share = 1.0 if layer.masked or layer.trainable_experts in (0, e) else layer.trainable_experts / e
        through = 1.0 if attention_grad else share if layer.trainable_experts else 0.0
        gathered = p.weights * h * share if layer.trainable_experts else 0
        if attention_grad or layer.trainable_experts or layer.trainable_router:
            total += k * (gathered + experts * 4 * i * through + experts * h + 16)
        if routers.aux or routers.z:
            total += p.matmul * e  # the router logits the output keeps
            total += (p.matmul * e if routers.aux else 0) + (4 * e + 4 if routers.z else 0)
        if layer.shared:
            total += _linear_input(h, p) + 4 * p.matmul * layer.shared_width + p.matmul * h
    else:
        if layer.trainable_dense:
            total += _linear_input(h, p, copies=2)  # gate and up read the same input
        total += 4 * p.matmul * layer.mlp_width  # gate, activation, up, their product
    return total


def head_activation_bytes(shape: ModelShape, p: Precision) -> float:
    """Bytes per token kept for the final norm, the LM head and the loss: the logits the output
    holds (matmul dtype) and log-softmax's fp32 output (the loss upcasts the logits)."""
    h = shape.hidden
    return _norm(h, p, True, shape.trainable_head) + _linear_input(h, p) + (p.matmul + 4) * shape.vocab + 24


def head_transient_bytes(shape: ModelShape, p: Precision) -> float:
    """The backward pass's first step: the fp32 gradient of log-softmax's output and of its input,
    and the gradient in the logits' dtype, while the saved values are still held."""
    return (8 + p.matmul) * shape.vocab


@dataclass(frozen=True)
class Activations:
    """A training micro-batch's activation memory: ``kept`` and ``transient`` bytes per token, and
    ``fixed`` bytes per micro-batch (autocast's bf16 copies of fp32 weights, which the linears keep for
    the backward pass)."""

    kept: float
    transient: float
    fixed: float

    def total(self, tokens: int) -> float:
        return (self.kept + self.transient) * tokens + self.fixed


def activation_bytes_per_token(shape: ModelShape, p: Precision, routers: RouterOutputs,
                               checkpointing: bool) -> Activations:
    """What autograd keeps for the backward pass of one micro-batch: the layers from the lowest
    trainable one up (below it nothing needs a gradient), the final norm, head and loss; with
    ``checkpointing`` each of those layers keeps only its input (and the router logits the loss
    reads), and one layer at a time is recomputed in the backward pass. The rotary cos/sin (one per
    sequence) are left out: under 0.1%."""
    lowest = shape.lowest_trainable
    region = [layer for layer in shape.layers if layer.index >= lowest]
    per_layer = [layer_activation_bytes(layer, shape, p, routers, input_grad=layer.index > lowest or shape.trainable_embed)
                 for layer in region]
    transient = head_transient_bytes(shape, p)
    if checkpointing and per_layer:
        kept_routers = sum(p.matmul * layer.experts * (2 if routers.aux else 1) + (4 * layer.experts + 4 if routers.z else 0)
                           for layer in region if layer.experts and (routers.aux or routers.z))
        layers = p.weights * shape.hidden * len(per_layer) + kept_routers
        # the backward pass recomputes one layer at a time, after the head's gradients are gone
        transient = max(transient, max(per_layer))
    else:
        layers = sum(per_layer)
    kept = layers + head_activation_bytes(shape, p) + 8  # + the token ids the embedding keeps
    # autocast's bf16 copy of every fp32 weight a linear of the backward region multiplies by (the
    # experts' kernels are not cast: they run in fp32)
    fixed = 2 * (sum(layer.attention + layer.router + layer.dense_mlp + layer.shared for layer in region)
                 + (shape.head or shape.embed)) if p.casts else 0
    return Activations(kept, transient, fixed)


def inference_bytes_per_token(shape: ModelShape, p: Precision, hidden_states_kept: bool = False,
                              log_probs: int = 8) -> float:
    """The working set of a forward pass without autograd, per token of a batch: the residual stream
    and its normalised copy, the largest layer's intermediate tensors (attention's q, k, v and output;
    the routed token-slots' expert intermediates), the logits (and their fp32 log-probabilities when
    the stage takes them: ``log_probs`` bytes per vocabulary entry, 8 for moelang's perplexity (an fp32
    copy of the logits and their fp32 log-softmax), twice the weights' for lm-eval (log-softmax in the
    logits' dtype), 0 for none); ``hidden_states_kept``: every layer's MLP input kept for the batch (the
    similarity stage)."""
    h, d, dkv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    widest = 0.0
    for layer in shape.layers:
        attention = p.matmul * (2 * d + 2 * dkv)
        mlp = (layer.top_k * (p.weights * h + p.matmul * (3 * layer.expert_width + h)) + 4 * layer.experts
               if layer.experts else p.matmul * 3 * layer.mlp_width)
        widest = max(widest, attention, mlp + p.matmul * 3 * layer.shared_width)
    kept = len(shape.layers) * p.weights * h if hidden_states_kept else 0
    return 3 * p.weights * h + widest + kept + (p.matmul + log_probs) * shape.vocab


# --------------------------------------------------------------------------------------------------
# Training memory and FLOPs
# --------------------------------------------------------------------------------------------------

@dataclass
class Memory:
    """Bytes per GPU (per process)."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    transient: float = 0.0
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient + self.other


MASTER_BYTES = 4  # fp32 master weights, their gradients and AdamW moments


def training_memory(shape: ModelShape, settings: TrainSettings, p: Precision, routers: RouterOutputs,
                    processes: int) -> tuple[Memory, list[str]]:
    """One training run's memory per process (see the module docstring) and notes on how it was
    counted. ``processes``: the run's processes (GPUs); FSDP shards only with more than one."""
    notes = []
    trainable = shape.trainable  # count_parameters counts LoRA factors and split experts as trainable
    split = sum(layer.split_experts * layer.per_expert for layer in shape.layers)
    # the optimizer steps fp32 master weights (moelang.train.fp32_master_weights): trainable tensors
    # are fp32 whatever model.dtype is; frozen ones stay as loaded, or become fp32 for fp32 training
    master = MASTER_BYTES
    frozen = 4 if settings.dtype == "fp32" else p.weights
    stored = shape.total + shape.extra_trainable + split  # split experts are copies of their slices
    weights = (stored - trainable) * frozen + trainable * master
    gradients = trainable * master
    optimizer = 2 * trainable * master
    other = 0.0
    fsdp = settings.parallelism == "fsdp" and processes > 1
    if fsdp:
        # FSDP trains every parameter: its shards, and the layers it gathers, are fp32
        largest = max(layer.params for layer in shape.layers) * master
        root = (shape.total - sum(layer.params for layer in shape.layers)) * master
        # FSDP2: the root's parameters (embeddings, final norm, head) stay gathered from the forward to
        # the backward pass; a decoder layer is gathered while it runs and the next one is prefetched
        other += root + 2 * largest + largest  # and one layer's unsharded gradients before their reduce-scatter
        weights, optimizer = weights / processes, optimizer / processes
        if settings.grad_accum > 1:
            notes.append(f"FSDP accumulates {settings.grad_accum} micro-batches without communication: every GPU "
                         f"keeps the whole model's unsharded gradients ({gradients / GB:.1f} GB) besides its shard")
            gradients = gradients + gradients / processes
        else:
            gradients = gradients / processes
    elif processes > 1:
        gradients *= 2  # DDP's reduction buckets beside the gradients (gradient_as_bucket_view off)
        notes.append("DDP: a replica and its reduction buckets per GPU")
    tokens = settings.micro_batch_size * settings.seq_len
    acts = activation_bytes_per_token(shape, p, routers, settings.activation_checkpointing)
    if routers.aux and any(layer.experts for layer in shape.layers):
        # the load-balancing loss's one-hot expert mask: int64 [tokens x MoE layers, top-k, experts]
        moe = [layer for layer in shape.layers if layer.experts]
        one_hot = 8 * sum(layer.top_k * layer.experts for layer in moe)
        acts = dataclasses.replace(acts, transient=max(acts.transient, one_hot))
    if settings.dtype == "bf16" and p.weights == 2:
        # autocast's bf16 copies of the fp32 master weights of a bf16 model (Precision counts those of an
        # fp32 model layer by layer), made in the forward pass and kept by autograd
        # for the backward pass: 2 bytes a trainable parameter, once per step (measured:
        # benchmarks/plan_memory.py)
        autocast_copies = 2 * trainable / (processes if fsdp else 1)
        notes.append("bf16 autocast keeps a bf16 copy of each fp32 trainable weight for the backward pass")
    else:
        autocast_copies = 0.0
    memory = Memory(weights=weights, gradients=gradients, optimizer=optimizer,
                    activations=acts.kept * tokens + acts.fixed + autocast_copies, transient=acts.transient * tokens,
                    other=other)
    lora = [layer for layer in shape.layers if layer.trainable_experts and shape.extra_trainable and not layer.split_experts]
    if shape.extra_trainable and lora:
        # LoRA on fused expert tensors: each forward builds the merged W + BA of the down projection
        # and keeps it for the backward pass (measured: benchmarks/plan_memory.py)
        memory.activations += sum(layer.experts * shape.hidden * layer.expert_width for layer in lora) * p.matmul
        notes.append("LoRA keeps a merged copy of each adapted layer's expert down projections per micro-batch")
    return memory, notes


def attention_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """One layer's forward attention FLOPs per token (QK^T and AV, causal masking not halved)."""
    return 4 * seq_len * shape.heads * shape.head_dim


def training_flops_per_token(shape: ModelShape, seq_len: int, checkpointing: bool) -> float:
    """Forward, backward to the lowest trainable layer, weight gradients of trainable weights only;
    with ``checkpointing`` one more forward of the layers from the lowest trainable one up."""
    head = shape.head or shape.embed
    lowest = shape.lowest_trainable
    attention = attention_flops_per_token(shape, seq_len)
    forward = 2 * (sum(layer.active for layer in shape.layers) + head) + attention * len(shape.layers)
    above = [layer for layer in shape.layers if layer.index > lowest or shape.trainable_embed]
    backward_input = 2 * (head + sum(layer.active for layer in above)) + 2 * attention * len(above)
    weight_grads = 2 * (sum(layer.trainable_active for layer in shape.layers)
                        + (head if shape.trainable_head or (shape.trainable_embed and not shape.head) else 0))
    if shape.extra_trainable:  # LoRA: its factors' own gradients are small next to the merged weights' matmuls
        weight_grads += 2 * shape.extra_trainable
    recompute = 0.0
    if checkpointing:
        region = [layer for layer in shape.layers if layer.index >= lowest]
        recompute = 2 * sum(layer.active for layer in region) + attention * len(region)
    return forward + backward_input + weight_grads + recompute


def inference_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    return 2 * shape.active + attention_flops_per_token(shape, seq_len) * len(shape.layers)


# --------------------------------------------------------------------------------------------------
# The plan of a config
# --------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """One row of the plan: one kind of job of a workflow rule (see :data:`PLAN_SCHEMA`)."""

    stage: str
    job: str
    jobs: int
    runs_per_job: int = 1
    gpus_per_job: int = 1
    device: str = "gpu"
    parallelism: str = "single"
    weights_dtype: str = "float32"
    compute_dtype: str = "fp32"
    activation_checkpointing: bool = False
    micro_batch_size: int | None = None
    seq_len: int | None = None
    grad_accum: int | None = None
    steps: int | None = None
    tokens_per_step: int | None = None
    total_params: int = 0
    trainable_params: int = 0
    active_params: int = 0
    weights_gb: float = 0.0
    gradients_gb: float = 0.0
    optimizer_gb: float = 0.0
    activations_gb: float = 0.0
    transient_gb: float = 0.0
    other_gb: float = 0.0
    peak_gb: float = 0.0
    limit_gb: float | None = None
    fits: bool | None = None
    flops_per_step: float | None = None
    flops_total: float | None = None
    gpu: str | None = None
    peak_tflops: float | None = None
    utilisation: float | None = None
    gpu_hours: float | None = None
    hours_per_job: float | None = None
    disk_states_gb: float = 0.0
    disk_exports_gb: float = 0.0
    disk_results_gb: float = 0.0
    settings_key: str | None = None
    notes: str = ""

    def set_memory(self, memory: Memory, cuda: bool) -> None:
        self.weights_gb, self.gradients_gb, self.optimizer_gb = memory.weights / GB, memory.gradients / GB, memory.optimizer / GB
        self.activations_gb, self.transient_gb = memory.activations / GB, memory.transient / GB
        self.other_gb = (memory.other + (CUDA_CONTEXT_GB * GB if cuda else 0)) / GB
        self.peak_gb = memory.total / GB + (CUDA_CONTEXT_GB if cuda else 0)


PLAN_SCHEMA = pa.schema([
    ("stage", pa.string()), ("job", pa.string()), ("jobs", pa.int64()), ("runs_per_job", pa.int64()),
    ("gpus_per_job", pa.int64()), ("device", pa.string()), ("parallelism", pa.string()),
    ("weights_dtype", pa.string()), ("compute_dtype", pa.string()), ("activation_checkpointing", pa.bool_()),
    ("micro_batch_size", pa.int64()), ("seq_len", pa.int64()), ("grad_accum", pa.int64()), ("steps", pa.int64()),
    ("tokens_per_step", pa.int64()), ("total_params", pa.int64()), ("trainable_params", pa.int64()),
    ("active_params", pa.int64()), ("weights_gb", pa.float64()), ("gradients_gb", pa.float64()),
    ("optimizer_gb", pa.float64()), ("activations_gb", pa.float64()), ("transient_gb", pa.float64()),
    ("other_gb", pa.float64()), ("peak_gb", pa.float64()), ("limit_gb", pa.float64()), ("fits", pa.bool_()),
    ("flops_per_step", pa.float64()), ("flops_total", pa.float64()), ("gpu", pa.string()),
    ("peak_tflops", pa.float64()), ("utilisation", pa.float64()), ("gpu_hours", pa.float64()),
    ("hours_per_job", pa.float64()), ("disk_states_gb", pa.float64()), ("disk_exports_gb", pa.float64()),
    ("disk_results_gb", pa.float64()), ("settings_key", pa.string()), ("notes", pa.string()),
])
"""``moelang plan --out plan.parquet``: one row per kind of job (docs/outputs.md describes the columns)."""

# assumptions for what the config does not say (the notes column repeats them where they are used)
CHARS_PER_TOKEN = 3.0  # a subword tokenizer on CulturaX-like text (the tokenize stage measures the real ratio)
UTF8_BYTES_PER_CHAR = 2.0  # Latin 1-1.1, Greek/Cyrillic/Arabic ~1.8, Devanagari ~2.7, CJK 3
BELEBELE_ITEMS = 900  # questions per language (FLORES-based passages)
BELEBELE_ITEM_TOKENS = 400  # passage, question and four answers
MULTIBLIMP_PAIRS = 1000  # minimal pairs per language (it varies; an order of magnitude)
MULTIBLIMP_PAIR_TOKENS = 40


def _train_rule_key(rule: str) -> str:
    return {"pretrain_base": "model.pretrain", "cpt": "model.cpt.train", "adapt": "adapt.train",
            "expand_stage1": "expand.stage1", "expand_stage2": "expand.stage2"}[rule]


class _Planner:
    def __init__(self, config: dict, gpu: str = DEFAULT_GPU, utilisation: float = DEFAULT_UTILISATION):
        from moelang import config as mcfg

        if gpu not in GPUS:
            raise ConfigError(f"plan: GPU '{gpu}' is not one of {', '.join(GPUS)}; choose one")
        if not 0 < utilisation <= 1:
            raise ConfigError(f"plan: utilisation {utilisation} is not in (0, 1]; give the expected model-FLOPs "
                              f"utilisation, e.g. 0.4")
        self.config, self.mcfg, self.gpu, self.utilisation = config, mcfg, GPUS[gpu], utilisation
        self.weights_dtype = config["model"]["dtype"]
        self.cpu = config["model"]["device"] == "cpu"
        self.limit = float(config["resources"].get("gpu_memory_gb") or DEFAULT_GPU_MEMORY_GB)
        self.rows: list[StagePlan] = []
        self._base = None

    def limit_for(self, stage: str) -> float:
        """GB of one GPU of ``stage``'s rule: ``resources.<rule>.gpu_memory_gb``, else the config's."""
        rule = self.config["resources"].get(stage)
        return float((rule or {}).get("gpu_memory_gb") or self.limit) if isinstance(rule, dict) else self.limit

    # -- models ----------------------------------------------------------------------------------
    def base_config(self):
        if self._base is None:
            from moelang.models import build_config, load_config

            base = self.config["model"]["base"]
            if base["type"] == "pretrained":
                self._base = load_config(base["name_or_path"], revision=base.get("revision"),
                                         trust_remote_code=base.get("trust_remote_code", False), known_first=True)
            else:
                fields = dict(base["architecture"])
                if self.config["tokenizer"]["type"] == "train":
                    fields["vocab_size"] = self.config["tokenizer"]["vocab_size"]
                self._base = build_config(fields)
        return self._base

    def base_model(self):
        return meta_model(copy.deepcopy(self.base_config()))

    # -- helpers ---------------------------------------------------------------------------------
    def processes(self, rule: str) -> int:
        return max(1, int(self.mcfg.rule_resources(self.config, rule).get("gpu") or 0))

    def precision(self, train_dtype: str | None) -> Precision:
        return Precision.of(self.weights_dtype, train_dtype)

    def peak_flops(self, compute_bf16: bool) -> float:
        return (self.gpu.bf16_tflops if compute_bf16 else self.gpu.fp32_tflops) * 1e12

    def row(self, stage: str, job: str, jobs: int, processes: int, **fields) -> StagePlan:
        fields = {"gpus_per_job": 0 if self.cpu else processes, "device": "cpu" if self.cpu else "gpu",
                  "weights_dtype": self.weights_dtype} | fields
        row = StagePlan(stage=stage, job=job, jobs=jobs, **fields)
        self.rows.append(row)
        return row

    def finish(self, row: StagePlan, memory: Memory, flops_per_job: float | None, compute_bf16: bool,
               on_gpu: bool = True) -> None:
        cuda = on_gpu and not self.cpu
        row.set_memory(memory, cuda)
        if cuda:
            row.limit_gb = self.limit_for(row.stage)
            row.fits = row.peak_gb <= row.limit_gb
        if flops_per_job is not None:
            row.flops_total = flops_per_job * row.jobs
            if cuda:
                peak = self.peak_flops(compute_bf16)
                row.gpu, row.peak_tflops, row.utilisation = self.gpu.name, peak / 1e12, self.utilisation
                row.gpu_hours = row.flops_total / (peak * self.utilisation) / 3600
                row.hours_per_job = flops_per_job / (peak * self.utilisation) / 3600 / max(1, row.gpus_per_job)

    def train_row(self, stage: str, job: str, jobs: int, model, settings: TrainSettings, rule: str,
                  exports: int = 0, notes: list[str] | None = None, masked: bool = True) -> StagePlan:
        """A training job of one run (``model``: the meta model as its method prepared it)."""
        shape = model_shape(model)
        for layer in shape.layers:
            layer.masked = masked
        processes = self.processes(rule)
        p = self.precision(settings.dtype)
        config = model.config
        routers = RouterOutputs(aux=settings.aux_loss_coef > 0 and hasattr(config, "router_aux_loss_coef"),
                                z=settings.z_loss_coef > 0)
        memory, more = training_memory(shape, settings, p, routers, processes)
        tokens_per_step = settings.micro_batch_size * settings.seq_len * settings.grad_accum * processes
        flops_step = training_flops_per_token(shape, settings.seq_len, settings.activation_checkpointing) * tokens_per_step
        parallel = settings.parallelism if processes > 1 else "single"
        row = self.row(stage, job, jobs, processes, parallelism=parallel, compute_dtype=settings.dtype,
                       activation_checkpointing=settings.activation_checkpointing,
                       micro_batch_size=settings.micro_batch_size, seq_len=settings.seq_len,
                       grad_accum=settings.grad_accum, steps=settings.steps, tokens_per_step=tokens_per_step,
                       total_params=shape.total, trainable_params=shape.trainable, active_params=shape.active,
                       flops_per_step=flops_step, settings_key=_train_rule_key(rule))
        row.disk_exports_gb = jobs * exports * shape.total * p.weights / GB
        row.disk_states_gb = jobs * 2 * state_bytes(shape, p, settings) / GB  # the next one is written before the last goes
        self.finish(row, memory, flops_step * settings.steps, settings.dtype == "bf16" or p.weights == 2)
        row.notes = "; ".join((notes or []) + more)
        return row

    def inference_row(self, stage: str, job: str, jobs: int, model, tokens: int | None, seq_len: int,
                      batches: list[tuple[int, int]], rule: str, hidden_states_kept: bool = False,
                      notes: list[str] | None = None, settings_key: str | None = None) -> StagePlan:
        """A forward-only job; ``batches``: (tokens per forward pass, bytes of log-probabilities per
        vocabulary entry) of each kind of pass it makes; the largest sets the memory."""
        shape = model_shape(model)
        p = self.precision(None)
        memory = Memory(weights=shape.total * p.weights,
                        activations=max(inference_bytes_per_token(shape, p, hidden_states_kept, log_probs) * size
                                        for size, log_probs in batches))
        row = self.row(stage, job, jobs, 1, compute_dtype="bf16" if p.weights == 2 else "fp32", seq_len=seq_len,
                       total_params=shape.total, active_params=shape.active, settings_key=settings_key)
        flops = inference_flops_per_token(shape, seq_len) * tokens if tokens else None
        self.finish(row, memory, flops, p.weights == 2)
        row.notes = "; ".join((notes or []) + ([] if tokens else ["tokens not bounded by the config (tokens_per_language: null)"]))
        return row

    # -- stages ----------------------------------------------------------------------------------
    def plan(self) -> list[StagePlan]:
        config = self.config
        self.data()
        if config["model"]["base"]["type"] == "train":
            self.pretrain()
        if config["model"]["cpt"]["enabled"]:
            self.cpt()
        if config["routing"]["enabled"]:
            self.routing()
        self.similarity()
        if self.mcfg.adapt_targets(config):
            self.adapt()
        if self.mcfg.expand_variants(config):
            self.expand()
        self.evaluate()
        return self.rows

    def data(self) -> None:
        config = self.config
        chars = 0
        unbounded = []
        for lang in self.mcfg.all_languages(config):
            source = self.mcfg.source_for(config, lang)
            if source.get("max_chars"):
                chars += source["max_chars"]
            elif source["type"] != "builtin":
                unbounded.append(lang)
        row = self.row("corpus+tokenize", "every language", len(self.mcfg.all_languages(config)), 0, device="cpu",
                       gpus_per_job=0)
        row.disk_results_gb = (chars * UTF8_BYTES_PER_CHAR + chars / CHARS_PER_TOKEN * 4) / GB
        row.notes = (f"corpus text at <= {UTF8_BYTES_PER_CHAR:g} bytes a character and token ids (int32) at "
                     f"{CHARS_PER_TOKEN:g} characters a token, before Parquet's zstd compression: an upper bound"
                     + (f"; no max_chars for {', '.join(unbounded)}: not counted" if unbounded else ""))

    def pretrain(self) -> None:
        from moelang.models.methods import FullTraining

        options = self.mcfg.pretrain_options(self.config)
        model = self.base_model()
        FullTraining().prepare(model)
        self.train_row("pretrain_base", "the base model, from scratch", 1, model, options.train, "pretrain_base",
                       exports=1)

    def cpt(self) -> None:
        from moelang.models.methods import FullTraining

        options = self.mcfg.cpt_options(self.config)
        model = self.base_model()
        FullTraining().prepare(model)
        self.train_row("cpt", f"{len(options.steps)} exported checkpoints", 1, model, options.train, "cpt",
                       exports=len(options.steps))

    def routing(self) -> None:
        config = self.config
        routing = config["routing"]
        profiled = self.mcfg.registry.profiled(config)
        languages = len(self.mcfg.all_languages(config))
        tokens = routing["tokens_per_language"] * languages if routing["tokens_per_language"] else None
        shards = int(routing.get("shards") or 1)
        row = self.inference_row("profile_routing", f"{len(profiled)} models x {shards} shard(s), {languages} languages",
                                 len(profiled) * shards, self.base_model(),
                                 tokens // shards if tokens else None, routing["seq_len"],
                                 [(max(routing["batch_tokens"], routing["seq_len"]), 0)],
                                 "profile_routing", settings_key="routing.batch_tokens")
        row.disk_results_gb = len(profiled) * languages * self._moe_rows() * 24 / GB

    def _moe_rows(self) -> int:
        shape = model_shape(self.base_model())
        return sum(layer.experts for layer in shape.layers) or len(shape.layers)

    def similarity(self) -> None:
        config = self.config
        sim = config["similarity"]
        languages = len(self.mcfg.all_languages(config))
        if sim["method"] == "tokens":
            tokens = sim["tokens_per_language"] * languages if sim["tokens_per_language"] else None
        else:
            tokens = (sim["max_parallel_items"] or 0) * languages * 40 or None
        self.inference_row("layer_similarity", f"{self.mcfg.similarity_model(config)}, {languages} languages", 1,
                           self.base_model(), tokens, sim["seq_len"], [(max(sim["batch_tokens"], sim["seq_len"]), 0)],
                           "layer_similarity", hidden_states_kept=True, settings_key="similarity.batch_tokens")

    # -- adaptation I ------------------------------------------------------------------------------
    def adapt(self) -> None:
        from moelang.adapt import full_ft_settings, trains_final_layers_only

        config = self.config
        section = config["adapt"]
        targets = self.mcfg.adapt_targets(config)
        options = self.mcfg.adapt_options(config, targets[0])
        methods, rates = list(options.methods), list(options.learning_rates)
        per_method = section["job_per"] == "method"
        shared = [m for m in methods if options.share_frozen_pass and trains_final_layers_only(m)]
        alone = [m for m in methods if m not in shared]
        groups: list[tuple[str, list[str], int]] = []  # (job, methods, jobs)
        if per_method:
            groups += [(f"{m}: {len(rates)} rates", [m], len(targets)) for m in shared]
            groups += [(f"{m}: {len(rates)} rates, one after another", [m], len(targets)) for m in alone]
        else:
            if shared:
                groups.append((f"{', '.join(shared)}: {len(shared) * len(rates)} runs", shared, len(targets)))
            groups += [(f"{m}: {len(rates)} rates, one after another", [m], len(targets)) for m in alone]
        for job, names, jobs in groups:
            sweep = len(names) * len(rates) > 1 and all(m in shared for m in names)
            settings = options.train
            if names == ["full-ft"]:
                settings = full_ft_settings(settings, options.full_ft)
            self.adapt_row(job, names, jobs, settings, rates, sweep, options)

    def adapt_model(self, name: str, options):
        """The start model as method ``name`` prepares it (meta device). Expert sets the routing stage
        chooses are not known before it runs: counted at their bound, every expert of the layer."""
        from moelang.adapt import AdaptContext, final_moe_layers, method_builder
        from moelang.models import ModelAdapter

        model = self.base_model()
        adapter = ModelAdapter(model)
        layers = final_moe_layers(adapter, options.final_layers)
        bound = {layer: list(range(adapter.experts_per_layer[layer])) for layer in layers}
        top_n = self.config["routing"]["top_n"]
        sets = {m: {str(layer): (ids if m != f"seft_top{top_n}" else ids[:top_n]) for layer, ids in bound.items()}
                for m in options.methods}
        ctx = AdaptContext(adapter=adapter, layers=layers, expert_sets=sets, options=options)
        method = method_builder(name)(ctx)
        method.prepare(model)
        return model, layers

    def adapt_row(self, job: str, names: list[str], jobs: int, settings: TrainSettings, rates: list[float],
                  sweep: bool, options) -> None:
        """A job of the adaptation stage: ``names``' runs at every rate, sharing one frozen pass
        (``sweep``) or one after another. The group's method with the most trainable parameters sets
        the memory; every run counts for compute, exports and states."""
        prepared = {name: self.adapt_model(name, options) for name in names}
        shapes = {name: model_shape(model) for name, (model, _) in prepared.items()}
        largest = max(names, key=lambda n: shapes[n].trainable)
        model, layers = prepared[largest]
        shape = shapes[largest]
        for layer in shape.layers:
            layer.masked = options.mask_router
        p = self.precision(settings.dtype)
        routers = RouterOutputs(aux=settings.aux_loss_coef > 0, z=settings.z_loss_coef > 0)
        processes = 1 if sweep else self.processes("adapt")  # a sweep runs in one process (moelang.sweep)
        single, notes = training_memory(shape, settings, p, routers, processes)
        runs = len(names) * len(rates)
        start = shape.total * p.weights
        own = single.weights - start  # split-out experts, LoRA factors
        tokens = settings.micro_batch_size * settings.seq_len * settings.grad_accum * processes
        full = training_flops_per_token(shape, settings.seq_len, settings.activation_checkpointing)
        if sweep:
            # moelang.sweep: the start model once; per run its own copy of the layers from the boundary
            # up, its trainable tensors, gradients and AdamW moments; one run's activations at a time,
            # and the hidden states entering the boundary
            boundary = min(layers)
            group = min(runs, options.sweep_group_size or runs)  # adapt.sweep_group_size: runs per pass
            passes = -(-runs // group)
            above = sum(layer.params for layer in shape.layers if layer.index >= boundary) * p.weights
            memory = Memory(weights=start, gradients=group * single.gradients, optimizer=group * single.optimizer,
                            activations=single.activations + settings.micro_batch_size * settings.seq_len
                            * shape.hidden * p.matmul, transient=single.transient, other=group * (above + own))
            below = [layer for layer in shape.layers if layer.index < boundary]
            frozen = 2 * sum(layer.active for layer in below) + attention_flops_per_token(shape, settings.seq_len) * len(below)
            flops_step = (passes * frozen + runs * (full - frozen)) * tokens
            notes.append(f"{'the' if passes == 1 else f'{passes} passes of up to {group} of the'} {runs} runs share "
                         f"one pass of layers 0-{boundary - 1} (moelang.sweep; adapt.sweep_group_size); each keeps "
                         f"its own copy of layers {boundary}-{len(shape.layers) - 1}")
        else:
            # one run at a time, each on its own copy of the start model (moelang.adapt: copy.deepcopy(start);
            # the start model stays in host memory)
            memory = single
            flops_step = runs * full * tokens
        chosen = [n for n in names if n in ("ssft", "seft", "random", "random_hr")]
        if chosen:
            notes.insert(0, f"{', '.join(chosen)}: the routing stage chooses the expert sets; counted at their bound, "
                            f"every expert of layers {layers} (as aeft)")
        notes.append("trainable per run: " + ", ".join(f"{n} {shapes[n].trainable / 1e6:,.1f}M" for n in names))
        row = self.row("adapt", job, jobs, processes, runs_per_job=runs,
                       parallelism=settings.parallelism if processes > 1 else "single", compute_dtype=settings.dtype,
                       activation_checkpointing=settings.activation_checkpointing,
                       micro_batch_size=settings.micro_batch_size, seq_len=settings.seq_len,
                       grad_accum=settings.grad_accum, steps=settings.steps, tokens_per_step=tokens,
                       total_params=shape.total, trainable_params=shape.trainable, active_params=shape.active,
                       flops_per_step=flops_step, settings_key="adapt.train", notes="; ".join(notes))
        self.finish(row, memory, flops_step * settings.steps, settings.dtype == "bf16" or p.weights == 2)
        # every run exports a whole model (save_pretrained of the start model's architecture); the
        # selected run's files are hard links; every run has its own training state
        kept = len(names) if options.keep_models == "selected" else runs  # adapt.keep_models
        row.disk_exports_gb = jobs * kept * shape.total * p.weights / GB
        # each run's last state stays until the job publishes; one more while a state is written
        row.disk_states_gb = jobs * (runs + 1) * state_bytes(shape, p, settings) / GB

    # -- adaptation II: LayerMoE expansion ---------------------------------------------------------
    def estimated_plans(self, layers: int) -> tuple[dict[str, list[int]], list[str]]:
        """New experts per layer of each allocation method, before the similarities exist: the
        budget's total is the config's (``allocation.new_experts``, or for a ``delta`` its largest
        total), split evenly where the split depends on the similarities or the routing scores;
        MoLA's and ``uniform_per_layer``'s fixed budgets exactly."""
        from moelang.allocation import mola_new, scale_shape, mola_shape, spread, uniform

        alloc = self.config["allocation"]
        notes = []
        if alloc["new_experts"] is not None:
            total = int(alloc["new_experts"])
        else:  # N_i = ceil(w_i delta) sums to less than delta + layers; minus what N_i counts besides the new ones
            existing = 1 if alloc["counts_existing"] is not False else 0
            total = max(layers, math.ceil(alloc["delta"]) + layers - 1 - existing * layers)
            notes.append(f"allocation.delta {alloc['delta']:g}: at most {total} new experts")
        even = [int(x) for x in uniform(layers, total)]
        plans = {"layermoe": even, "routing": even,
                 "uniform": [int(alloc["uniform_per_layer"])] * layers if alloc["uniform_per_layer"] else even,
                 "mola": [int(x) for x in (mola_new(layers) if alloc["mola_budget"] == "authors"
                                           else scale_shape(mola_shape(layers), total))],
                 "increasing": [int(x) for x in spread(list(range(1, layers + 1)), total)]}
        return plans, notes

    def expand(self) -> None:
        from moelang.expand import forced_plan
        from moelang.models import ModelAdapter
        from moelang.models.layermoe.admission import AdmittedExpertSubset
        from moelang.models.layermoe.build import add_classifiers, expand_model
        from moelang.models.methods import ModuleSubset

        config = self.config
        variants = self.mcfg.expand_variants(config)
        options = self.mcfg.expand_options(config, next(iter(variants)))
        layers = self.base_config().num_hidden_layers
        plans, budget_notes = self.estimated_plans(layers)
        forced = forced_plan(config["allocation"]["new_experts"], layers, config["allocation"]["uniform_per_layer"])
        # which variants train the same stage 1 and stage 2 (moelang.expand.shared_training): by the
        # plan's numbers where the budget forces them, else by the plan's method (different
        # similarities give different plans)
        def key(variant):
            name = variant["plan"]
            return tuple(forced[name]["new_experts_per_layer"]) if forced else name

        stage1: dict = {}
        stage2: dict = {}
        for name, variant in variants.items():
            stage1.setdefault(key(variant), name)
            stage2.setdefault((key(variant), bool(variant["classifier"])), name)
        classifier_layers = config["allocation"]["classifier_layers"]
        n_classifiers = (len(classifier_layers) if isinstance(classifier_layers, list)
                         else classifier_layers if isinstance(classifier_layers, int) else max(1, layers // 3))
        for owner in stage1.values():
            variant = variants[owner]
            new = plans[variant["plan"]]
            notes = list(budget_notes)
            if variant["plan"] in ("layermoe", "routing") and not forced:
                notes.append(f"the {variant['plan']} plan's split over layers comes from the "
                             f"{'similarities' if variant['plan'] == 'layermoe' else 'routing scores'}: its total "
                             f"spread evenly (parameters and memory exact up to a few router rows)")
            sharing = [n for n, v in variants.items() if stage1[key(v)] == owner]
            expanded, _ = expand_model(self.base_model(), new, top_k=options.top_k)
            p = self.precision(None)
            total = model_shape(expanded).total
            row = self.row("expand", f"{variant['plan']} plan ({', '.join(sharing)}): {sum(new)} new experts", 1, 0,
                           device="cpu", gpus_per_job=0, total_params=total)
            # loaded and grown on the CPU (moelang.expand.expand_variant): the base and the grown model
            row.set_memory(Memory(weights=(model_shape(self.base_model()).total + total) * p.weights), cuda=False)
            row.disk_exports_gb = total * p.weights / GB
            row.notes = "; ".join(notes + ["runs on the CPU (host memory): the base model and the grown one"])
            adapter = ModelAdapter(expanded)
            grown = [m for m in adapter.moe_layers if m.num_experts > m.router.num_original]
            AdmittedExpertSubset(experts={m.index: list(range(m.router.num_original, m.num_experts)) for m in grown},
                                 routers=[m.index for m in grown], admit_steps=options.admit_steps).prepare(expanded)
            self.train_row("expand_stage1", f"{variant['plan']} plan ({', '.join(sharing)})", 1, expanded,
                           options.stage1, "expand_stage1", exports=1, notes=list(notes))
            for (k, classifier), owner2 in stage2.items():
                if k != key(variant):
                    continue
                stage2_model, _ = expand_model(self.base_model(), new, top_k=options.top_k)
                chosen = list(classifier_layers) if isinstance(classifier_layers, list) else list(range(n_classifiers))
                if classifier:
                    add_classifiers(stage2_model, chosen, seed=0)
                names = [f"model.layers.{m.index}.mlp.gate" for m in ModelAdapter(stage2_model).moe_layers]
                names += [f"model.layers.{i}.mlp.classifier" for i in chosen] if classifier else []
                ModuleSubset(modules=names).prepare(stage2_model)
                users = [n for n, v in variants.items() if stage2[(key(v), bool(v["classifier"]))] == owner2]
                self.train_row("expand_stage2", f"{variant['plan']} plan, classifier {'on' if classifier else 'off'} "
                               f"({', '.join(users)})", 1, stage2_model, options.stage2.replace(aux_loss_coef=0.0),
                               "expand_stage2", exports=1, notes=list(notes))
                self.rows[-1].notes = "; ".join(filter(None, [self.rows[-1].notes,
                                                             "the stage-2 loss keeps every layer's router logits"]))

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> None:
        config = self.config
        evaluation = config["evaluation"]
        evaluated = self.mcfg.registry.evaluated(config)
        languages = len(self.mcfg.all_languages(config))
        ppl_tokens = (evaluation["tokens_per_language"] or 0) * languages if evaluation["perplexity"] else 0
        task_tokens, notes = 0, []
        for family in evaluation["tasks"]:
            if "belebele" in family:
                shots = evaluation["belebele_shots"]
                task_tokens += BELEBELE_ITEMS * languages * 4 * (shots + 1) * BELEBELE_ITEM_TOKENS
                notes.append(f"Belebele: {BELEBELE_ITEMS} items a language, 4 answers, {shots + 1} x "
                             f"{BELEBELE_ITEM_TOKENS} tokens each (an estimate)")
            elif "blimp" in family:
                task_tokens += MULTIBLIMP_PAIRS * languages * MULTIBLIMP_PAIR_TOKENS
                notes.append(f"MultiBLiMP: about {MULTIBLIMP_PAIRS} pairs a language (an estimate)")
        if evaluation["limit"]:
            notes.append(f"evaluation.limit {evaluation['limit']} items a task: the task estimate is an upper bound")
        expanded = [e for e in evaluated.values() if e.variant is not None]
        others = [e for e in evaluated.values() if e.variant is None]
        context = getattr(self.base_config(), "max_position_embeddings", 4096)
        request = min(context, evaluation["max_length"] or context,
                      (evaluation["belebele_shots"] + 1) * BELEBELE_ITEM_TOKENS)
        # moelang's perplexity: batch_tokens a pass, fp32 log-probabilities; lm-eval: batch_size requests
        # padded to the longest, log-softmax in the weights' dtype
        batches = [(max(evaluation["batch_tokens"], evaluation["seq_len"]), 8),
                   (evaluation["batch_size"] * request, 2 * self.precision(None).matmul)]
        tokens = ppl_tokens + task_tokens
        if others:
            self.inference_row("evaluate", f"{len(others)} model{'s' if len(others) != 1 else ''} of the base's shape", len(others), self.base_model(),
                               tokens or None, max(evaluation["seq_len"], request), batches, "evaluate",
                               notes=list(notes), settings_key="evaluation.batch_size")
        if expanded:
            from moelang.models.layermoe.build import expand_model

            plans, more = self.estimated_plans(self.base_config().num_hidden_layers)
            variants = self.mcfg.expand_variants(config)
            biggest = max((plans[variants[e.variant]["plan"]] for e in expanded), key=sum)
            model, _ = expand_model(self.base_model(), biggest, top_k=config["expand"]["top_k"])
            self.inference_row("evaluate", f"{len(expanded)} expanded model{'s' if len(expanded) != 1 else ''} (the largest plan)", len(expanded), model,
                               tokens or None, max(evaluation["seq_len"], request), batches, "evaluate",
                               notes=notes + more + ["variants with the same plan share one evaluation"],
                               settings_key="evaluation.batch_size")


def state_bytes(shape: ModelShape, p: Precision, settings: TrainSettings) -> float:
    """One training state on disk (moelang.train.save_checkpoint): the trainable tensors and their two
    AdamW moments, fp32 (the master weights); written only when ``checkpoint_every`` is set. The engine
    keeps the last state and writes the next one before it deletes it."""
    if not settings.checkpoint_every or settings.checkpoint_every >= settings.steps:
        return 0.0
    return 3 * shape.trainable * MASTER_BYTES


def plan_config(config: dict, gpu: str = DEFAULT_GPU, utilisation: float = DEFAULT_UTILISATION) -> list[StagePlan]:
    """The resource plan of a validated ``config`` (see the module docstring)."""
    return _Planner(config, gpu, utilisation).plan()


def plan_table(rows: list[StagePlan]) -> pa.Table:
    floats = {f.name for f in PLAN_SCHEMA if pa.types.is_floating(f.type)}
    records = [{k: float(v) if k in floats and v is not None else v for k, v in dataclasses.asdict(row).items()}
               for row in rows]
    return pa.Table.from_pylist(records, schema=PLAN_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Reading a config, printing, the start-up check
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _hub_check_relaxed():
    """The config check treats a hub id missing from the local cache as an error when the hub is off
    (the stages would need its weights). The plan needs no weights, only the architecture (the cache
    or moelang's shipped ``config.json``), so it validates as an online run would."""
    saved = {name: os.environ.pop(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def load_config(path: str | Path) -> dict:
    """``path`` read, merged and validated as the workflow does it (without needing the weights)."""
    from moelang import config as mcfg

    with _hub_check_relaxed():
        return mcfg.load(path)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _count(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M"


def format_plan(rows: list[StagePlan], gpu: str = DEFAULT_GPU, utilisation: float = DEFAULT_UTILISATION) -> str:
    """The plan as a text table, one line per kind of job, then the notes and the totals."""
    spec = GPUS[gpu]
    header = (f"{'stage':<16} {'job':<44} {'jobs':>4} {'GPUs':>4} {'params':>7} {'trainable':>9} {'weights':>7} "
              f"{'grads':>6} {'optim':>6} {'activ':>6} {'other':>6} {'peak GB':>7} {'fits':>4} {'GPU-h':>9} "
              f"{'disk GB':>8}")
    lines = [f"Resource plan: memory per GPU (GB = 1e9 bytes), GPU-hours on {spec.name} at {utilisation:.0%} of "
             f"its peak dense {spec.bf16_tflops:g} TFLOP/s bf16 / {spec.fp32_tflops:g} fp32 ({spec.source}).", "",
             header, "-" * len(header)]
    for row in rows:
        job = row.job if len(row.job) <= 44 else row.job[:43] + "~"
        disk = row.disk_states_gb + row.disk_exports_gb + row.disk_results_gb
        fits = "-" if row.fits is None else "yes" if row.fits else "NO"
        lines.append(f"{row.stage:<16} {job:<44} {row.jobs:>4} {row.gpus_per_job:>4} "
                     f"{_count(row.total_params) if row.total_params else '-':>7} "
                     f"{_count(row.trainable_params) if row.trainable_params else '-':>9} {_gb(row.weights_gb):>7} "
                     f"{_gb(row.gradients_gb):>6} {_gb(row.optimizer_gb):>6} "
                     f"{_gb(row.activations_gb + row.transient_gb):>6} {_gb(row.other_gb):>6} {_gb(row.peak_gb):>7} "
                     f"{fits:>4} {_gb(row.gpu_hours):>9} {_gb(disk):>8}")
    total_hours = sum(row.gpu_hours or 0 for row in rows)
    total_disk = sum(row.disk_states_gb + row.disk_exports_gb + row.disk_results_gb for row in rows)
    lines += ["-" * len(header), f"total: {total_hours:,.0f} GPU-hours, {total_disk:,.0f} GB of disk", ""]
    for row in rows:
        if row.notes:
            lines.append(f"{row.stage} ({row.job}): {row.notes}")
    return "\n".join(lines)


def fit_problems(config: dict) -> list[str]:
    """One line per training or inference job whose estimated peak memory exceeds its GPU's
    (``resources.gpu_memory_gb``): the stage, the estimate, the limit and the settings to change.
    The workflow calls it at start-up when ``resources.gpus`` is on."""
    problems = []
    for row in plan_config(config):
        if row.fits is not False:
            continue
        key = row.settings_key or "resources"
        parts = f"weights {row.weights_gb:.1f}, gradients {row.gradients_gb:.1f}, optimizer {row.optimizer_gb:.1f}, " \
                f"activations {row.activations_gb + row.transient_gb:.1f}, other {row.other_gb:.1f}"
        if row.stage in ("pretrain_base", "cpt", "adapt", "expand_stage1", "expand_stage2"):
            rule = row.stage
            fix = (f"lower {key}.micro_batch_size ({row.micro_batch_size}; raise grad_accum to keep the batch), set "
                   f"{key}.activation_checkpointing: true" + ("" if row.activation_checkpointing else "")
                   + (f", give the rule more GPUs (resources.{rule}.gpu, now {row.gpus_per_job}) with "
                      f"{key}.parallelism: fsdp (full training)" if rule in ("pretrain_base", "cpt") else "")
                   + f", or a larger GPU for the rule (resources.{rule}.gpu_memory_gb)")
        else:
            fix = f"lower {key} or use a larger GPU (resources.{row.stage}.gpu_memory_gb)"
        problems.append(f"stage {row.stage} ({row.job}) needs an estimated {row.peak_gb:.1f} GB per GPU ({parts}), "
                        f"more than its GPU's {row.limit_gb:g} GB (resources.gpu_memory_gb); {fix} (moelang plan "
                        f"--configfile CONFIG shows every stage)")
    return problems

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

* *weights*: the parameters in the dtype they are loaded in (``model.dtype``). The engine trains
  them in that dtype: bf16 autocast (``dtype: bf16``) changes the matmuls' precision, not the
  weights', so with ``model.dtype: bfloat16`` there is **no fp32 master copy** (measured: a bf16
  model's parameters, gradients and AdamW moments stay bf16 after a step; ``benchmarks/plan_memory.py``);
* *gradients*: one per trainable parameter, same dtype. DDP over several processes adds its
  reduction buckets (a second copy); FSDP shards them, but while ``grad_accum`` > 1 micro-batches
  accumulate without communication (``set_requires_gradient_sync(False)``), FSDP2 keeps each
  parameter's *unsharded* gradient: a whole model's gradients on every GPU;
* *optimizer*: AdamW's two moments per trainable parameter, in the parameter's dtype (PyTorch's
  ``zeros_like``), sharded under FSDP;
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
training states (trainable tensors and AdamW moments; the engine keeps the last one, and writes the
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
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


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
            elif any(p.requires_grad for p in m.experts.parameters()):  # LoRA factors on the experts
                shape.trainable_experts = m.num_experts
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
        slots_grad = attention_grad or layer.trainable_experts or layer.trainable_router
        if slots_grad:
            # per routed token-slot: the gathered input (for the experts' weight gradients), the
            # gate-up output, the activation, its product with up, the down output (for the routing
            # weight's gradient), the slot's index. transformers' experts kernels (grouped_mm, eager's
            # per-expert linear on a slice) compute in the weights' dtype: autocast does not cast them
            experts = p.weights if p.casts else p.matmul
            gathered = p.weights * h if layer.trainable_experts else 0
            total += k * (gathered + experts * (4 * i + h) + 16)
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
    if checkpointing and per_layer:
        kept_routers = sum(p.matmul * layer.experts * (2 if routers.aux else 1) + (4 * layer.experts + 4 if routers.z else 0)
                           for layer in region if layer.experts and (routers.aux or routers.z))
        layers = p.weights * shape.hidden * len(per_layer) + max(per_layer) + kept_routers
    else:
        layers = sum(per_layer)
    kept = layers + head_activation_bytes(shape, p) + 8  # + the token ids the embedding keeps
    # autocast's bf16 copy of every fp32 weight a linear of the backward region multiplies by (the
    # experts' kernels are not cast: they run in fp32)
    fixed = 2 * (sum(layer.attention + layer.router + layer.dense_mlp + layer.shared for layer in region)
                 + (shape.head or shape.embed)) if p.casts else 0
    return Activations(kept, head_transient_bytes(shape, p), fixed)

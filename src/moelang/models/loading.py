"""Loading models by hub id or local path, building small ones from a config, counting parameters.

* :func:`load_model`: ``AutoModelForCausalLM.from_pretrained`` with safetensors only,
  ``trust_remote_code`` only when the config says so, dtype and device (or ``device_map`` for several
  GPUs) from the config.
* :func:`build_config` / :func:`init_model`: a model of any supported family from its
  ``transformers`` config class (``AutoConfig.for_model``) with the tokenizer's vocabulary and
  special tokens, seeded.
* :func:`describe_model`: the one log line of a built or loaded model's shape.
* :func:`check_process_devices`: a multi-process launch on a node without a GPU per process stops.
* :func:`count_parameters`: total and trainable parameters of a model, or of a config on the meta
  device (no weights, no memory): the trainable fraction of a method at the real OLMoE-1B-7B scale;
  MoE layers may have different expert counts (a config's ``num_experts_per_layer``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moelang.errors import MoelangError
from moelang.io import log
from moelang.options import LoadOptions

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
KNOWN_CONFIGS = Path(__file__).with_name("known_configs")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise MoelangError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> str:
    """``auto``: CUDA when available, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_model(name_or_path: str | Path, *, revision: str | None = None, dtype: str = "float32", device: str = "cpu",
               device_map: str | dict | None = None, trust_remote_code: bool = False,
               experts_implementation: str | None = None):
    """A causal LM by hub id or local directory (safetensors weights only)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"revision": revision, "dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code,
              "use_safetensors": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:  # hub, network, format and missing-safetensors errors all end here
        raise MoelangError(f"cannot load model '{name_or_path}' ({type(exc).__name__}: {_first_line(exc)}); check the "
                           f"hub id or directory, that it has safetensors weights, and network access "
                           f"(HF_HUB_OFFLINE)") from None
    if device_map is None:
        model.to(device)
    log.info("model %s: %s", name_or_path, describe_model(model))
    return model


def load_for_inference(model_ref: str | Path, options: LoadOptions):
    """A model for the analysis and evaluation stages, in eval mode, with the stage's dtype, device,
    revision and ``trust_remote_code`` options."""
    model = load_model(model_ref, dtype=options.dtype,
                       device=resolve_device(options.device),
                       trust_remote_code=options.trust_remote_code, revision=options.revision)
    return model.eval()


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                known_first: bool = False):
    """A model's config from the hub or a directory; offline, the architecture of a few well-known
    models ships with moelang (``known_configs/``). ``known_first``: the shipped copy when there is one,
    without asking the hub (only the architecture is needed, e.g. for a parameter count)."""
    from transformers import AutoConfig

    known = KNOWN_CONFIGS / (str(name_or_path).replace("/", "--") + ".json")

    def shipped():
        fields = {k: v for k, v in json.loads(known.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    if known_first and known.is_file():
        return shipped()
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if known.is_file():
            return shipped()
        raise MoelangError(f"cannot load the config of '{name_or_path}' ({type(exc).__name__}: {_first_line(exc)}); "
                           f"check the hub id or directory and network access") from None


def build_config(architecture: dict, tokenizer=None):
    """A transformers config from ``architecture`` (``model_type`` plus that config class's fields),
    with the tokenizer's vocabulary size and special-token ids."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = dict(architecture)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise MoelangError(f"model.architecture.model_type '{model_type}' is not a transformers model type; use e.g. "
                           f"olmoe, qwen3_moe, mixtral")
    if tokenizer is not None:
        fields["vocab_size"] = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields[name] = getattr(tokenizer, name)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise MoelangError(f"model.architecture: {_first_line(exc)}; fix the architecture fields") from None


def init_model(config, seed: int, dtype: str = "float32", experts_implementation: str | None = None):
    """A randomly initialised model from ``config``; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), **kwargs)
    log.info("model built: %s", describe_model(model))
    return model


def describe_model(model) -> str:
    """A model's shape in one line, read off the built modules (not the config that asked for them):
    family, layers, experts, top-k, expert width, hidden size, parameters."""
    from moelang.models.adapters import ModelAdapter

    config = model.config
    total = count_parameters(model)["total"]
    try:
        adapter = ModelAdapter(model)
    except MoelangError:
        return f"{config.model_type}, {total / 1e6:.2f}M parameters"
    if adapter.is_moe:
        layer = adapter.moe_layers[0]
        sizes = [m.num_experts for m in adapter.moe_layers]
        experts = str(sizes[0]) if len(set(sizes)) == 1 else "/".join(map(str, sizes))
        shape = (f"{adapter.num_layers} layers ({len(adapter.moe_layers)} MoE), {experts} experts, "
                 f"top-{layer.top_k}, expert width {layer.expert_width}")
    else:
        shape = f"{adapter.num_layers} layers (dense, MLP width {adapter.layers[0].mlp.down_proj.in_features})"
    return f"{adapter.family}, {shape}, hidden {config.hidden_size}, {total / 1e6:.2f}M parameters"


def check_process_devices(device: str, rule: str, environ=None) -> None:
    """Stop a multi-process launch on a node without a CUDA device per process.

    torchrun sets ``LOCAL_WORLD_SIZE`` (processes on this node). Without a GPU for each, every process
    would train on the CPU (accelerate falls back to gloo) and the run would see N times the tokens
    of the configured batch: a different experiment. ``model.device: cpu`` asks for CPU processes
    on purpose (the tests' gloo runs)."""
    environ = os.environ if environ is None else environ
    processes = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("WORLD_SIZE") or 1)
    if processes <= 1 or device == "cpu":
        return
    visible = torch.cuda.device_count()
    if visible < processes:
        raise MoelangError(f"{rule}: {processes} training processes on this node (torchrun --nproc_per_node "
                           f"{processes}) but {visible} CUDA device(s); run it on a node with {processes} GPUs, "
                           f"set resources.{rule}.gpu to at most {visible} (or leave resources.gpus false), or set "
                           f"model.device: cpu to train in CPU processes on purpose")


def count_parameters(model=None, config=None) -> dict:
    """Total and trainable parameters (and per-expert size) of ``model``, or of ``config`` built on the
    meta device. An expert-rows parametrization, or experts split into their own module, count the
    full fused tensor once in the total and only the trainable experts as trainable; LoRA factors count
    as trainable, not in the total (the total is the model's, as saved).

    A config may record ``num_experts_per_layer`` (one entry per decoder layer: an expanded model whose
    MoE layers have different expert counts; 1 for a dense layer); the meta model then gets those
    counts. ``experts_per_layer`` lists each MoE layer's experts; ``num_experts`` is their common
    count, None when the layers differ."""
    from transformers import AutoModelForCausalLM

    from moelang.models.adapters import ModelAdapter

    if model is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        per_layer = getattr(config, "num_experts_per_layer", None)
        if per_layer is not None:
            set_experts_per_layer_on_meta(model, list(per_layer))
    total = trainable = 0
    for name, param in model.named_parameters():
        is_rows = name.endswith(".rows") and ".parametrizations." in name
        is_split_copy = ".experts.chosen." in name  # moelang.models.adapters.SPLIT_CHILD
        is_lora_factor = ".lora_A." in name or ".lora_B." in name  # moelang.models.lora: merged away at the end
        if not (is_rows or is_split_copy or is_lora_factor):
            total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    counts = {"total": total, "trainable": trainable, "trainable_fraction": trainable / total if total else 0.0}
    try:
        adapter = ModelAdapter(model)
    except MoelangError:
        return counts
    if adapter.moe_layers:
        sizes = [layer.num_experts for layer in adapter.moe_layers]
        per_expert = {sum(getattr(layer.experts, n).numel() for n in layer.expert_tensor_names(adapter.spec))
                      // layer.num_experts for layer in adapter.moe_layers}
        counts.update({"per_expert": per_expert.pop() if len(per_expert) == 1 else None,
                       "num_moe_layers": len(adapter.moe_layers), "experts_per_layer": sizes,
                       "num_experts": sizes[0] if len(set(sizes)) == 1 else None,
                       "top_k": adapter.moe_layers[0].top_k})
    return counts


def set_experts_per_layer_on_meta(model, experts_per_layer: list[int]) -> None:
    """Give each MoE layer of a meta-device ``model`` its own number of experts: the fused expert
    tensors and every router tensor with one row per expert get that many rows (no weights: the
    shapes are all that a parameter count needs). ``experts_per_layer`` has one entry per decoder
    layer; a layer the config builds dense must have 1."""
    from torch import nn

    from moelang.models.adapters import ModelAdapter

    adapter = ModelAdapter(model)
    if len(experts_per_layer) != adapter.num_layers:
        raise MoelangError(f"num_experts_per_layer has {len(experts_per_layer)} entries for {adapter.num_layers} decoder "
                           f"layers; give one per layer (1 for a dense layer)")
    moe = {layer.index: layer for layer in adapter.moe_layers}
    for index, count in enumerate(experts_per_layer):
        if index not in moe:
            if count != 1:
                raise MoelangError(f"num_experts_per_layer gives layer {index} {count} experts, but the config builds it "
                                   f"dense; give 1 there")
            continue
        if not isinstance(count, int) or count < 1:
            raise MoelangError(f"num_experts_per_layer gives layer {index} {count!r} experts; give an integer >= 1")
        layer = moe[index]
        old = layer.num_experts
        for module, names in ((layer.experts, layer.expert_tensor_names(adapter.spec)),
                              (layer.router, [n for n, p in layer.router.named_parameters(recurse=False)
                                              if p.shape[0] == old])):
            for name in names:
                tensor = getattr(module, name)
                setattr(module, name, nn.Parameter(torch.empty((count, *tensor.shape[1:]), dtype=tensor.dtype,
                                                               device="meta"), requires_grad=tensor.requires_grad))
            if hasattr(module, "num_experts"):
                module.num_experts = count

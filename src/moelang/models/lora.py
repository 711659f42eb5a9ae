"""LoRA on the final K MoE layers' fused expert tensors and routers: a training method.

The ``lora`` baseline of the adaptation stage (not in the authors' code: every setting here is
ours, see :class:`LoRASettings`). transformers 5 stores a layer's experts as fused 3-D
``nn.Parameter`` s on one experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I];
GPT-OSS transposed, [E, in, out]) and every supported family's router keeps its weight as a raw
``nn.Parameter`` [E, H] (no ``nn.Linear`` anywhere), so PEFT's module LoRA has nothing to target.
PEFT's ``LoraConfig(target_parameters=...)`` targets raw parameters instead (``lora.ParamWrapper``):

* a 3-D tensor gets one rank-``r`` update per expert: ``lora_A`` is ``Linear(in, r x E)``,
  ``lora_B`` is ``Linear(r x E, out)``, and expert ``e``'s weight becomes
  ``W_e + alpha / r x B_e A_e`` (``r x (in + out)`` parameters per expert); a 2-D router weight
  gets one ``W + alpha / r x B A`` (``r x (H + E)`` parameters);
* the wrapper replaces the experts module (the router module) in its parent and, during each
  forward only, parametrizes the wrapped tensor as ``W + delta``, so the family's own experts kernel
  (grouped_mm, batched_mm or eager) and router run unchanged on the adapted weight;
* full parameter names (``model.layers.14.mlp.experts.gate_up_proj``) limit it to the chosen
  layers; PEFT matches a target by name or name suffix, and a full name is a suffix of nothing else.

The tests check every supported MoE family against an independent computation (the merged model's
logits equal the LoRA model's, each expert's update has rank at most ``r``, and the weights merged
from the factors by hand give the LoRA model's logits), so no fallback parametrization is needed.
PEFT refuses dropout on raw parameters (the update is added to the weight, not computed from the
input, so there is no input to drop): :attr:`LoRASettings.dropout` must be 0.

The method, through the engine's hooks (:mod:`moelang.models.methods`):

* ``prepare``: freezes the model, injects the adapters in place (the model object stays the one the
  engine holds; the experts and router modules of the chosen layers become wrappers, which
  :class:`moelang.models.adapters.ModelAdapter` sees through), with ``lora_A`` initialised from
  :attr:`LoRASettings.seed` (Kaiming-uniform, PEFT's default) and ``lora_B`` zero, so the adapted
  model starts as the base model; returns the adapter factors, the only trainable parameters;
* ``export_state``: the merged weights under the original architecture's names, without touching
  the live model (training goes on): ``W + delta`` for the targeted tensors, the frozen tensors as
  they are;
* ``finalize``: merges every adapter into its tensor and puts the family's own modules back: a
  plain model of the original class, whose ``save_pretrained`` checkpoint has the original keys and
  loads with ``AutoModelForCausalLM`` without peft.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from moelang.errors import ConfigError, MoelangError
from moelang.io import log
from moelang.models.adapters import EXPERT_TENSORS, ModelAdapter
from moelang.models.methods import TrainingMethod

ADAPTER = "default"  # PEFT's adapter name: its factors are named ``<module>.lora_A.default.weight``
TARGETS = ("experts", "router")
WRAPPED = ".base_layer"  # what a PEFT wrapper inserts into the names of the tensors it wraps


@dataclass(frozen=True)
class LoRASettings:
    """What the LoRA baseline adapts, and how (every value is ours: the authors have no LoRA)."""

    rank: int = 8
    """r: the rank of each update (per expert for the fused expert tensors, one for a router)."""

    alpha: float = 16.0
    """The update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``); 2 x rank by default."""

    dropout: float = 0.0
    """Dropout on the LoRA input. Must be 0: on raw parameters (fused expert tensors, router
    weights) LoRA adds ``B A`` to the weight rather than computing ``B A x`` from the input, so there
    is nothing to drop (PEFT refuses it too)."""

    targets: tuple[str, ...] = TARGETS
    """Which tensors of each chosen layer get an update: ``experts`` (the fused ``gate_up_proj``
    and ``down_proj`` of every routed expert; not GPT-OSS's expert biases, not shared experts) and/or
    ``router`` (the router's weight, [E, H])."""

    layers: int = 2
    """K: LoRA goes on the last K MoE layers of the model (OLMoE-1B-7B with K = 2: layers 14 and
    15, the paper's final layers); every other layer, the embeddings and the norms stay frozen."""

    seed: int = 0
    """Seed of the ``lora_A`` initialisation (``lora_B`` starts at zero, so the start model is
    unchanged whatever the seed)."""

    def check(self, key: str = "adapt.lora") -> None:
        """One-line errors, naming ``key.<field>`` and the fix, for values that cannot work."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"config key '{key}.rank': {self.rank!r} is not a rank; give an integer >= 1 (e.g. 8)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"config key '{key}.alpha': {self.alpha!r}; give a number > 0 (the update is scaled by "
                              f"alpha / rank; e.g. 2 x rank)")
        if self.dropout != 0:
            raise ConfigError(f"config key '{key}.dropout': {self.dropout!r}; LoRA on fused expert tensors and router "
                              f"weights adds its update to the weight, so there is no input to drop; set 0")
        targets = list(self.targets) if isinstance(self.targets, (list, tuple)) else None
        bad = [t for t in targets or [] if t not in TARGETS]
        if not targets or bad or len(set(targets)) != len(targets):
            raise ConfigError(f"config key '{key}.targets': {self.targets!r}; give a list of distinct names among "
                              f"{list(TARGETS)}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ConfigError(f"config key '{key}.layers': {self.layers!r}; give the number K >= 1 of final MoE layers "
                              f"to adapt")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"config key '{key}.seed': {self.seed!r}; give an integer")

    def chosen_layers(self, adapter: ModelAdapter, key: str = "adapt.lora") -> list[int]:
        """The decoder-layer indices of the last :attr:`layers` MoE layers of ``adapter``'s model."""
        moe = [m.index for m in adapter.moe_layers]
        if not moe:
            raise MoelangError(f"{adapter.family} model has no MoE layer; LoRA on expert tensors needs an MoE model")
        if self.layers > len(moe):
            raise ConfigError(f"config key '{key}.layers': {self.layers} final MoE layers asked for, but this "
                              f"{adapter.family} model has {len(moe)} ({moe}); set at most {len(moe)}")
        return moe[-self.layers:]


def target_parameters(model: nn.Module, settings: LoRASettings) -> list[str]:
    """The full names (``model.layers.14.mlp.experts.gate_up_proj``) of the tensors ``settings``
    adapts in ``model`` (an unprepared model). The names come from the modules themselves, found
    through :meth:`ModelAdapter.moe_layer`, never from a family's naming pattern."""
    settings.check()
    adapter = ModelAdapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for index in settings.chosen_layers(adapter):
        layer = adapter.moe_layer(index)
        if "experts" in settings.targets:
            found += [f"{names[id(layer.experts)]}.{tensor}" for tensor in EXPERT_TENSORS]
        if "router" in settings.targets:
            if not isinstance(getattr(layer.router, "weight", None), nn.Parameter):
                raise MoelangError(f"{adapter.family} layer {index}: the router has no weight tensor; drop 'router' "
                                   f"from the LoRA targets")
            found.append(f"{names[id(layer.router)]}.weight")
    return found


def expected_lora_parameters(model: nn.Module, settings: LoRASettings) -> int:
    """How many parameters LoRA with ``settings`` adds to ``model``, from the targeted tensors'
    shapes alone: ``r x (in + out)`` per expert of a fused [E, out, in] (or GPT-OSS's [E, in, out])
    tensor, ``r x (H + E)`` for a router weight [E, H]. Works on a meta-device model."""
    total = 0
    for name in target_parameters(model, settings):
        shape = model.get_parameter(name).shape
        experts = shape[0] if len(shape) == 3 else 1
        total += settings.rank * experts * (shape[-2] + shape[-1])
    return total


def _wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT tuner layer in ``model``, by module name (nested ones included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _original_name(name: str) -> str:
    """A tensor's name in the original architecture: without the wrappers' ``.base_layer`` steps."""
    return name.replace(WRAPPED, "")


def has_lora(model: nn.Module) -> bool:
    return bool(_wrappers(model))


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter factors of a prepared ``model`` (``lora_A`` and ``lora_B`` of every wrapper), by name."""
    names = {f"{wrapper}.{factor}." for wrapper in _wrappers(model) for factor in ("lora_A", "lora_B")}
    return {name: p for name, p in model.named_parameters() if any(name.startswith(n) for n in names)}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a LoRA-prepared ``model`` with every adapter merged, under the original
    architecture's names, leaving the model as it is (no copy of the frozen tensors: only the
    targeted ones are new tensors). Each merged tensor is computed as PEFT's merge computes it (the
    base tensor plus the adapter's delta in the base's dtype), so it equals :func:`merge_lora`'s."""
    wrappers = _wrappers(model)
    merged = {}
    with torch.no_grad():
        for name, wrapper in wrappers.items():
            base = wrapper.get_param()
            delta = wrapper.get_delta_weight(ADAPTER).to(base.dtype)
            merged[f"{_original_name(name)}.{wrapper.parameter_name}"] = base + delta
    factors = set(lora_parameters(model))
    state = {}
    for name, tensor in model.state_dict().items():
        if name in factors:
            continue
        original = _original_name(name)
        state[original] = merged.get(original, tensor)
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter of ``model`` into its tensor and put the family's own modules back in
    place of the wrappers (PEFT's merge-and-unload, on the model itself rather than on a
    ``PeftModel``): ``model`` is then a plain model of its original class. Returns it."""
    wrappers = _wrappers(model)
    outermost = [name for name in wrappers if not any(name.startswith(other + ".") for other in wrappers)]
    for name in outermost:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # safe_merge: merged on a copy and checked for non-finite values before it replaces the tensor
        base = wrappers[name].unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        setattr(parent, child, base)
    if hasattr(model, "peft_config"):  # left on the model by the injection
        del model.peft_config
    return model


@dataclass
class LoRATraining(TrainingMethod):
    """PEFT LoRA on the fused expert tensors and/or routers of the last K MoE layers (see the module
    docstring); merged into the weights by ``finalize``."""

    settings: LoRASettings = field(default_factory=LoRASettings)

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        from peft import LoraConfig, inject_adapter_in_model

        if has_lora(model):
            raise MoelangError("this model already has LoRA adapters; LoRA is applied once, to a plain model")
        targets = target_parameters(model, self.settings)  # every check before the model changes
        expected = expected_lora_parameters(model, self.settings)
        config = LoraConfig(r=self.settings.rank, lora_alpha=self.settings.alpha, lora_dropout=0.0,
                            target_modules=[], target_parameters=targets)
        model.requires_grad_(False)
        # PEFT draws lora_A from the global generator: seeded here, and the caller's stream is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        factors = lora_parameters(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in factors)
        count = sum(p.numel() for p in factors.values())
        if count != expected:  # a PEFT whose layout differs from the one this module was checked against
            raise MoelangError(f"LoRA: peft created {count} adapter parameters where {expected} were expected; this "
                               f"peft version is not the one moelang supports (see pyproject.toml)")
        base = sum(p.numel() for name, p in model.named_parameters() if name not in factors)
        log.info("lora: rank %d, alpha %g on %s of MoE layers %s: %d trainable parameters (%.4f%% of %d)",
                 self.settings.rank, self.settings.alpha, " and ".join(self.settings.targets),
                 self.settings.chosen_layers(ModelAdapter(model)), count, 100 * count / base, base)
        return list(factors.values())

    def step_context(self):
        # each wrapper parametrizes its tensor (cached) around its own forward
        return contextlib.nullcontext()

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return merged_state(model)

    def finalize(self, model: nn.Module) -> nn.Module:
        return merge_lora(model)

    def describe(self) -> str:
        s = self.settings
        return (f"lora: rank {s.rank}, alpha {s.alpha:g}, dropout {s.dropout:g}, targets {sorted(s.targets)}, "
                f"last {s.layers} MoE layers, seed {s.seed}")

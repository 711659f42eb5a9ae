"""Training methods: what the engine trains, and how, through four hooks.

The engine (:func:`moelang.train.train`) knows nothing of trainable subsets; it calls a method's hooks:

* ``prepare(model)``: make the model trainable as the method wants (freeze, split out chosen
  experts, add adapters); returns the trainable parameters. Called once, before the optimizer is
  built and before a checkpoint is restored (checkpoints key trainable tensors by parameter name,
  so the prepared model must have the names it had when the checkpoint was written);
* ``before_step(model, step)``: at the start of every training step (0-based), also the first
  step after a resume: a setting that follows a schedule (LayerMoE's new-expert admission) is a pure
  function of the step, so a resumed run sets what the uninterrupted one had;
* ``step_context()``: a context manager around each training forward and backward, and only
  those (the router mask of expert fine-tuning lives there; evaluation never sees it);
* ``export_state(model)``: the weights to export under the original architecture's names, or
  ``None`` for the model's own state dict; called at every export step, training goes on after;
* ``finalize(model)``: after the last step, in place: the model becomes a plain model of its
  original architecture again (trained slices folded back, adapters merged);
* ``describe()``: what the method trains, in words: part of the training state's fingerprint.

:class:`TrainingMethod` itself trains what the model's ``requires_grad`` flags say (a freshly
loaded model: everything); :class:`FullTraining` makes every parameter trainable;
:class:`ExpertSubset` trains chosen experts, routers, shared experts (and optionally the embeddings)
of chosen layers, with the chosen experts split out of the fused tensors
(:func:`moelang.models.adapters.split_experts`), and with ``mask_router`` the router mask of expert
fine-tuning in its training steps (:func:`moelang.models.router_mask.router_mask`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from moelang.errors import MoelangError
from moelang.models.adapters import (
    ModelAdapter,
    bake,
    has_parametrizations,
    maybe_cached,
    merge_split_experts,
    split_experts,
    split_export_state,
)
from moelang.models.router_mask import check_router_mask, router_mask


@dataclass
class TrainingMethod:
    """Train what ``requires_grad`` says, as the caller left it (for example after
    :func:`moelang.models.adapters.train_only`, whose expert-rows parametrizations this method bakes
    into exports and, at the end, into the model)."""

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def before_step(self, model: nn.Module, step: int) -> None:
        pass

    def step_context(self):
        # expert-rows parametrizations are evaluated once per forward (no-op without them)
        return maybe_cached()

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        if not has_parametrizations(model):
            return None
        baked = copy.deepcopy(model)
        bake(baked)
        return baked.state_dict()

    def finalize(self, model: nn.Module) -> None:
        bake(model)

    def describe(self) -> str:
        return "the model's requires_grad flags"


@dataclass
class FullTraining(TrainingMethod):
    """Every parameter trains."""

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        model.requires_grad_(True)
        return list(model.parameters())

    def step_context(self):
        return contextlib.nullcontext()

    def describe(self) -> str:
        return "full training"


@dataclass
class ExpertSubset(TrainingMethod):
    """Freeze the model, then train ``experts`` ({layer: [expert ids]}; a layer's chosen experts as
    their own small experts module, folded back into the fused tensors by ``finalize``), the routers
    of the ``routers`` layers, the shared experts of the ``shared`` layers, and with ``embeddings``
    the input and output embeddings. With ``mask_router``, in every training step a token of a
    layer with chosen experts is routed among those experts only (the router mask,
    :mod:`moelang.models.router_mask`); evaluation and the saved model never see the mask."""

    experts: dict[int, list[int]] = field(default_factory=dict)
    routers: list[int] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)
    embeddings: bool = False
    mask_router: bool = False
    _adapter: ModelAdapter | None = field(default=None, init=False, repr=False, compare=False)

    def _masked_experts(self) -> dict[int, list[int]]:
        # a layer without chosen experts trains none: nothing to route to, no mask
        return {index: ids for index, ids in self.experts.items() if ids}

    def check(self, adapter: ModelAdapter) -> None:
        """One-line errors for layers and experts the model does not have (before any change)."""
        for index in set(self.experts) | set(self.routers) | set(self.shared):
            adapter.moe_layer(index)
        for index, expert_ids in self.experts.items():
            layer = adapter.moe_layer(index)
            bad = sorted(e for e in expert_ids if not 0 <= e < layer.num_experts)
            if bad:
                raise MoelangError(f"layer {index} has experts 0..{layer.num_experts - 1}; {bad} do not exist")

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        adapter = ModelAdapter(model)
        self.check(adapter)
        if self.mask_router:
            check_router_mask(adapter, self._masked_experts())  # a family the mask refuses stops here
        self._adapter = adapter
        model.requires_grad_(False)
        for index, expert_ids in sorted(self.experts.items()):
            layer = adapter.moe_layer(index)
            if len(set(expert_ids)) == layer.num_experts:  # all of them: the fused tensors themselves
                layer.experts.requires_grad_(True)
            elif expert_ids:
                split_experts(layer, expert_ids)
        for index in self.routers:
            adapter.moe_layer(index).router.requires_grad_(True)  # buffers (DeepSeek's bias) stay as they are
        for index in self.shared:
            for module in adapter.moe_layer(index).shared:
                module.requires_grad_(True)
        if self.embeddings:
            model.get_input_embeddings().requires_grad_(True)
            model.get_output_embeddings().requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]

    def step_context(self):
        if not self.mask_router:
            return contextlib.nullcontext()
        if self._adapter is None:
            raise RuntimeError("ExpertSubset.step_context() before prepare(model): the mask needs the prepared model")
        return router_mask(self._adapter, self._masked_experts())

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return split_export_state(model)

    def finalize(self, model: nn.Module) -> None:
        merge_split_experts(model)

    def describe(self) -> str:
        experts = {k: sorted(set(v)) for k, v in sorted(self.experts.items())}
        mask = ", router mask on the chosen experts" if self.mask_router else ""  # unchanged text without it
        return (f"expert subset: experts {experts}, routers {sorted(self.routers)}, shared {sorted(self.shared)}, "
                f"embeddings {self.embeddings}{mask}")


@dataclass
class ModuleSubset(TrainingMethod):
    """Freeze the model, then train every parameter of the named submodules (for example LayerMoE's
    stage 2: the routers and router classifiers, ``model.layers.{i}.mlp.gate`` and ``...classifier``)."""

    modules: list[str] = field(default_factory=list)
    peak_lrs: dict[str, float] = field(default_factory=dict)
    """Submodule name -> its own peak learning rate (the others train at the settings' ``lr``)."""

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        chosen = []
        for name in self.modules:
            try:
                chosen.append(model.get_submodule(name))
            except AttributeError:
                raise MoelangError(f"the model has no module '{name}' to train") from None
        model.requires_grad_(False)
        for module in chosen:
            module.requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]

    def step_context(self):
        return contextlib.nullcontext()

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return None

    def finalize(self, model: nn.Module) -> None:
        pass

    def describe(self) -> str:
        rates = f", peak learning rates {dict(sorted(self.peak_lrs.items()))}" if self.peak_lrs else ""
        return f"modules {sorted(self.modules)}{rates}"

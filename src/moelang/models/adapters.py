"""One small interface over the model families: the only way later stages touch model internals.

In transformers 5.x every MoE family stores a layer's experts as one module with fused 3-D tensors
(``gate_up_proj``, ``down_proj``, expert index first) and calls it as
``experts(hidden_states, top_k_index, top_k_weights)`` after its router has chosen. That call is
where this module looks:

* **experts actually used**: a forward pre-hook on the experts module sees ``top_k_index`` and
  ``top_k_weights``, the real selection, also for DeepSeek-V3, whose grouped routing (top groups
  first, then top-k inside them, with a score-correction bias) is *not* top-k of its router logits;
* **MLP input**: a forward pre-hook on ``layer.mlp`` sees the hidden state after attention and the
  post-attention norm, for MoE and dense layers alike;
* **trainable subsets**: :func:`train_only` freezes everything, then makes chosen experts of
  chosen layers trainable through a parametrization (``rows`` of the fused tensor come from a
  small parameter holding just those experts), so AdamW's weight decay, which moves every element
  of a parameter it is given, never touches a frozen expert. :func:`bake` folds the
  parametrizations back into plain tensors before ``save_pretrained``. It rebuilds the whole fused
  tensor every forward and computes its whole weight gradient: the reference, kept for tests;
* **split experts** (what training methods use, :mod:`moelang.models.methods`):
  :func:`split_experts` moves chosen experts into a copy of the family's experts class holding only
  them, with a global-to-local id map; the frozen fused tensors compute the other experts; the same
  gradients without a full copy. :func:`merge_split_experts` folds them back (before
  ``save_pretrained``); :func:`split_export_state` gives the weights to export without a copy.

Families (``model.config.model_type``): see :data:`moelang.architecture.FAMILIES`. Anything else
fails with a one-line error listing them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from moelang.architecture import FAMILIES, TOP_K_FIELD, FamilySpec, family_spec  # noqa: F401 (re-exported)
from moelang.errors import MoelangError

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


@dataclass
class MoELayer:
    """One MoE layer of a model, as the later stages see it."""

    index: int  # position among the decoder layers
    block: nn.Module  # layer.mlp
    router: nn.Module
    experts: nn.Module  # fused experts: gate_up_proj, down_proj (+ biases), expert index first
    num_experts: int
    top_k: int
    shared: list[nn.Module] = field(default_factory=list)
    transposed: bool = False

    def expert_tensor_names(self, spec: FamilySpec) -> tuple[str, ...]:
        return EXPERT_TENSORS + spec.expert_biases

    @property
    def expert_width(self) -> int:
        """An expert's intermediate size, read off its fused down projection: [E, hidden, width], or
        [E, width, hidden] when transposed."""
        shape = self.experts.down_proj.shape
        return int(shape[1] if self.transposed else shape[2])


def unwrapped(module: nn.Module | None) -> nn.Module | None:
    """``module``, or the module inside it when a PEFT tuner layer wraps it (LoRA on its raw
    parameters, :mod:`moelang.models.lora`; nested wrappers included): the family's own experts and
    router modules, whose tensors and attributes the adapter reads and whose forward its hooks see."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


class ModelAdapter:
    """The family-independent view of a causal LM (see the module docstring)."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = family_spec(model_type)
        if spec is None:
            raise MoelangError(f"model family '{model_type}' is not supported; supported families: "
                               f"{', '.join(sorted(FAMILIES))} (and their LayerMoE expansions)")
        self.model = model
        self.family = model_type
        self.spec = spec
        self.layers: list[nn.Module] = list(self._decoder_layers(model))
        self.moe_layers: list[MoELayer] = [m for m in map(self._moe_layer, range(len(self.layers))) if m]

    @staticmethod
    def _decoder_layers(model) -> nn.ModuleList:
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise MoelangError(f"{type(model).__name__} has no decoder layers at model.layers; it is not a supported "
                               f"causal LM layout")
        return layers

    def _moe_layer(self, index: int) -> MoELayer | None:
        mlp = self.layers[index].mlp
        experts = unwrapped(getattr(mlp, "experts", None))
        if self.spec.router_attr is None or experts is None:
            return None  # a dense layer (a dense family, or DeepSeek's first_k_dense_replace layers)
        router = unwrapped(getattr(mlp, self.spec.router_attr))
        return MoELayer(
            index=index,
            block=mlp,
            router=router,
            experts=experts,
            # read off the fused tensor, not the config: layers of an expanded model (LayerMoE) have
            # different expert counts, which one config field cannot say
            num_experts=int(experts.down_proj.shape[0]),
            top_k=int(router.top_k),
            shared=[getattr(mlp, a) for a in self.spec.shared_attrs if getattr(mlp, a, None) is not None],
            transposed=self.spec.transposed,
        )

    # ----------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def experts_per_layer(self) -> dict[int, int]:
        """MoE layer index -> its number of routed experts (they may differ between layers)."""
        return {m.index: m.num_experts for m in self.moe_layers}

    def moe_layer(self, index: int) -> MoELayer:
        for layer in self.moe_layers:
            if layer.index == index:
                return layer
        raise MoelangError(f"layer {index} of this {self.family} model is not an MoE layer; MoE layers: "
                           f"{[m.index for m in self.moe_layers]}")

    def mlp_input_module(self, index: int) -> nn.Module:
        """The module whose input is layer ``index``'s MLP input (post-attention, post-norm)."""
        return self.layers[index].mlp

    # ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record_routing(self, callback) -> Iterator[None]:
        """Call ``callback(layer_index, top_k_index, top_k_weights)`` with the experts each token
        actually used, at every MoE layer, during forward passes inside the block. Tensors stay on
        the model's device; they are the model's own (read, do not modify)."""
        handles = []
        for layer in self.moe_layers:
            def hook(module, args, kwargs, index=layer.index):
                names = ("hidden_states", "top_k_index", "top_k_weights")
                values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
                callback(index, values["top_k_index"], values["top_k_weights"])

            handles.append(layer.experts.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def capture_mlp_inputs(self, callback, layers: list[int] | None = None) -> Iterator[None]:
        """Call ``callback(layer_index, hidden)`` with each chosen layer's MLP input
        ([batch, seq, hidden]) during forward passes inside the block."""
        handles = []
        for index in layers if layers is not None else range(self.num_layers):
            def hook(module, args, kwargs, index=index):
                hidden = args[0] if args else kwargs["hidden_states"]
                callback(index, hidden)

            handles.append(self.mlp_input_module(index).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# --------------------------------------------------------------------------------------------------
# Trainable subsets
# --------------------------------------------------------------------------------------------------

class ExpertRows(nn.Module):
    """Parametrization of a fused expert tensor: the rows (experts) in ``index`` come from the
    trainable ``rows``; every other row is the frozen original."""

    def __init__(self, original: torch.Tensor, index: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(sorted(index), dtype=torch.long, device=original.device))
        self.rows = nn.Parameter(original.detach()[self.index].clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.index_copy(0, self.index, self.rows.to(original.dtype))


def train_only(adapter: ModelAdapter, experts: dict[int, list[int]] | None = None, routers: list[int] | None = None,
               shared: list[int] | None = None, everything: bool = False) -> list[str]:
    """Freeze the model, then make trainable: ``experts`` ({layer: [expert ids]}, only those rows of
    the fused tensors), the routers of the ``routers`` layers and the shared experts of the
    ``shared`` layers; or ``everything``. Returns the names of the trainable parameters."""
    model = adapter.model
    if everything:
        model.requires_grad_(True)
        return [n for n, p in model.named_parameters() if p.requires_grad]
    model.requires_grad_(False)
    for index, expert_ids in (experts or {}).items():
        layer = adapter.moe_layer(index)
        bad = [e for e in expert_ids if not 0 <= e < layer.num_experts]
        if bad:
            raise MoelangError(f"layer {index} has experts 0..{layer.num_experts - 1}; {bad} do not exist")
        if not expert_ids:
            continue
        for name in layer.expert_tensor_names(adapter.spec):
            if len(expert_ids) == layer.num_experts:
                getattr(layer.experts, name).requires_grad_(True)
                continue
            parametrize.register_parametrization(layer.experts, name, ExpertRows(getattr(layer.experts, name), expert_ids),
                                                 unsafe=True)
            getattr(layer.experts.parametrizations, name).original.requires_grad_(False)
    for index in routers or []:
        adapter.moe_layer(index).router.requires_grad_(True)
        # keep non-trainable router buffers (e.g. DeepSeek's correction bias) as they are
    for index in shared or []:
        for module in adapter.moe_layer(index).shared:
            module.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def has_parametrizations(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def bake(model: nn.Module) -> None:
    """Fold every expert-rows parametrization into a plain parameter (before ``save_pretrained``)."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def maybe_cached():
    """``parametrize.cached()``: evaluate each parametrization once per forward (the eager experts
    loop reads a fused tensor once per expert)."""
    return parametrize.cached()


# --------------------------------------------------------------------------------------------------
# Chosen experts as their own small experts module
# --------------------------------------------------------------------------------------------------
# The expert-rows parametrization above rebuilds the whole fused tensor every forward and computes
# its whole weight gradient (about 3 GiB fp32 per OLMoE-1B-7B layer pair). Splitting instead moves
# the chosen experts' slices into a copy of the family's experts class that holds only them (the
# child ``chosen``, trainable); the fused tensors stay in place, frozen, and compute the other
# experts. A global-to-local id map (``local_ids``) sends the router's choices to the right module.
# Each (token, choice) row is computed by exactly one of the two through the family's own experts
# kernel (grouped_mm, batched_mm or eager, biases and gating included) and the rows are summed over
# the choices as grouped_mm does, so the gradients are those of the parametrization.

SPLIT_CHILD = "chosen"
_SPLIT_CLASSES: dict[type, type] = {}


class _SplitExpertsForward:
    """Forward of a fused experts module whose chosen experts live in its child ``chosen``
    (mixed into a subclass of the family's experts class by :func:`split_experts`)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1, 1)
        local = self.local_ids[ids]  # chosen: its row in ``chosen``; other experts: -1
        is_chosen = local >= 0
        out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        rows = hidden_states.new_zeros(ids.numel(), hidden_states.shape[-1], dtype=out_dtype)
        chosen = getattr(self, SPLIT_CHILD)
        # super(): the family's experts forward (its kernel dispatch) on the frozen fused tensors
        parts = ((lambda *a: super(_SplitExpertsForward, self).forward(*a), ids, ~is_chosen),
                 (chosen, local, is_chosen))
        for compute, expert_ids, mask in parts:
            positions = mask.nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            # one choice per row: the kernel's sum over choices is the row itself
            part = compute(hidden_states[positions // top_k], expert_ids[positions].unsqueeze(1), weights[positions])
            rows = rows.index_copy(0, positions, part.to(out_dtype))
        if torch.is_grad_enabled() and not bool(is_chosen.any()):
            # No token chose a trainable expert: a zero gradient (not none), as the parametrization and
            # full training give, so that AdamW's moments and weight decay act on them in this step too.
            rows = rows + sum(p.reshape(-1)[:1].sum() for p in chosen.parameters()) * 0.0
        return rows.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _split_class(cls: type) -> type:
    if cls not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[cls] = type(f"Split{cls.__name__}", (_SplitExpertsForward, cls), {})
    return _SPLIT_CLASSES[cls]


def is_split(experts: nn.Module) -> bool:
    return isinstance(experts, _SplitExpertsForward)


def _experts_subset(experts: nn.Module, expert_ids: list[int]) -> nn.Module:
    """An instance of ``experts``' own class holding copies of the ``expert_ids`` slices only (the
    family's forward and kernel dispatch, gating and biases included, unchanged)."""
    cls = type(experts)
    small = cls.__new__(cls)
    nn.Module.__init__(small)
    internal = set(small.__dict__)
    for key, value in experts.__dict__.items():
        if key not in internal:
            small.__dict__[key] = value  # config, activation parameters, kernel flags
    for name, module in experts._modules.items():  # activation modules: stateless, shared
        if any(True for _ in module.parameters()):
            raise MoelangError(f"{cls.__name__}.{name} has weights of its own; splitting chosen experts out of "
                               f"{cls.__name__} is not supported")
        small._modules[name] = module
    index = torch.tensor(expert_ids, dtype=torch.long, device=next(experts.parameters()).device)
    for name, param in experts._parameters.items():
        small.register_parameter(name, None if param is None else nn.Parameter(param.detach()[index].clone()))
    small.num_experts = len(expert_ids)
    small._is_expert_parallel = False
    return small


def split_experts(layer: MoELayer, expert_ids: list[int]) -> nn.Module:
    """Make experts ``expert_ids`` of ``layer`` trainable as their own small experts module (the
    child ``chosen`` of the fused experts module, whose own tensors are frozen). Returns it."""
    experts = layer.experts
    if is_split(experts):
        raise MoelangError(f"layer {layer.index}: its experts are already split")
    ids = sorted(set(expert_ids))
    experts.requires_grad_(False)
    chosen = _experts_subset(experts, ids)
    local = torch.full((layer.num_experts,), -1, dtype=torch.long)
    local[ids] = torch.arange(len(ids))
    experts.register_buffer("local_ids", local.to(chosen.down_proj.device), persistent=False)
    experts.add_module(SPLIT_CHILD, chosen)
    experts.__class__ = _split_class(type(experts))
    return chosen


def sync_split_experts(model: nn.Module) -> None:
    """Copy every split module's chosen slices into its fused tensors (in place). The split forward
    never reads those rows of the fused tensors, so training can go on afterwards."""
    with torch.no_grad():
        for module in model.modules():
            if is_split(module):
                ids = (module.local_ids >= 0).nonzero().squeeze(1)  # ascending: local row j is ids[j]
                for name, param in getattr(module, SPLIT_CHILD)._parameters.items():
                    if param is not None:
                        target = getattr(module, name)
                        target.index_copy_(0, ids, param.to(target.dtype))


def merge_split_experts(model: nn.Module) -> None:
    """Fold every split module back: the fused tensors take the trained slices and the modules are
    again the family's plain experts class (before ``save_pretrained``)."""
    sync_split_experts(model)
    for module in model.modules():
        if is_split(module):
            del module._modules[SPLIT_CHILD]
            del module._buffers["local_ids"]
            module.__class__ = module.__class__.__mro__[2]  # Split<X> -> (_SplitExpertsForward, X)


def split_export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under the original architecture's names, split modules folded in,
    without a copy of the model: what ``save_pretrained(state_dict=...)`` takes."""
    sync_split_experts(model)
    marker = f".{SPLIT_CHILD}."
    return {name: tensor for name, tensor in model.state_dict().items() if marker not in name}

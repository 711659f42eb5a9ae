"""The router mask of expert fine-tuning: while training, a token can only be routed to the chosen
experts of a masked layer.

:func:`router_mask` (``adapter``, ``{layer index: [chosen expert ids]}``) is a context manager. While it
is active, and only while a masked layer's router is in training mode (``module.training``), that
router's logits of non-chosen experts are ``-inf`` *before* the family's softmax (or sigmoid) and
top-k, so the routing weights renormalise over the chosen set: exactly the routing the family would
compute if the non-chosen experts did not exist. A chosen set smaller than top-k leaves the extra
slots at weight exactly 0 (on some non-chosen expert, which then contributes nothing; the
authors' code does the same). In eval mode the router runs its own, unmasked forward; outside the
block nothing is left: no hook, no attribute, no buffer, so a ``save_pretrained`` model never holds
a mask.

**The seam.** In transformers 5 each family's router computes linear -> softmax -> top-k (and the
renormalisation) in its one ``forward`` and returns ``(logits, weights, indices)``; a forward hook
on its output would be too late. So the mask replaces, on the router *instance*, ``forward`` (or
``_old_forward`` where accelerate's dispatch hook wraps it, so that its device moves still happen)
with the family's routing re-stated below with the mask applied to the logits. Every re-statement
equals the family's own forward bit-for-bit when every expert is chosen (tested per family, which
catches a transformers release that changes a router), and a router of another class (remote
code, a newer release) is refused in one line rather than masked wrongly.

Families (``transformers.models.<family>.modeling_<family>``):

* ``olmoe``, ``qwen2_moe``, ``qwen3_moe``: softmax over the logits in float32, top-k of the
  probabilities, divided by their sum if ``norm_topk_prob``, cast to the logits' dtype. With the
  mask the softmax is over the chosen experts only; non-chosen probabilities are exactly 0.
* ``mixtral``: the same, always renormalised over the top-k, weights kept in float32.
* ``gpt_oss``: top-k of the logits (with the router bias), then softmax over the k chosen values.
  Masked logits are ``-inf`` before the top-k, so a slot that finds no chosen expert has a ``-inf``
  value and weight ``exp(-inf) = 0`` in that softmax (never NaN: each token has at least one
  chosen expert with a finite logit).
* ``deepseek_v3``: weights are ``sigmoid(logits)`` of the selected experts (renormalised if
  ``norm_topk_prob``, times ``routed_scaling_factor``); the *selection* uses ``sigmoid(logits) +
  e_score_correction_bias``, first keeping the ``topk_group`` groups with the largest sum of their
  two best scores, then top-k inside them. Masking only the logits would not be enough: a masked
  expert's score would be ``0 + bias`` and a large bias would bring it back. So the selection score
  of a masked expert is ``-inf`` too (and its weight ``sigmoid(-inf) = 0``). A group's score is the
  sum of its best two *chosen* experts' scores (its one chosen expert's score if it holds one; a
  group with none cannot be kept); a slot for which the kept groups hold no further chosen expert
  gets weight 0.

**What ``output_router_logits`` sees.** The router's first output, which transformers records for
``output_router_logits`` (the load-balancing loss, and the engine's router z-loss), is the
*masked* logits, chosen deliberately: the balancing loss then describes the routing that actually
happens (balance among the chosen experts, probability 0 on the others) instead of pulling
probability towards experts the mask never lets through, and both losses stay finite (softmax and
logsumexp of a row with ``-inf`` entries and at least one finite one). Adaptation uses no
balancing loss by default (the authors use none). The gradient of a masked logit is 0, so a
non-chosen expert's router row gets no gradient from the loss (weight decay still shrinks it, as
in the authors' runs).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moelang.errors import MoelangError
from moelang.models.adapters import ModelAdapter, MoELayer

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logits, top-k weights, top-k indices)
NEG_INF = float("-inf")


def _softmax_then_top_k(router: nn.Module, hidden_states: torch.Tensor, allowed: torch.Tensor) -> Routing:
    """OlmoeTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter with masked logits."""
    hidden_states = hidden_states.reshape(-1, router.hidden_dim)
    logits = F.linear(hidden_states, router.weight).masked_fill(~allowed, NEG_INF)
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if router.norm_topk_prob:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value.to(logits.dtype), top_index


def _mixtral(router: nn.Module, hidden_states: torch.Tensor, allowed: torch.Tensor) -> Routing:
    """MixtralTopKRouter with masked logits: always renormalised, weights in float32."""
    hidden_states = hidden_states.reshape(-1, router.hidden_dim)
    logits = F.linear(hidden_states, router.weight).masked_fill(~allowed, NEG_INF)
    probs = F.softmax(logits.float(), dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    return logits, top_value / top_value.sum(dim=-1, keepdim=True), top_index


def _gpt_oss(router: nn.Module, hidden_states: torch.Tensor, allowed: torch.Tensor) -> Routing:
    """GptOssTopKRouter with masked logits: top-k of the logits, softmax over the k values."""
    logits = F.linear(hidden_states, router.weight, router.bias).masked_fill(~allowed, NEG_INF)
    top_value, top_index = torch.topk(logits, router.top_k, dim=-1)
    return logits, F.softmax(top_value, dim=1, dtype=top_value.dtype), top_index


def _deepseek_v3(router: nn.Module, hidden_states: torch.Tensor, allowed: torch.Tensor) -> Routing:
    """DeepseekV3TopkRouter with masked logits and masked selection scores (see the module
    docstring for the groups)."""
    hidden_states = hidden_states.view(-1, router.hidden_dim)
    logits = F.linear(hidden_states.type(torch.float32), router.weight.type(torch.float32)).masked_fill(~allowed, NEG_INF)
    scores = logits.sigmoid()  # a masked expert: exactly 0
    # -inf whatever the correction bias: a masked expert must not come back through it
    scores_for_choice = (scores + router.e_score_correction_bias).masked_fill(~allowed, NEG_INF)
    best_two = scores_for_choice.view(-1, router.num_group, router.num_experts // router.num_group).topk(2, dim=-1)[0]
    group_scores = best_two.masked_fill(best_two == NEG_INF, 0.0).sum(dim=-1)  # as the family when all are chosen
    group_scores = group_scores.masked_fill(best_two[..., 0] == NEG_INF, NEG_INF)  # no chosen expert: never kept
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (group_mask.unsqueeze(-1).expand(-1, router.num_group, router.num_experts // router.num_group)
                  .reshape(-1, router.num_experts))
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), NEG_INF)
    top_value, top_index = torch.topk(scores_for_choice, k=router.top_k, dim=-1, sorted=False)
    # a slot that found no chosen expert in the kept groups (a chosen expert of another group
    # included) carries nothing
    top_weights = scores.gather(1, top_index).masked_fill(top_value == NEG_INF, 0.0)
    if router.norm_topk_prob:
        top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, top_weights * router.routed_scaling_factor, top_index


# family -> (the router class whose forward the function re-states, the masked routing)
MASKED_ROUTING: dict[str, tuple[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], Routing]]] = {
    "olmoe": ("OlmoeTopKRouter", _softmax_then_top_k),
    "qwen2_moe": ("Qwen2MoeTopKRouter", _softmax_then_top_k),
    "qwen3_moe": ("Qwen3MoeTopKRouter", _softmax_then_top_k),
    "mixtral": ("MixtralTopKRouter", _mixtral),
    "deepseek_v3": ("DeepseekV3TopkRouter", _deepseek_v3),
    "gpt_oss": ("GptOssTopKRouter", _gpt_oss),
}

_MASKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # routers masked right now


def check_router_mask(adapter: ModelAdapter, experts: dict[int, list[int]]) -> list[tuple[MoELayer, list[int]]]:
    """One-line errors, before anything changes, for a mask this model cannot take: a family (or a
    router class) whose routing this module does not re-state, a layer that is not an MoE layer,
    an empty chosen set, expert ids the layer does not have. Returns the (layer, sorted chosen ids)
    pairs to mask."""
    if adapter.family not in MASKED_ROUTING:
        raise MoelangError(f"router mask: the {adapter.family} family is not supported (its routing is not re-stated "
                           f"in moelang.models.router_mask); supported: {', '.join(sorted(MASKED_ROUTING))}")
    expected, _ = MASKED_ROUTING[adapter.family]
    plan = []
    for index, expert_ids in sorted(experts.items()):
        layer = adapter.moe_layer(index)
        router_classes = [cls.__name__ for cls in type(layer.router).__mro__]
        if expected not in router_classes:
            raise MoelangError(f"router mask: layer {index}'s router is {type(layer.router).__name__}, not the "
                               f"{adapter.family} family's {expected} whose routing the mask re-states; load the model "
                               f"with transformers' own {adapter.family} code (trust_remote_code off)")
        ids = sorted(set(int(e) for e in expert_ids))
        if not ids:
            raise MoelangError(f"router mask: layer {index} has no chosen expert; every token needs at least one, so "
                               f"leave the layer out of the mask or choose experts for it")
        bad = [e for e in ids if not 0 <= e < layer.num_experts]
        if bad:
            raise MoelangError(f"router mask: layer {index} has experts 0..{layer.num_experts - 1}; {bad} do not exist")
        plan.append((layer, ids))
    return plan


@contextlib.contextmanager
def router_mask(adapter: ModelAdapter, experts: dict[int, list[int]]) -> Iterator[None]:
    """While active, a token of layer ``index`` (a key of ``experts``) can only be routed to
    ``experts[index]``, in training mode only (see the module docstring). Every problem is refused
    before any router changes; on exit (also after an exception) every router is as it was."""
    _, masked_routing = MASKED_ROUTING.get(adapter.family, (None, None))
    plan = check_router_mask(adapter, experts)
    for layer, _ in plan:
        if layer.router in _MASKED:
            raise MoelangError(f"router mask: layer {layer.index}'s router is already masked; one mask at a time")
    restore = []
    try:
        for layer, ids in plan:
            restore.append(_install(layer, ids, masked_routing))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _install(layer: MoELayer, chosen: list[int], masked_routing) -> Callable[[], None]:
    router = layer.router
    allowed = torch.zeros(layer.num_experts, dtype=torch.bool, device=router.weight.device)
    allowed[chosen] = True
    # accelerate's dispatch hook (device_map) wraps the module's own forward, kept in _old_forward
    attr = "_old_forward" if "_old_forward" in router.__dict__ else "forward"
    previous = router.__dict__.get(attr)  # an instance attribute to put back, or None
    unmasked = getattr(router, attr)

    def forward(hidden_states):
        if not router.training:
            return unmasked(hidden_states)
        return masked_routing(router, hidden_states, allowed)

    router.__dict__[attr] = forward
    _MASKED.add(router)

    def undo() -> None:
        if previous is None:
            del router.__dict__[attr]
        else:
            router.__dict__[attr] = previous
        _MASKED.discard(router)

    return undo

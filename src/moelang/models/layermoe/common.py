"""The parts every expanded family shares: config fields, router, router classifier, upcycled
experts, the expanded block and the mixins that the per-family model classes are made of.

An *expanded* model (LayerMoE, arXiv 2505.22582; MoE-LPR, arXiv 2408.11396) is a base model whose
layers were given new experts, a different number per layer. Its config records, one entry per
decoder layer, ``num_experts_per_layer`` (1: the layer stayed a dense FFN) and
``num_original_experts`` (the experts the layer had in the model it was expanded from: 1 for a dense
base, E for an MoE base; after a second expansion, the experts of the first expanded model), the
router ``num_experts_per_tok``, ``norm_topk_prob``, the ``classifier_layers`` and
``classifier_groups``.

Routing in an expanded layer (:class:`ExpandedTopKRouter`): softmax over all of the layer's experts
in fp32, top-k with ``k = min(num_experts_per_tok, experts)``, the k weights renormalised when
``norm_topk_prob`` (the upcycled dense families: always, as the paper does; an MoE base keeps its
family's choice). Router logits are returned for every token (``output_router_logits``), also where
a classifier restricts the choice.

New-expert prior (``new_expert_prior``, alpha in [0, 1], default 1): the new experts' logits get
``log(alpha)`` added before the softmax, so each new expert's unnormalised probability is alpha times
its own. At 0 no new expert is ever chosen and its probability is exactly 0, so the layer routes and
weighs exactly as it did before the expansion (a grown MoE layer computes its base's output; the
returned logits then carry a finite -1e4, not -inf, so log-probabilities stay finite). Stage 1 of
the expansion can ramp it from 0 to 1 (:mod:`moelang.models.layermoe.admission`); a trained model
keeps 1, where the term vanishes.

Router classifier (:class:`RouterClassifier`, on ``classifier_layers``): a bias-free linear layer
(hidden -> ``classifier_groups``) on a pooled statistic of the layer's MLP input; its argmax is a
hard decision (in training too). Class 0 (old): each token is routed among the layer's original
experts only, exactly as top-k routing would route among them alone (softmax over the original
experts' logits; a dense base: expert 0 with weight 1; slots beyond the original count point at the
first chosen expert with weight 0). Any other class: normal top-k over all experts. The classifier's
logits are recorded (``output_classifier_logits``) for its training loss. Two settings:

- ``classifier_pooling``: ``sum``, **the authors'**: the plain sum of the MLP inputs, padding
  positions included (their code does not mask them). Its scale grows with the sequence length (a
  128-token sum of RMS-normalised states has a norm near 1,000), so at a small model's learning rate
  the logits saturate and the classifier does not learn (measured on the default: held-out accuracy
  below the majority class, loss 26-105, and its gradient dominates the norm that clipping shrinks
  the routers' updates by). ``mean`` (**ours, the default**): the mean over the valid (unpadded)
  positions, whose scale is that of one hidden state whatever the length.
- ``classifier_decision``: ``sequence``, **the authors'**: one decision per sequence from the whole
  sequence, so a token's routing depends on the tokens after it (and, with ``sum`` pooling, on the
  right padding its batch adds): scores that see the future. ``causal`` (**ours, the default**):
  position t is decided from positions 1..t only (the pooled prefix), so a token's log-likelihood does
  not depend on later tokens or on the other rows of its batch; logits ``[batch, seq, groups]`` and
  the training loss is the cross-entropy of every position's prefix against the sequence's group.

The padding mask reaches the classifiers from the decoder's ``attention_mask`` (a 2-D padding mask;
any other mask: every position counts).

**Generation with a KV cache:** with ``causal`` decisions the prefix's sum and count are carried
from one cached forward to the next (reset by a forward without cached tokens), so a generated
token is decided exactly as it would be in one forward over the whole text; the carried state
follows the batch's rows in order (a beam search that reorders rows is not followed). With
``sequence`` decisions each forward decides from the tokens it is given: the prefill step classifies
the prompt, and every later step the single new token (the authors' behaviour with a cache).

Load balancing (:func:`load_balancing_loss`): Mixtral's form, ``N_i * sum_e f_e P_e`` in each MoE
layer with that layer's own expert count and top-k, averaged over the layers (transformers'
function assumes one count for all layers). Its balanced value is k, not 1. Padding is left out
(``attention_mask``); in a forward with a KV cache the mask spans the cached tokens too, and only
its last positions, those of the new tokens, are used.

Experts kernels: the expanded classes take transformers' ``experts_implementation`` (``grouped_mm``,
the default where it runs; ``batched_mm``; ``eager``), the upcycled families too.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils.output_capturing import OutputRecorder

# Fields an expanded config adds to its base family's config, with their defaults; a field the base
# already has (an MoE family's top-k, norm_topk_prob, router_aux_loss_coef, output_router_logits)
# keeps the base's definition and value.
EXPANDED_FIELDS: dict[str, tuple[object, object]] = {
    "num_experts_per_layer": (list[int] | None, None),
    "num_original_experts": (list[int] | None, None),
    "num_experts_per_tok": (int, 2),
    "norm_topk_prob": (bool, True),
    "classifier_layers": (list[int] | None, None),
    "classifier_groups": (int, 2),
    "classifier_pooling": (str, "mean"),
    "classifier_decision": (str, "causal"),
    "output_router_logits": (bool, False),
    "output_classifier_logits": (bool, False),
    "router_aux_loss_coef": (float, 0.01),
    "expanded_from": (str | None, None),
    "new_expert_prior": (float, 1.0),
}


def expanded_config_class(base: type, model_type: str, name: str) -> type:
    """A subclass of the family's config class ``base`` with :data:`EXPANDED_FIELDS` and
    ``model_type`` (the per-family configuration files call this)."""
    have = {f.name for f in dataclasses.fields(base)}
    annotations = {k: t for k, (t, _) in EXPANDED_FIELDS.items() if k not in have}
    namespace = {"__annotations__": annotations, "model_type": model_type, "__module__": base.__module__,
                 "__doc__": f"{base.__name__} of a model expanded with new experts (moelang.models.layermoe)."}
    namespace.update({k: d for k, (_, d) in EXPANDED_FIELDS.items() if k in annotations})
    cls = strict(type(name, (base,), namespace))
    return cls


def layer_counts(config) -> list[int]:
    counts = list(config.num_experts_per_layer or [])
    if len(counts) != config.num_hidden_layers:
        raise ValueError(f"{config.model_type}: num_experts_per_layer has {len(counts)} entries for "
                         f"{config.num_hidden_layers} layers; give one per layer (1 for a dense layer)")
    return counts


def original_counts(config) -> list[int]:
    counts = list(config.num_original_experts or [1] * config.num_hidden_layers)
    if len(counts) != config.num_hidden_layers:
        raise ValueError(f"{config.model_type}: num_original_experts has {len(counts)} entries for "
                         f"{config.num_hidden_layers} layers")
    return counts


# --------------------------------------------------------------------------------------------------
# Router, classifier, experts
# --------------------------------------------------------------------------------------------------

class ExpandedTopKRouter(nn.Module):
    """Top-k router over a layer's experts (see the module docstring). ``restrict`` (set by the
    block for one forward): a bool per token, True where the token may use the original experts
    only. Returns ``(router_logits, top_k_weights, top_k_index)`` like the families' routers."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, num_original: int, norm_topk_prob: bool):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_experts = num_experts
        self.num_original = num_original
        self.top_k = min(top_k, num_experts)
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.restrict: torch.Tensor | None = None
        self.new_expert_prior = 1.0

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        if self.new_expert_prior < 1 and self.num_experts > self.num_original:
            # log(0) as -1e4: exp underflows to exactly 0 in fp32 and log-softmax stays finite
            offset = math.log(self.new_expert_prior) if self.new_expert_prior > 0 else -1e4
            router_logits = torch.cat([router_logits[:, : self.num_original],
                                       router_logits[:, self.num_original:] + offset], dim=-1)
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.restrict is not None and bool(self.restrict.any()):
            old_weights, old_index = self._original_top_k(router_logits)
            keep = self.restrict.view(-1, 1)
            weights = torch.where(keep, old_weights, weights)
            index = torch.where(keep, old_index, index)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights.to(router_logits.dtype), index

    def _original_top_k(self, router_logits: torch.Tensor):
        """Top-k as if the layer had its original experts only (the old class of the classifier)."""
        k = min(self.top_k, self.num_original)
        probs = torch.softmax(router_logits[:, : self.num_original].float(), dim=-1)
        weights, index = torch.topk(probs, k, dim=-1)
        if k < self.top_k:  # spare slots: the first chosen expert again, with weight 0
            spare = self.top_k - k
            index = torch.cat([index, index[:, :1].expand(-1, spare)], dim=-1)
            weights = torch.cat([weights, weights.new_zeros(weights.shape[0], spare)], dim=-1)
        return weights, index

    def extra_repr(self) -> str:
        prior = f", new_expert_prior={self.new_expert_prior:g}" if self.new_expert_prior != 1 else ""
        return f"experts={self.num_experts}, original={self.num_original}, top_k={self.top_k}{prior}"


CLASSIFIER_POOLINGS = ("mean", "sum")
CLASSIFIER_DECISIONS = ("causal", "sequence")


class RouterClassifier(nn.Module):
    """Old/new classifier of one layer (see the module docstring): logits ``[batch, groups]``
    (``decision="sequence"``) or ``[batch, seq, groups]`` (``"causal"``) from the pooled MLP input.

    Per forward the decoder sets ``valid`` (``[batch, seq]``, 1 at real tokens; None: all) and
    ``continues`` (the forward extends cached tokens: causal prefixes start from ``carry``)."""

    def __init__(self, hidden_size: int, groups: int, pooling: str = "mean", decision: str = "causal"):
        super().__init__()
        if pooling not in CLASSIFIER_POOLINGS or decision not in CLASSIFIER_DECISIONS:
            raise ValueError(f"router classifier: pooling '{pooling}' (one of {CLASSIFIER_POOLINGS}), decision "
                             f"'{decision}' (one of {CLASSIFIER_DECISIONS})")
        self.weight = nn.Parameter(torch.empty(groups, hidden_size))
        self.pooling = pooling
        self.decision = decision
        self.valid: torch.Tensor | None = None
        self.continues = False
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # prefix sum [batch, d], count [batch, 1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.pooling == "sum" and self.decision == "sequence":  # the authors' formulation, exactly
            return F.linear(hidden_states.sum(dim=1), self.weight)
        batch, seq, _ = hidden_states.shape
        if self.pooling == "sum":  # the authors' unmasked sum
            valid = hidden_states.new_ones(batch, seq, 1)
        else:
            valid = (self.valid.to(hidden_states.dtype).unsqueeze(-1) if self.valid is not None
                     else hidden_states.new_ones(batch, seq, 1))
        masked = hidden_states * valid
        if self.decision == "sequence":
            total = masked.sum(dim=1)
            if self.pooling == "mean":
                total = total / valid.sum(dim=1).clamp(min=1)
            return F.linear(total, self.weight)
        sums, counts = masked.cumsum(dim=1), valid.cumsum(dim=1)
        carry = self.carry if self.continues else None
        if carry is not None and carry[0].shape[0] == batch:
            sums = sums + carry[0].unsqueeze(1)
            counts = counts + carry[1].unsqueeze(1)
        self.carry = (sums[:, -1].detach(), counts[:, -1].detach())
        pooled = sums / counts.clamp(min=1) if self.pooling == "mean" else sums
        return F.linear(pooled, self.weight)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}, decision={self.decision}"


@use_experts_implementation
class UpcycledExperts(nn.Module):
    """Fused experts of an upcycled dense layer (the layout of transformers' MoE families:
    ``gate_up_proj [E, 2 I, d]``, ``down_proj [E, d, I]``), each a copy of the dense SwiGLU FFN."""

    def __init__(self, config, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit:
            expert = expert[0]
            slot, token = torch.where(mask[expert])
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------

class ClassifiedRoutingMixin:
    """Forward of an expanded block with an optional ``classifier`` (see the module docstring): the
    classifier decides per sequence, the router learns it through ``restrict`` for this forward."""

    classifier: RouterClassifier | None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        classifier = getattr(self, "classifier", None)
        if classifier is None:
            return super().forward(hidden_states)
        old = classifier(hidden_states).argmax(dim=-1) == 0  # [batch] (sequence) or [batch, seq] (causal)
        self.gate.restrict = old.reshape(-1) if old.dim() == 2 else old.repeat_interleave(hidden_states.shape[1])
        try:
            return super().forward(hidden_states)
        finally:
            self.gate.restrict = None


def _router_for(config, layer_idx: int) -> ExpandedTopKRouter:
    router = ExpandedTopKRouter(config.hidden_size, layer_counts(config)[layer_idx], config.num_experts_per_tok,
                                original_counts(config)[layer_idx], bool(config.norm_topk_prob))
    router.new_expert_prior = float(config.new_expert_prior)
    return router


def _classifier_for(config, layer_idx: int) -> RouterClassifier | None:
    if layer_idx in (config.classifier_layers or []):
        return RouterClassifier(config.hidden_size, config.classifier_groups, config.classifier_pooling,
                                config.classifier_decision)
    return None


class _UpcycledBlock(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.gate = _router_for(config, layer_idx)
        self.experts = UpcycledExperts(config, layer_counts(config)[layer_idx])
        self.classifier = _classifier_for(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        _, weights, index = self.gate(flat)
        return self.experts(flat, index, weights).reshape(batch, seq, hidden)


class UpcycledSparseMoeBlock(ClassifiedRoutingMixin, _UpcycledBlock):
    """An upcycled dense layer: expert 0 is the original FFN, the others start as its copies."""


class GrownBlockMixin(ClassifiedRoutingMixin):
    """Mixed into an MoE family's sparse block (``gate``, ``experts``): the layer's experts grow to
    its ``num_experts_per_layer`` entry and the router becomes an :class:`ExpandedTopKRouter`; the
    family's forward (shared experts included) is unchanged."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config)
        count = layer_counts(config)[layer_idx]
        experts = self.experts
        for name, param in list(experts._parameters.items()):
            if param is not None:
                experts._parameters[name] = nn.Parameter(param.new_empty((count, *param.shape[1:])))
        experts.num_experts = count
        self.gate = _router_for(config, layer_idx)
        self.classifier = _classifier_for(config, layer_idx)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def expanded_recorders(base_model_class: type) -> dict:
    """The base family's recorded outputs plus the expanded routers' logits and the classifiers'."""
    return {**base_model_class._can_record_outputs,
            "router_logits": OutputRecorder(ExpandedTopKRouter, index=0),
            "classifier_logits": OutputRecorder(RouterClassifier, index=0)}


class ExpandedInitMixin:
    """Weights of the modules that the base family's ``_init_weights`` does not know (a model built
    from its config; the expansion copies real weights over them)."""

    # Every expanded family's experts take transformers' experts kernels (grouped_mm, batched_mm,
    # eager). transformers decides whether a class may choose one by looking for
    # "@use_experts_implementation" in the source of the class's own module, which the per-family
    # files do not contain (the decorator is on UpcycledExperts here): without this, an upcycled
    # model refused experts_implementation="grouped_mm" and ran the eager loop over experts.
    _can_set_experts_implementation_cached_value = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (ExpandedTopKRouter, RouterClassifier)):
            init.xavier_normal_(module.weight)  # the authors' router and classifier initialisation
        elif isinstance(module, UpcycledExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)


class ExpandedModelMixin(ExpandedInitMixin):
    """The base family's decoder stack, every layer's MLP replaced by ``block_class`` where the
    layer has more than one expert."""

    block_class: type

    def __init__(self, config):
        super().__init__(config)
        for index, count in enumerate(layer_counts(config)):
            if count > 1 or hasattr(self.layers[index].mlp, "experts"):  # an MoE base's layers all grow
                self.layers[index].mlp = self.block_class(config, index)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, **kwargs):
        # the classifiers pool over the real tokens of this forward and continue a cached prefix
        classifiers = [layer.mlp.classifier for layer in self.layers if getattr(layer.mlp, "classifier", None)]
        if classifiers:
            tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            valid = None
            if attention_mask is not None and attention_mask.dim() == 2:
                valid = attention_mask[:, attention_mask.shape[1] - tokens:]
            continues = past_key_values is not None and past_key_values.get_seq_length() > 0
            for classifier in classifiers:
                classifier.valid, classifier.continues = valid, continues
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)
        finally:
            for classifier in classifiers:
                classifier.valid = None


@dataclasses.dataclass
class ExpandedCausalLMOutput(MoeCausalLMOutputWithPast):
    """:class:`MoeCausalLMOutputWithPast` plus the router classifiers' logits (one ``[batch, groups]``
    tensor per classifier layer) when ``output_classifier_logits``."""

    classifier_logits: tuple[torch.Tensor, ...] | None = None


def load_balancing_loss(router_logits, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixtral's load-balancing loss per MoE layer with that layer's expert count, averaged over the
    layers (see the module docstring). ``router_logits``: one ``[tokens, experts]`` tensor per layer."""
    losses = []
    for logits in router_logits:
        experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, min(top_k, experts), dim=-1).indices
        assigned = F.one_hot(chosen, experts).float().sum(dim=1)  # [tokens, experts]
        if attention_mask is not None:
            weight = attention_mask.reshape(-1, 1).to(probs)
            fraction = (assigned * weight).sum(0) / weight.sum()
            mean_prob = (probs * weight).sum(0) / weight.sum()
        else:
            fraction, mean_prob = assigned.mean(0), probs.mean(0)
        losses.append(experts * (fraction * mean_prob).sum())
    return torch.stack(losses).mean()


def _mask_of_new_tokens(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The part of a ``[batch, length]`` attention mask that covers the tokens of this forward: with
    a KV cache the mask spans the cached tokens too, the router logits only the new ones (the last
    positions). A mask of another shape (a 4-D custom mask) is not a padding mask: no masking."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, attention_mask.shape[1] - tokens // attention_mask.shape[0]:]


class ExpandedCausalLMMixin(ExpandedInitMixin):
    """The base family's causal LM head on the expanded decoder stack (``model_class``), with the
    per-layer load-balancing loss and the classifier logits in its output."""

    model_class: type

    def __init__(self, config):
        # The family's causal-LM __init__ is skipped (its parent's runs): it would build the family's own
        # decoder first, only to replace it (the construction done twice), and that decoder refuses an
        # experts implementation (grouped_mm) that the expanded one takes, so an upcycled model could not
        # load with one. What it sets is set here: the five families' causal LMs set the same attributes.
        family_causal_lm = next(c for c in type(self).__mro__
                                if issubclass(c, PreTrainedModel) and not issubclass(c, ExpandedInitMixin))
        super(family_causal_lm, self).__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, output_classifier_logits=None,
                logits_to_keep=0, **kwargs):
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if output_classifier_logits is None:
            output_classifier_logits = self.config.output_classifier_logits
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_router_logits=output_router_logits,
                             output_classifier_logits=output_classifier_logits, **kwargs)
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs) if labels is not None else None
        router_logits = outputs.get("router_logits") if output_router_logits else None
        aux_loss = None
        if router_logits:
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok,
                                           _mask_of_new_tokens(attention_mask, router_logits[0].shape[0]))
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return ExpandedCausalLMOutput(loss=loss, aux_loss=aux_loss, logits=logits,
                                      past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.get("hidden_states"), attentions=outputs.get("attentions"),
                                      router_logits=router_logits,
                                      classifier_logits=outputs.get("classifier_logits") if output_classifier_logits
                                      else None)

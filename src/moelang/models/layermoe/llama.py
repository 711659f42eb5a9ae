"""LayerMoE expansion of the llama family (dense base, upcycled (the paper's setting): layers with more than one expert become MoE layers).

Configuration and modeling in transformers' per-family style: thin subclasses of the family's own
classes; what they share is :mod:`moelang.models.layermoe.common`.
"""

from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

from moelang.models.layermoe.common import (ExpandedCausalLMMixin, ExpandedModelMixin, UpcycledSparseMoeBlock,
                                            expanded_config_class, expanded_recorders)

MODEL_TYPE = "layermoe_llama"
BASE_MODEL_TYPE = "llama"

LayerMoELlamaConfig = expanded_config_class(LlamaConfig, MODEL_TYPE, "LayerMoELlamaConfig")


class LayerMoELlamaSparseMoeBlock(UpcycledSparseMoeBlock):
    """A llama FFN upcycled to experts: expert 0 is the FFN, frozen; the new experts start as its copies."""


class LayerMoELlamaModel(ExpandedModelMixin, LlamaModel):
    config_class = LayerMoELlamaConfig
    block_class = LayerMoELlamaSparseMoeBlock
    _can_record_outputs = expanded_recorders(LlamaModel)


class LayerMoELlamaForCausalLM(ExpandedCausalLMMixin, LlamaForCausalLM):
    config_class = LayerMoELlamaConfig
    model_class = LayerMoELlamaModel


CONFIG_CLASS = LayerMoELlamaConfig
CAUSAL_LM_CLASS = LayerMoELlamaForCausalLM

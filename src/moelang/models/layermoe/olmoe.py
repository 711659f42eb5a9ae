"""LayerMoE expansion of the olmoe family (MoE base, grown (beyond the paper): every MoE layer gets the plan's new experts).

Configuration and modeling in transformers' per-family style: thin subclasses of the family's own
classes; what they share is :mod:`moelang.models.layermoe.common`.
"""

from __future__ import annotations

from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM, OlmoeModel, OlmoeSparseMoeBlock

from moelang.models.layermoe.common import (ExpandedCausalLMMixin, ExpandedModelMixin, GrownBlockMixin,
                                            expanded_config_class, expanded_recorders)

MODEL_TYPE = "layermoe_olmoe"
BASE_MODEL_TYPE = "olmoe"

LayerMoEOlmoeConfig = expanded_config_class(OlmoeConfig, MODEL_TYPE, "LayerMoEOlmoeConfig")


class LayerMoEOlmoeSparseMoeBlock(GrownBlockMixin, OlmoeSparseMoeBlock):
    """An olmoe MoE layer grown by new experts; the family's forward."""


class LayerMoEOlmoeModel(ExpandedModelMixin, OlmoeModel):
    config_class = LayerMoEOlmoeConfig
    block_class = LayerMoEOlmoeSparseMoeBlock
    _can_record_outputs = expanded_recorders(OlmoeModel)


class LayerMoEOlmoeForCausalLM(ExpandedCausalLMMixin, OlmoeForCausalLM):
    config_class = LayerMoEOlmoeConfig
    model_class = LayerMoEOlmoeModel


CONFIG_CLASS = LayerMoEOlmoeConfig
CAUSAL_LM_CLASS = LayerMoEOlmoeForCausalLM

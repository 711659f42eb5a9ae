"""LayerMoE expansion of the qwen2_moe family (MoE base, grown (beyond the paper): every MoE layer gets the plan's new experts).

Configuration and modeling in transformers' per-family style: thin subclasses of the family's own
classes; what they share is :mod:`moelang.models.layermoe.common`.
"""

from __future__ import annotations

from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeModel, Qwen2MoeSparseMoeBlock

from moelang.models.layermoe.common import (ExpandedCausalLMMixin, ExpandedModelMixin, GrownBlockMixin,
                                            expanded_config_class, expanded_recorders)

MODEL_TYPE = "layermoe_qwen2_moe"
BASE_MODEL_TYPE = "qwen2_moe"

LayerMoEQwen2MoeConfig = expanded_config_class(Qwen2MoeConfig, MODEL_TYPE, "LayerMoEQwen2MoeConfig")


class LayerMoEQwen2MoeSparseMoeBlock(GrownBlockMixin, Qwen2MoeSparseMoeBlock):
    """A qwen2_moe MoE layer grown by new experts; the family's forward, shared expert included."""


class LayerMoEQwen2MoeModel(ExpandedModelMixin, Qwen2MoeModel):
    config_class = LayerMoEQwen2MoeConfig
    block_class = LayerMoEQwen2MoeSparseMoeBlock
    _can_record_outputs = expanded_recorders(Qwen2MoeModel)


class LayerMoEQwen2MoeForCausalLM(ExpandedCausalLMMixin, Qwen2MoeForCausalLM):
    config_class = LayerMoEQwen2MoeConfig
    model_class = LayerMoEQwen2MoeModel


CONFIG_CLASS = LayerMoEQwen2MoeConfig
CAUSAL_LM_CLASS = LayerMoEQwen2MoeForCausalLM

"""LayerMoE expansion of the mixtral family (MoE base, grown (beyond the paper): every MoE layer gets the plan's new experts).

Configuration and modeling in transformers' per-family style: thin subclasses of the family's own
classes; what they share is :mod:`moelang.models.layermoe.common`.
"""

from __future__ import annotations

from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel, MixtralSparseMoeBlock

from moelang.models.layermoe.common import (ExpandedCausalLMMixin, ExpandedModelMixin, GrownBlockMixin,
                                            expanded_config_class, expanded_recorders)

MODEL_TYPE = "layermoe_mixtral"
BASE_MODEL_TYPE = "mixtral"

LayerMoEMixtralConfig = expanded_config_class(MixtralConfig, MODEL_TYPE, "LayerMoEMixtralConfig")


class LayerMoEMixtralSparseMoeBlock(GrownBlockMixin, MixtralSparseMoeBlock):
    """A mixtral MoE layer grown by new experts; the family's forward."""


class LayerMoEMixtralModel(ExpandedModelMixin, MixtralModel):
    config_class = LayerMoEMixtralConfig
    block_class = LayerMoEMixtralSparseMoeBlock
    _can_record_outputs = expanded_recorders(MixtralModel)


class LayerMoEMixtralForCausalLM(ExpandedCausalLMMixin, MixtralForCausalLM):
    config_class = LayerMoEMixtralConfig
    model_class = LayerMoEMixtralModel


CONFIG_CLASS = LayerMoEMixtralConfig
CAUSAL_LM_CLASS = LayerMoEMixtralForCausalLM

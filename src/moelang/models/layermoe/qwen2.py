"""LayerMoE expansion of the qwen2 family (dense base, upcycled (the paper's setting): layers with more than one expert become MoE layers).

Configuration and modeling in transformers' per-family style: thin subclasses of the family's own
classes; what they share is :mod:`moelang.models.layermoe.common`.
"""

from __future__ import annotations

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, Qwen2Model

from moelang.models.layermoe.common import (ExpandedCausalLMMixin, ExpandedModelMixin, UpcycledSparseMoeBlock,
                                            expanded_config_class, expanded_recorders)

MODEL_TYPE = "layermoe_qwen2"
BASE_MODEL_TYPE = "qwen2"

LayerMoEQwen2Config = expanded_config_class(Qwen2Config, MODEL_TYPE, "LayerMoEQwen2Config")


class LayerMoEQwen2SparseMoeBlock(UpcycledSparseMoeBlock):
    """A qwen2 FFN upcycled to experts: expert 0 is the FFN, frozen; the new experts start as its copies."""


class LayerMoEQwen2Model(ExpandedModelMixin, Qwen2Model):
    config_class = LayerMoEQwen2Config
    block_class = LayerMoEQwen2SparseMoeBlock
    _can_record_outputs = expanded_recorders(Qwen2Model)


class LayerMoEQwen2ForCausalLM(ExpandedCausalLMMixin, Qwen2ForCausalLM):
    config_class = LayerMoEQwen2Config
    model_class = LayerMoEQwen2Model


CONFIG_CLASS = LayerMoEQwen2Config
CAUSAL_LM_CLASS = LayerMoEQwen2ForCausalLM

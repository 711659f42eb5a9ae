"""Expanded models (LayerMoE, MoE-LPR): one configuration and model class per base family,
registered with transformers' Auto classes on import (``import moelang.models`` does it), so that an
expanded model saved with ``save_pretrained`` loads with ``AutoModelForCausalLM.from_pretrained``
without ``trust_remote_code``.

A new base family is one file here (its config class from
:func:`~moelang.models.layermoe.common.expanded_config_class`, a block, a model and a causal-LM
class, as in ``olmoe.py``) plus its entry in :data:`FAMILY_MODULES`. What the models do is
described in :mod:`moelang.models.layermoe.common`; :mod:`moelang.models.layermoe.build` makes one
from a base model and a plan.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from transformers import AutoConfig, AutoModelForCausalLM

# base family (model_type) -> the module of its expanded classes
FAMILY_MODULES = {"llama": "llama", "qwen2": "qwen2", "olmoe": "olmoe", "qwen2_moe": "qwen2_moe", "mixtral": "mixtral"}
DENSE_BASES = ("llama", "qwen2")


@dataclass(frozen=True)
class ExpandedFamily:
    base: str  # the base family's model_type
    model_type: str  # the expanded model_type
    config_class: type
    model_class: type  # the causal LM
    dense: bool  # upcycled from a dense FFN (else grown from an MoE layer)


EXPANDED: dict[str, ExpandedFamily] = {}  # base model_type -> its expanded family


def _register() -> None:
    for base, name in FAMILY_MODULES.items():
        module = importlib.import_module(f"moelang.models.layermoe.{name}")
        config_class, model_class = module.CONFIG_CLASS, module.CAUSAL_LM_CLASS
        AutoConfig.register(module.MODEL_TYPE, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        EXPANDED[base] = ExpandedFamily(base, module.MODEL_TYPE, config_class, model_class, base in DENSE_BASES)


_register()

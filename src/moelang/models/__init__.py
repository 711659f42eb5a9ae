"""Models: loading, family adapters, trainable subsets, parameter counts; importing it registers the
expanded (LayerMoE) model classes with transformers' Auto classes (:mod:`moelang.models.layermoe`)."""

import moelang.models.layermoe  # noqa: F401 (registers the expanded families)

from moelang.models.adapters import FAMILIES, ModelAdapter, MoELayer, bake, train_only
from moelang.models.loading import (build_config, count_parameters, init_model, load_config, load_for_inference,
                                    load_model, resolve_device)

__all__ = ["FAMILIES", "ModelAdapter", "MoELayer", "bake", "train_only", "build_config", "count_parameters",
           "init_model", "load_config", "load_for_inference", "load_model", "resolve_device"]

"""Model families and their architecture fields, without torch.

:data:`FAMILIES` says what differs between the supported families (the model adapter,
:mod:`moelang.models.adapters`, reads the module layout from it). :func:`check_architecture` checks a
config's ``model.base.architecture`` field by field against its family's ``transformers`` config
class before anything is built; ``config.validate`` calls it at start-up. This module imports
neither torch nor a model class (only ``transformers`` config classes, lazily), so that the config
check also runs where torch is not installed (the data stages' image).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moelang.errors import ConfigError


def _every_layer(config) -> list[int]:
    return list(range(config.num_hidden_layers))


def _qwen_sparse_layers(config) -> list[int]:
    # as Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer decide it
    return [i for i in range(config.num_hidden_layers)
            if i not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (i + 1) % config.decoder_sparse_step == 0]


def _after_dense_layers(config) -> list[int]:
    # DeepSeek-V3: the first first_k_dense_replace layers have a dense MLP
    return list(range(config.first_k_dense_replace, config.num_hidden_layers))


def _no_layer(config) -> list[int]:
    return []


@dataclass(frozen=True)
class FamilySpec:
    """What differs between families, and nothing else."""

    router_attr: str | None = "gate"  # attribute of layer.mlp holding the router (None: dense)
    shared_attrs: tuple[str, ...] = ()  # always-on shared expert modules of layer.mlp
    transposed: bool = False  # fused tensors stored [E, in, out] instead of [E, out, in]
    expert_biases: tuple[str, ...] = ()  # per-expert bias tensors of the experts module
    grouped_routing: bool = False  # selection is not top-k of the router logits
    # Config fields, for checking an architecture before anything is built: the experts per MoE
    # layer, an expert's width (in the qwen and deepseek families intermediate_size sizes only the
    # dense MLPs), and which decoder layers are MoE layers.
    experts_field: str | None = "num_experts"
    width_field: str = "intermediate_size"
    moe_layers: Callable = _every_layer


FAMILIES: dict[str, FamilySpec] = {
    "olmoe": FamilySpec(),
    "qwen2_moe": FamilySpec(shared_attrs=("shared_expert", "shared_expert_gate"), width_field="moe_intermediate_size",
                            moe_layers=_qwen_sparse_layers),
    "qwen3_moe": FamilySpec(width_field="moe_intermediate_size", moe_layers=_qwen_sparse_layers),
    "mixtral": FamilySpec(experts_field="num_local_experts"),
    "deepseek_v3": FamilySpec(shared_attrs=("shared_experts",), grouped_routing=True, experts_field="n_routed_experts",
                              width_field="moe_intermediate_size", moe_layers=_after_dense_layers),
    "gpt_oss": FamilySpec(router_attr="router", transposed=True, expert_biases=("gate_up_proj_bias", "down_proj_bias"),
                          experts_field="num_local_experts"),
    # dense families, the starting point of upcycling (no MoE layer)
    "llama": FamilySpec(router_attr=None, experts_field=None, moe_layers=_no_layer),
    "qwen2": FamilySpec(router_attr=None, experts_field=None, moe_layers=_no_layer),
}
TOP_K_FIELD = "num_experts_per_tok"  # the same name in every MoE family


def _expanded_layers(config) -> list[int]:
    # an expanded model (moelang.models.layermoe): the layers with more than one expert, and every
    # layer grown from an MoE layer
    originals = config.num_original_experts or [1] * config.num_hidden_layers
    return [i for i, (n, o) in enumerate(zip(config.num_experts_per_layer, originals)) if n > 1 or o > 1]


# Expanded models (LayerMoE) of these base families: model_type "layermoe_<base>". Their layers keep
# the base family's layout, with the router at layer.mlp.gate (moelang.models.layermoe).
EXPANDABLE = ("llama", "qwen2", "olmoe", "qwen2_moe", "mixtral")
EXPANDED_PREFIX = "layermoe_"
EXPANDED_FAMILIES: dict[str, FamilySpec] = {
    EXPANDED_PREFIX + base: FamilySpec(router_attr="gate", shared_attrs=FAMILIES[base].shared_attrs,
                                       experts_field=None, moe_layers=_expanded_layers)
    for base in EXPANDABLE
}


def family_spec(model_type: str | None) -> FamilySpec | None:
    """The spec of a supported family or of an expanded model's type; None for anything else."""
    return FAMILIES.get(model_type) or EXPANDED_FAMILIES.get(model_type)


# Set from the tokenizer by build_config: a value in the config would be silently replaced.
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def architecture_fields(model_type: str) -> set[str]:
    """The fields a family's config takes: its config class's fields and their aliases
    (``attribute_map``), and the attributes its modeling code reads from the config (an optional
    ``head_dim`` is read that way by several families without being a declared field)."""
    import dataclasses
    import importlib.util
    import re

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    if dataclasses.is_dataclass(config_class):
        names = {f.name for f in dataclasses.fields(config_class)}
    else:  # older transformers: the __init__ keywords
        import inspect

        names = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    names |= set(getattr(config_class, "attribute_map", {}))
    spec = importlib.util.find_spec(f"transformers.models.{model_type}.modeling_{model_type}")
    if spec is not None and spec.origin:
        source = Path(spec.origin).read_text(encoding="utf-8")
        names |= set(re.findall(r"\bconfig\.([A-Za-z]\w*)", source))
        names |= set(re.findall(r"getattr\(\s*(?:self\.)?config,\s*[\"']([A-Za-z]\w*)", source))
    return names


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _nearest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'? " if match else ""


def check_architecture(architecture: dict, key: str = "model.base.architecture"):
    """Check ``architecture`` (``model_type`` plus fields of that family's transformers config class)
    without building a model; return the transformers config it gives. Every problem is a
    :class:`ConfigError` naming ``key.<field>`` and the fix: a field the family does not have (with
    the nearest one), top-k above the expert count, heads that do not divide the hidden size, an
    expert width left at the library default while a field that does not size experts was set."""
    from transformers import AutoConfig

    fields = dict(architecture)
    model_type = fields.pop("model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"config key '{key}.model_type': '{model_type}' is not a model family moelang supports; "
                          f"{_nearest(str(model_type), FAMILIES)}use one of {', '.join(sorted(FAMILIES))}")
    spec = FAMILIES[model_type]
    for name in fields:
        if name in TOKENIZER_FIELDS:
            raise ConfigError(f"config key '{key}.{name}': set from the tokenizer (vocabulary size and special "
                              f"tokens); remove it")
    known = architecture_fields(model_type)
    for name in fields:
        if name not in known:
            raise ConfigError(f"config key '{key}.{name}': {model_type} has no field '{name}'; "
                              f"{_nearest(name, known)}see the {model_type} config class in transformers")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"config key '{key}': {_first_line(exc)}; fix the architecture fields") from None

    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        hint = " (or set head_dim)" if "head_dim" in known else ""
        raise ConfigError(f"config key '{key}.num_attention_heads': {heads} heads do not divide hidden_size "
                          f"{config.hidden_size}; choose a number of heads that does{hint}")
    if kv_heads and heads % kv_heads:
        raise ConfigError(f"config key '{key}.num_key_value_heads': {kv_heads} key/value heads do not divide the "
                          f"{heads} attention heads; choose a divisor of num_attention_heads")
    if spec.experts_field is None:  # a dense family: nothing else to check
        return config

    experts, top_k = getattr(config, spec.experts_field), getattr(config, TOP_K_FIELD)
    if not 1 <= top_k <= experts:
        raise ConfigError(f"config key '{key}.{TOP_K_FIELD}': each token would use {top_k} of {experts} experts "
                          f"({spec.experts_field}); set it between 1 and {experts}")
    width = spec.width_field
    if width != "intermediate_size" and "intermediate_size" in fields and width not in fields:
        raise ConfigError(f"config key '{key}.{width}': {model_type}'s expert width is {width} (left at the "
                          f"library default {getattr(config, width)}); intermediate_size sizes only its dense "
                          f"MLP layers; set {width}")
    if spec.grouped_routing:
        groups, top_groups = config.n_group, config.topk_group
        if experts % groups or experts // groups < 2:
            raise ConfigError(f"config key '{key}.n_group': {groups} expert groups must split the {experts} experts "
                              f"({spec.experts_field}) into equal groups of at least 2")
        if not 1 <= top_groups <= groups:
            raise ConfigError(f"config key '{key}.topk_group': choose between 1 and n_group ({groups}) groups")
        if top_k > top_groups * (experts // groups):
            raise ConfigError(f"config key '{key}.{TOP_K_FIELD}': the top {top_groups} groups hold only "
                              f"{top_groups * (experts // groups)} experts; lower it or raise topk_group")
    if not spec.moe_layers(config):
        raise ConfigError(f"config key '{key}': none of the {config.num_hidden_layers} layers of this {model_type} "
                          f"architecture is an MoE layer; check num_hidden_layers and the fields that make "
                          f"layers dense (first_k_dense_replace, mlp_only_layers, decoder_sparse_step)")
    return config

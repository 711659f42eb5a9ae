"""Making an expanded model from a base model and the new experts of each layer.

* :func:`expand_model`: a dense base (Llama, Qwen2) is upcycled: in every layer that gets new
  experts the FFN stays as expert 0 and the new experts are exact copies of it (``noise`` > 0 adds
  Gaussian noise of that relative size to the copies, in either case); the router is new, bias-free,
  xavier-normal. Before any training the upcycled model computes what the dense model computes
  (every chosen expert is the FFN and the top-k weights sum to 1). An MoE base (OLMoE, Qwen-MoE,
  Mixtral) grows: each new expert starts as a copy of an existing expert of its layer (``sources``:
  the caller's choice, for example the parent languages' most-used experts, :func:`most_used_experts`;
  default: random existing experts, seeded), and its router row as a copy of that expert's row. So a
  grown model does not start equal to its base: a new expert ties with its source in the router, and
  tokens that chose the source now often take both (what the base computes is kept for sequences a
  classifier calls old: the original experts alone).
  ``sources`` are keyed by layer (``"3"`` as in a JSON record also works); sources for a layer that
  grows nothing from existing experts (out of range, no new experts, a dense layer) are an error. An
  already expanded model expands the same way (the paper's lifelong setting): its experts are the
  original ones of the new model, which keeps no router classifier of the earlier expansion.
* :func:`add_classifiers`: put router classifiers on layers (LayerMoE's stage 2), or take them off;
  also on a model that has already run (``output_classifier_logits`` sees the new classifiers).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moelang.errors import MoelangError
from moelang.models.layermoe import EXPANDED, ExpandedFamily
from moelang.models.layermoe.common import RouterClassifier

# config entries that describe a saved model rather than its architecture
_NOT_ARCHITECTURE = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


def expansion_family(model) -> tuple[ExpandedFamily, list[int]]:
    """The expanded family ``model`` expands into and the experts each of its layers has now (1: a
    dense FFN), or one line naming the families that expand."""
    from moelang.architecture import EXPANDED_PREFIX
    from moelang.models.adapters import ModelAdapter

    config = model.config
    model_type = config.model_type
    if model_type.startswith(EXPANDED_PREFIX):
        base = model_type[len(EXPANDED_PREFIX):]
        return EXPANDED[base], list(config.num_experts_per_layer)
    if model_type not in EXPANDED:
        raise MoelangError(f"expansion: model family '{model_type}' has no expanded model class; families that expand: "
                           f"{', '.join(sorted(EXPANDED))} (a new one is a file in src/moelang/models/layermoe/)")
    family = EXPANDED[model_type]
    layers = ModelAdapter(model)
    if family.dense:
        return family, [1] * layers.num_layers
    counts = layers.experts_per_layer
    dense = [i for i in range(layers.num_layers) if i not in counts]
    if dense:
        raise MoelangError(f"expansion: layers {dense} of this {model_type} model are dense; growing an MoE model "
                           f"whose layers are not all MoE layers is not supported (set mlp_only_layers: [] and "
                           f"decoder_sparse_step: 1, or expand a dense model)")
    return family, [counts[i] for i in range(layers.num_layers)]


def most_used_experts(counts: np.ndarray | list[float], n: int) -> list[int]:
    """``n`` sources for new experts from one layer's usage counts: the most-used experts first
    (ties to the lower id), cycling when ``n`` exceeds the number of experts."""
    order = sorted(range(len(counts)), key=lambda e: (-float(counts[e]), e))
    return [order[j % len(order)] for j in range(n)]


def random_sources(old: int, n: int, rng: np.random.Generator) -> list[int]:
    return [int(e) for e in rng.integers(0, old, size=n)]


def expand_model(model, new_experts: list[int], *, top_k: int = 2, classifier_layers: list[int] | tuple = (),
                 sources: dict[int, list[int]] | None = None, noise: float = 0.0, seed: int = 0):
    """``model`` with ``new_experts[i]`` new experts in decoder layer ``i`` (see the module
    docstring). ``top_k``: the router's top-k of an upcycled dense base (an MoE base keeps its own).
    Returns ``(expanded model, record)``; ``record`` says what was done (JSON-able)."""
    family, old = expansion_family(model)
    if len(new_experts) != len(old):
        raise MoelangError(f"expansion: the plan has {len(new_experts)} layers and the model {len(old)}; make the plan "
                           f"from this model's similarity table")
    bad = [i for i, n in enumerate(new_experts) if not isinstance(n, (int, np.integer)) or n < 0]
    if bad:
        raise MoelangError(f"expansion: layers {bad} have a negative or non-integer number of new experts; give each "
                           f"layer an integer 0 or more (the plan's new experts, not its total N_i)")
    counts = [o + int(n) for o, n in zip(old, new_experts)]
    wrong = [i for i in classifier_layers if not 0 <= i < len(old) or counts[i] < 2]
    if wrong:
        raise MoelangError(f"expansion: classifier layers {wrong} are out of range or have a single expert; choose "
                           f"among the layers with new experts")
    given = _source_lists(sources, old, new_experts)
    rng = np.random.default_rng(seed)
    sources = {i: list(given.get(i) or random_sources(old[i], new_experts[i], rng))
               for i in range(len(old)) if new_experts[i] and old[i] > 1}
    for i, chosen in sources.items():
        if len(chosen) != new_experts[i] or any(not 0 <= e < old[i] for e in chosen):
            raise MoelangError(f"expansion: layer {i} needs {new_experts[i]} source experts among 0..{old[i] - 1}, "
                               f"got {chosen}; give that many ids of the layer's existing experts")

    fields = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    fields.update(num_experts_per_layer=counts, num_original_experts=old, classifier_layers=sorted(classifier_layers),
                  expanded_from=getattr(model.config, "expanded_from", None) or model.config.model_type)
    if family.dense and not model.config.model_type.startswith("layermoe_"):
        fields.update(num_experts_per_tok=top_k, norm_topk_prob=True)
    config = family.config_class.from_dict(fields)
    weight = next(model.parameters())
    previous = torch.get_default_dtype()
    # built in the base's dtype on its device (not in fp32 on the CPU, then converted: at 7B scale
    # that doubles the peak memory); rotary frequencies are computed in fp32 whatever the default
    with torch.random.fork_rng(devices=[]), torch.device(weight.device):
        torch.manual_seed(seed)
        torch.set_default_dtype(weight.dtype if weight.dtype.is_floating_point else previous)
        try:
            expanded = family.model_class(config)
        finally:
            torch.set_default_dtype(previous)
    _copy_weights(model, expanded, old, new_experts, sources, noise, seed)
    expanded.eval()
    record = {"base_model_type": model.config.model_type, "expanded_model_type": family.model_type,
              "experts_per_layer": counts, "original_experts_per_layer": old,
              "new_experts_per_layer": [int(n) for n in new_experts], "new_experts": int(sum(new_experts)),
              "classifier_layers": sorted(classifier_layers), "sources": {str(i): s for i, s in sources.items()},
              "top_k": int(config.num_experts_per_tok), "noise": noise, "seed": seed}
    return expanded, record


def _source_lists(sources: dict | None, old: list[int], new: list[int]) -> dict[int, list[int]]:
    """``sources`` keyed by layer index (keys as written in a JSON record, ``"3"``, accepted). A
    non-empty list for a layer that grows no expert from existing ones (out of range, no new experts, or
    a dense layer, whose new experts are copies of its FFN) is a mistake, not something to ignore."""
    lists: dict[int, list[int]] = {}
    for key, chosen in (sources or {}).items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            layer = None
        chosen = [int(e) for e in chosen or []]
        if chosen and (layer is None or not 0 <= layer < len(old) or not new[layer] or old[layer] < 2):
            takes = [i for i in range(len(old)) if new[i] and old[i] > 1]
            raise MoelangError(f"expansion: sources given for layer {key!r}, which grows no expert from existing "
                               f"experts; give sources only for the MoE layers with new experts ({takes})")
        if layer is not None:
            lists[layer] = chosen
    return lists


@torch.no_grad()
def _copy_weights(base, expanded, old: list[int], new: list[int], sources: dict[int, list[int]], noise: float,
                  seed: int) -> None:
    target = expanded.state_dict()
    for name, tensor in base.state_dict().items():
        if name in target and target[name].shape == tensor.shape and ".mlp." not in name:
            target[name].copy_(tensor)
    generator = torch.Generator().manual_seed(seed + 1)
    base_layers, new_layers = base.model.layers, expanded.model.layers
    for i, (base_layer, new_layer) in enumerate(zip(base_layers, new_layers)):
        src, dst = base_layer.mlp, new_layer.mlp
        if old[i] == 1 and not hasattr(src, "experts"):
            if new[i] == 0:
                dst.load_state_dict(src.state_dict())
                continue
            gate_up = torch.cat([src.gate_proj.weight, src.up_proj.weight], dim=0)
            dst.experts.gate_up_proj.copy_(gate_up.expand_as(dst.experts.gate_up_proj))
            dst.experts.down_proj.copy_(src.down_proj.weight.expand_as(dst.experts.down_proj))
            _add_noise(dst.experts, 1, noise, generator)
            continue
        # an MoE layer (or an expanded one): existing experts and router rows, then the copies
        src_state = src.state_dict()
        for name, tensor in dst.state_dict().items():  # shared experts and their gates
            if not name.startswith(("experts.", "gate.", "classifier.")):
                tensor.copy_(src_state[name])
        ids = list(range(old[i])) + sources.get(i, [])
        index = torch.tensor(ids, dtype=torch.long, device=dst.gate.weight.device)
        for name, param in dst.experts.named_parameters(recurse=False):
            param.copy_(getattr(src.experts, name)[index])
        dst.gate.weight.copy_(src.gate.weight[index])
        _add_noise(dst.experts, old[i], noise, generator)


def _add_noise(experts, first_new: int, noise: float, generator: torch.Generator) -> None:
    """Gaussian noise of relative size ``noise`` (times each tensor's std over the original experts) on
    the new experts, ``first_new`` onwards (nothing when ``noise`` is 0)."""
    if noise <= 0 or first_new >= experts.num_experts:
        return
    for param in experts.parameters(recurse=False):
        new = param[first_new:]
        # drawn on the CPU (the same numbers on any device), added where the model is
        jitter = torch.randn(new.shape, generator=generator, dtype=torch.float32) * noise
        new += (jitter.to(param.device) * param[:first_new].float().std()).to(param.dtype)


def add_classifiers(model, layers: list[int], seed: int = 0, pooling: str | None = None,
                    decision: str | None = None) -> None:
    """Give ``model`` (an expanded model) router classifiers on ``layers`` (xavier-normal, seeded),
    and none elsewhere; its config says so (``classifier_layers``, and ``classifier_pooling`` /
    ``classifier_decision`` when given: see :class:`RouterClassifier`)."""
    config = model.config
    if pooling is not None:
        config.classifier_pooling = pooling
    if decision is not None:
        config.classifier_decision = decision
    counts = list(getattr(config, "num_experts_per_layer", None) or [])
    if not counts:
        raise MoelangError(f"router classifiers go on expanded models; {config.model_type} is not one")
    wrong = [i for i in layers if not 0 <= i < len(counts) or counts[i] < 2]
    if wrong:
        raise MoelangError(f"classifier layers {wrong} are out of range (0..{len(counts) - 1}) or have a single expert; "
                           f"choose among the layers with new experts")
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(model.model.layers):
        block = layer.mlp
        if index in layers:
            weight = next(block.parameters())
            classifier = RouterClassifier(config.hidden_size, config.classifier_groups, config.classifier_pooling,
                                          config.classifier_decision)
            nn.init.xavier_normal_(classifier.weight, generator=generator)
            block.classifier = classifier.to(dtype=weight.dtype, device=weight.device)
            _record_outputs_of(model, block.classifier)
        elif getattr(block, "classifier", None) is not None:
            block.classifier = None
    config.classifier_layers = sorted(layers)


def _record_outputs_of(model, classifier: RouterClassifier) -> None:
    """Make ``output_classifier_logits`` see a classifier added after the model's first forward:
    transformers installs its output-recording hooks once, on the modules the decoder has at that
    forward, so a module added later needs its hook installed here (without it the logits were
    silently missing)."""
    from transformers.utils.output_capturing import install_output_capuring_hook  # sic, transformers' spelling

    decoder = model.model
    if getattr(decoder, "_output_capturing_hooks_installed", False):
        recorder = decoder._can_record_outputs["classifier_logits"]
        install_output_capuring_hook(classifier, "classifier_logits", recorder.index)

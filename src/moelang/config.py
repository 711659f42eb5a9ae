"""Load and check the pipeline config; hand each stage its own options.

The schema (``config.schema.yaml`` in this package; ``workflow/schemas/config.schema.yaml`` links to
it) is the single definition of every key and its default. :func:`validate` fills the defaults and
turns the first schema violation into one line that names the key, what is wrong and how to fix it,
so a wrong config fails in the first second, before any stage starts.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from moelang import options as opts
from moelang import registry
from moelang.errors import ConfigError, MoelangError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
LANG_PATTERN = re.compile(r"^[a-z]{2,3}$")


def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _validator_with_defaults():
    # The jsonschema FAQ recipe, the same one snakemake.utils.validate uses: defaults are filled in
    # while validating, so nested sections that are absent get all their defaults.
    base = Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema:
                    instance.setdefault(prop, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _describe(error) -> str:
    # For anyOf/oneOf/allOf-with-if the innermost error says what is actually wrong.
    while error.context:
        error = best_match(error.context)
    key = _key_path(error)
    if error.validator == "additionalProperties":
        return f"config key '{key}': {error.message}; remove it or fix its spelling (see config/README.md)"
    if error.validator == "required":
        return f"config key '{key}': {error.message}; add it (see config/README.md)"
    if error.validator in ("pattern", "propertyNames") and error.schema.get("pattern") == LANG_PATTERN.pattern:
        return (f"config key '{key}': {error.instance!r} is not a language code; use an ISO 639-1/639-3 "
                f"code of 2-3 lower-case letters such as 'en' or 'yue'")
    return f"config key '{key}': {error.message}; fix the value (see config/README.md)"


def validate(config: dict) -> dict:
    """Fill defaults into ``config`` (in place), check it and return it.

    Raises :class:`ConfigError` with one line naming the offending key.
    """
    if not isinstance(config, dict):
        raise ConfigError("the config must be a YAML mapping (key: value); see config/config.yaml")
    _check_old_split(config)
    adapt_train = (config.get("adapt") or {}).get("train") if isinstance(config.get("adapt"), dict) else None
    if isinstance(adapt_train, dict):
        # adaptation trains without a load-balancing loss unless asked (the authors use none); the
        # shared training definition's default (0.01, for pre-training) must not fill it in
        adapt_train.setdefault("aux_loss_coef", 0.0)
    expand = config.get("expand")
    for stage in ("stage1", "stage2"):
        settings = expand.get(stage) if isinstance(expand, dict) else None
        if isinstance(settings, dict):
            # the keys a user leaves out of a stage take the authors' recipe, not the shared training
            # definition's defaults (made for pre-training: lr 1e-3, weight decay 0.1, betas 0.9/0.95)
            for key, value in expand_train_defaults(stage).items():
                settings.setdefault(key, value)
    validator = _validator_with_defaults()(load_schema())
    error = best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(_describe(error))
    _check_semantics(config)
    return config


def _check_old_split(config: dict) -> None:
    """The single held-out split (``corpus.heldout_fraction``) became two: dev selects, test reports."""
    corpus = config.get("corpus")
    if isinstance(corpus, dict) and "heldout_fraction" in corpus:
        f = corpus["heldout_fraction"]
        half = f / 2 if isinstance(f, (int, float)) and not isinstance(f, bool) else "f/2"
        raise ConfigError(f"config key 'corpus.heldout_fraction': replaced by corpus.dev_fraction (model selection) "
                          f"and corpus.test_fraction (reported results); for the same train split set both so that "
                          f"they add up to it (e.g. {half} each), and remove heldout_fraction (see config/README.md)")


def _check_semantics(config: dict) -> None:
    """Rules that a JSON schema cannot express."""
    corpus = config["corpus"]
    if corpus["dev_fraction"] + corpus["test_fraction"] > 0.5:
        raise ConfigError(f"config key 'corpus.test_fraction': dev_fraction {corpus['dev_fraction']} + test_fraction "
                          f"{corpus['test_fraction']} exceed 0.5; keep at least half of the documents for training "
                          f"(lower one of them)")
    langs = config["languages"]
    hr = langs["high_resource"]
    for target, parent in langs["targets"].items():
        if target in hr:
            raise ConfigError(f"config key 'languages.targets.{target}': '{target}' is also a high-resource "
                              f"language; a language is either high-resource or a target, not both")
        if parent not in hr:
            raise ConfigError(f"config key 'languages.targets.{target}': parent '{parent}' is not in "
                              f"languages.high_resource {hr}; add it there or choose another parent")
    if langs["base"] not in hr:
        raise ConfigError(f"config key 'languages.base': '{langs['base']}' is not in languages.high_resource {hr}; "
                          f"the base model's main language must be one of them")
    all_langs = set(all_languages(config))
    for lang in config["corpus"]["sources"]:
        if lang not in all_langs:
            raise ConfigError(f"config key 'corpus.sources.{lang}': '{lang}' is not a configured language; "
                              f"add it to languages.high_resource or languages.targets, or remove the source")
    par = config["corpus"]["parallel"]
    if par["source"] == "aligned" and len(par["files"]) < 2:
        raise ConfigError("config key 'corpus.parallel.files': the 'aligned' parallel source needs a file for at "
                          "least two languages (language: path)")
    if config["similarity"]["method"] == "parallel" and par["source"] == "none":
        raise ConfigError("config key 'similarity.method': the parallel method needs a parallel table; set "
                          "corpus.parallel.source (builtin, or aligned with files for two languages or more), or "
                          "use similarity.method: tokens")
    tok = config["tokenizer"]
    base = config["model"]["base"]
    if base["type"] == "pretrained":
        if tok["type"] != "pretrained":
            raise ConfigError("config key 'tokenizer.type': a pretrained base model (model.base.type: pretrained) needs "
                              "its own tokenizer; set tokenizer.type: pretrained")
        if not tok["name_or_path"]:
            tok["name_or_path"] = base["name_or_path"]
            tok["revision"] = tok["revision"] or base.get("revision")
    alloc = config["allocation"]
    if (alloc["delta"] is None) == (alloc["new_experts"] is None):
        raise ConfigError("config key 'allocation': give exactly one budget, allocation.delta or allocation.new_experts")
    sim_model = config["similarity"]["model"]
    if sim_model is not None and sim_model not in registry.profiled(config):
        raise ConfigError(f"config key 'similarity.model': '{sim_model}' is not a profiled model; use one of "
                          f"{', '.join(registry.profiled(config))}")
    selection_model(config)
    _check_adapt(config)
    unknown = sorted(set(config["resources"]) - set(STAGE_RESOURCES) - {"default", "gpus", "gpu_memory_gb"})
    if unknown:
        raise ConfigError(f"config key 'resources.{unknown[0]}': not a rule of the workflow; use one of "
                          f"{', '.join(sorted(STAGE_RESOURCES))}, or 'default'")
    if tok["type"] == "pretrained" and not tok["name_or_path"]:
        raise ConfigError("config key 'tokenizer.name_or_path': a pretrained tokenizer needs a hub id or a local "
                          "directory; set it, or use tokenizer.type: train")
    _check_allocation_languages(config)
    _check_local_sources(config)
    built = _check_model(config)
    _check_evaluation(config)
    _check_expand(config, built)


# The names of moelang.adapt's method registry, spelled here because config runs in the data image,
# which has no torch (the builders import it); tests/test_adapt.py ties the two lists.
ADAPT_METHOD_NAMES = ("ssft", "seft", "seft_top{N}", "random", "random_hr", "aeft", "full-ft", "lora")


def adapt_method_names(top_n: int) -> list[str]:
    """The adaptation methods a config may list, with seft_top{N} spelled for routing.top_n."""
    return [name.replace("{N}", str(top_n)) for name in ADAPT_METHOD_NAMES]


def _check_adapt(config: dict) -> None:
    """Adaptation keys that a schema cannot check: targets, methods, the start model."""
    section = config["adapt"]
    if not section["enabled"]:
        return
    if not config["routing"]["enabled"]:
        raise ConfigError("config key 'adapt.enabled': expert fine-tuning trains the experts the routing stage "
                          "selects, and routing.enabled is false; set adapt.enabled: false (or enable routing on "
                          "an MoE base)")
    targets = config["languages"]["targets"]
    for lang in section["targets"] or []:
        if lang not in targets:
            raise ConfigError(f"config key 'adapt.targets': '{lang}' is not in languages.targets "
                              f"({', '.join(targets)}); adapt configured targets only")
    known = adapt_method_names(config["routing"]["top_n"])
    for name in section["methods"]:
        if name not in known:
            hint = (f"the routing metrics choose seft_top{{N}} with N = routing.top_n ({config['routing']['top_n']})"
                    if name.startswith("seft_top") else f"use one of {', '.join(known)}")
            raise ConfigError(f"config key 'adapt.methods': '{name}' is not a method; {hint}")
    if "random_hr" in section["methods"] and len(set(targets.values())) < 2:
        raise ConfigError("config key 'adapt.methods': random_hr trains another parent's experts, and every target has "
                          "the same parent; remove random_hr or add a target with another parent")
    start = adapt_start(config)
    if start.name != selection_model(config).name:
        raise ConfigError(f"config key 'adapt.start_model': '{start.name}' differs from the model whose routing chose the "
                          f"expert sets ('{selection_model(config).name}'); set routing.selection_model to "
                          f"'{start.name}' too, so that the experts are chosen on the model being adapted")


# --------------------------------------------------------------------------------------------------
# Start-up checks of what later stages would otherwise find out after hours: each reads at most a
# directory listing or a config.json, never a model's weights.
# --------------------------------------------------------------------------------------------------

def _check_allocation_languages(config: dict) -> None:
    langs = config["languages"]
    alloc = config["allocation"]
    configured = all_languages(config)
    for side in ("old", "new"):
        for lang in alloc[side] or []:
            if lang not in configured:
                raise ConfigError(f"config key 'allocation.{side}': '{lang}' is not a configured language; use "
                                  f"languages from languages.high_resource or languages.targets")
    if not langs["targets"] and alloc["new"] is None:
        raise ConfigError("config key 'languages.targets': no target language, and the expert allocation needs new "
                          "languages; add target: parent pairs (e.g. {ca: es}) or set allocation.new")
    old = alloc["old"] or list(langs["high_resource"])
    new = alloc["new"] or list(langs["targets"])
    both = [lang for lang in new if lang in old]
    if both:
        raise ConfigError(f"config key 'allocation': {both} would be both old and new languages; a language is one "
                          f"or the other (set allocation.old and allocation.new)")


# The formats `format: auto` infers from a local file's extension (the corpus stage and the start-up
# check both use this); any other extension needs an explicit format.
LOCAL_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def local_format(path: Path) -> str | None:
    return LOCAL_FORMATS.get(path.suffix.lower())


def local_source_files(pattern: str) -> list[Path] | None:
    """The files a local source's ``path`` names, sorted: a directory's files (recursively, hidden
    ones left out), a glob's matches, or the file itself; None when the path does not exist."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if any(ch in pattern for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    return [path] if path.is_file() else None


def _who(langs: list[str]) -> str:
    return ", ".join(f"'{lang}'" for lang in langs)


def _check_local_sources(config: dict) -> None:
    """Local corpus files exist and their format is known (as the corpus stage infers it)."""
    corpus = config["corpus"]
    users: dict[str, list[str]] = {}  # config key of a source -> the languages that read it
    for lang in all_languages(config):
        key = f"corpus.sources.{lang}" if lang in corpus["sources"] else "corpus.default_source"
        users.setdefault(key, []).append(lang)
    for key, langs in users.items():
        source = corpus["sources"][langs[0]] if key.startswith("corpus.sources.") else corpus["default_source"]
        if source["type"] != "local":
            continue
        pattern = source["path"]
        files = local_source_files(pattern)
        if files is None:
            raise ConfigError(f"config key '{key}.path': '{pattern}' does not exist (the local source of "
                              f"{_who(langs)}); fix the path (a relative one starts from the working directory)")
        if not files:
            raise ConfigError(f"config key '{key}.path': '{pattern}' matches no file (the local source of "
                              f"{_who(langs)}); fix the path or the glob")
        if source["format"] == "auto":
            for file in files:
                if local_format(file) is None:
                    raise ConfigError(f"config key '{key}.format': cannot tell the format of '{file}' from its "
                                      f"extension (the local source of {_who(langs)}); set {key}.format to txt, "
                                      f"jsonl or parquet")
    par = corpus["parallel"]
    if par["source"] == "aligned":
        for lang, files in par["files"].items():
            if lang not in all_languages(config):
                raise ConfigError(f"config key 'corpus.parallel.files.{lang}': '{lang}' is not a configured language; "
                                  f"add it to languages or remove the file")
            for file in [files] if isinstance(files, str) else files:  # one file or a list, read in order
                if not Path(file).is_file():
                    raise ConfigError(f"config key 'corpus.parallel.files.{lang}': '{file}' does not exist; "
                                      f"fix the path")


def _hub_offline() -> bool:
    # read now, not at import (huggingface_hub reads it once): the Snakefile and the CLI see the caller's setting
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def _reference_file(ref: str, key: str, files: tuple[str, ...], revision: str | None = None,
                    outputs: tuple[str, ...] = ()) -> Path | None:
    """The first of ``files`` that model or tokenizer reference ``ref`` has, found without the network:
    in a local directory (which must exist and have one), or for a hub id in the local Hugging Face
    cache. None when it cannot be known yet: a workflow output (``outputs``), or a hub id not in the
    cache while the hub can be reached. Offline, a hub id not in the cache is an error now rather
    than after the stages before it."""
    if ref in outputs:
        return None
    path = Path(ref)
    if path.is_dir():
        found = [path / name for name in files if (path / name).is_file()]
        if not found:
            raise ConfigError(f"config key '{key}': directory '{ref}' has no {' or '.join(files)}; point it at a "
                              f"save_pretrained directory")
        return found[0]
    if ref.startswith("results/"):
        made = f"; this workflow makes {', '.join(outputs)}" if outputs else ""
        raise ConfigError(f"config key '{key}': '{ref}' does not exist and no stage of this workflow makes it{made}")
    if not HUB_ID.match(ref):
        raise ConfigError(f"config key '{key}': directory '{ref}' does not exist; fix the path (a relative one starts "
                          f"from the working directory)")
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        cached = try_to_load_from_cache(ref, name, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    if _hub_offline():
        raise ConfigError(f"config key '{key}': '{ref}' is not a local directory and not in the local Hugging Face "
                          f"cache, and HF_HUB_OFFLINE is set; download it first (huggingface-cli download {ref}) "
                          f"or point {key} at a local directory")
    return None


def _check_model(config: dict):
    """Check the base model's references and layers; return its transformers config when it can be
    read without the network (None otherwise)."""
    from moelang.architecture import FAMILIES, check_architecture

    model = config["model"]
    cpt = model["cpt"]
    steps = cpt["train"]["steps"]
    if cpt["enabled"] and cpt["n_checkpoints"] > steps + 1:
        raise ConfigError(f"config key 'model.cpt.n_checkpoints': {cpt['n_checkpoints']} checkpoints do not fit "
                          f"{steps} CPT steps (at most steps + 1, step 0 included); lower it or raise "
                          f"model.cpt.train.steps")
    moe_families = ", ".join(sorted(f for f, spec in FAMILIES.items() if spec.router_attr))
    base = model["base"]
    if base["type"] == "train":
        key = "model.base.architecture"
        built = check_architecture(base["architecture"], key)
        _check_dense_base(config, built.model_type, f"{key}.model_type", moe_families)
    else:
        key = "model.base.name_or_path"
        found = _reference_file(base["name_or_path"], key, ("config.json",), base["revision"])
        built = _pretrained_config(found, base["name_or_path"], key, moe_families, config) if found else None
    tok = config["tokenizer"]
    if tok["type"] == "pretrained":
        _reference_file(tok["name_or_path"], "tokenizer.name_or_path", ("tokenizer.json", "tokenizer_config.json"),
                        tok["revision"])
    if built is not None and config["routing"]["enabled"]:
        _check_routing_layers(config, built)
    return built


def _check_dense_base(config: dict, model_type: str, key: str, moe_families: str) -> None:
    """A dense base (no MoE layer) has no routing to profile: only with routing.enabled false, the
    setting of LayerMoE's upcycling."""
    from moelang.architecture import FAMILIES

    if FAMILIES[model_type].router_attr is None and config["routing"]["enabled"]:
        raise ConfigError(f"config key '{key}': '{model_type}' is a dense family (no MoE layer to profile); set "
                          f"routing.enabled: false (LayerMoE upcycles dense models; routing analysis and expert "
                          f"fine-tuning need one of {moe_families})")


def _pretrained_config(config_json: Path, ref: str, key: str, moe_families: str, config: dict):
    """The transformers config of a pretrained base from its config.json (a dense family only with
    routing.enabled false)."""
    from moelang.architecture import FAMILIES

    fields = json.loads(config_json.read_text(encoding="utf-8"))
    model_type = fields.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"config key '{key}': '{ref}' is a {model_type} model, a family moelang does not "
                          f"support; use one of {', '.join(sorted(FAMILIES))}")
    _check_dense_base(config, model_type, key, moe_families)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception:  # an unusual config.json: the stages that load the model report it
        return None


def _check_routing_layers(config: dict, model_config) -> None:
    """The routing options that name layers name MoE layers of the base model."""
    from moelang.architecture import FAMILIES

    moe_layers = FAMILIES[model_config.model_type].moe_layers(model_config)
    routing = config["routing"]
    for layer in routing["token_layers"]:
        if layer not in moe_layers:
            raise ConfigError(f"config key 'routing.token_layers': layer {layer} is not an MoE layer of the base "
                              f"model; its MoE layers are {_layer_range(moe_layers)}")
    if routing["jsd_overlap_layer"] is not None and routing["jsd_overlap_layer"] not in moe_layers:
        raise ConfigError(f"config key 'routing.jsd_overlap_layer': layer {routing['jsd_overlap_layer']} is not an MoE "
                          f"layer of the base model; its MoE layers are {_layer_range(moe_layers)}")
    context = getattr(model_config, "max_position_embeddings", None)
    if routing["windowing"] == "stream" and context is not None and routing["seq_len"] > context:
        raise ConfigError(f"config key 'routing.seq_len': stream windows of {routing['seq_len']} tokens exceed the "
                          f"base model's context of {context} positions; set it to at most {context}")
    if routing["final_layers"] > len(moe_layers):
        raise ConfigError(f"config key 'routing.final_layers': the base model has {len(moe_layers)} MoE layers; set "
                          f"it to at most {len(moe_layers)}")


def _layer_range(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def _check_evaluation(config: dict) -> None:
    configured = all_languages(config)
    for family, codes in config["evaluation"]["codes"].items():
        for lang in codes:
            if lang not in configured:
                raise ConfigError(f"config key 'evaluation.codes.{family}.{lang}': '{lang}' is not a configured "
                                  f"language; add it to languages or remove the code")
    # the model directories this workflow makes, which need not exist yet
    outputs = registry.workflow_outputs(config)
    for name, entry in config["evaluation"]["models"].items():
        _reference_file(entry["ref"], f"evaluation.models.{name}.ref", ("config.json",),
                        outputs=tuple(sorted(outputs)))


# The allocation stage's methods (moelang.allocation.METHODS), spelled here because config runs in the
# data image (tests/test_config.py ties the two lists).
ALLOCATION_METHODS = ("layermoe", "uniform", "mola", "increasing", "routing")


def _check_expand(config: dict, base_config) -> None:
    """Expansion keys a schema cannot check: plans, the model to expand, its family, the routing plan's
    scores. ``base_config`` is the base model's transformers config (None when it cannot be read now)."""
    from moelang.architecture import EXPANDABLE, EXPANDED_PREFIX, FAMILIES

    section = config["expand"]
    if not section["enabled"]:
        return
    for name, variant in section["variants"].items():
        if variant["plan"] not in ALLOCATION_METHODS:
            raise ConfigError(f"config key 'expand.variants.{name}.plan': '{variant['plan']}' is not an allocation "
                              f"method; use one of {', '.join(ALLOCATION_METHODS)}")
    start = expand_start(config)
    if start.variant is not None:
        raise ConfigError(f"config key 'expand.model': '{start.name}' is made by this expansion itself; expand an "
                          f"earlier model (the lifelong setting: a directory of an earlier run's stage-2 model)")
    if start.is_output or start.ref == registry.base_model(config).ref:
        # the base, a CPT checkpoint or an adapted model: the base's family
        model_type = base_config.model_type if base_config is not None else None
    else:
        outputs = tuple(sorted(registry.workflow_outputs(config)))
        found = _reference_file(start.ref, "expand.model", ("config.json",), start.revision, outputs)
        model_type = json.loads(found.read_text(encoding="utf-8")).get("model_type") if found else None
    if model_type is not None and model_type not in EXPANDABLE and not model_type.startswith(EXPANDED_PREFIX):
        raise ConfigError(f"config key 'expand.model': '{start.name}' is a {model_type} model, a family with no "
                          f"expansion class (moelang.architecture.EXPANDABLE: {', '.join(EXPANDABLE)}); expand a "
                          f"model of one of those, or set expand.enabled: false")
    moe = model_type is not None and (model_type.startswith(EXPANDED_PREFIX) or
                                      (model_type in FAMILIES and FAMILIES[model_type].router_attr is not None))
    if moe and section["init"] == "most_used" and not (start.profiled and config["routing"]["enabled"]):
        raise ConfigError(f"config key 'expand.init': most_used copies the parents' most-used experts from the "
                          f"routing profile of the model expanded, and '{start.name}' is not profiled (or "
                          f"routing.enabled is false); set expand.init: random")
    routing = [name for name, variant in section["variants"].items() if variant["plan"] == "routing"]
    if routing and not config["routing"]["enabled"]:
        raise ConfigError(f"config key 'expand.variants.{routing[0]}.plan': the routing plan weighs layers by the "
                          f"routing stage's specialisation scores, and routing.enabled is false; remove the "
                          f"variant or give it another plan")
    if routing and base_config is not None:
        # the routing plan weighs each layer by its specialisation score, which only an MoE layer has
        spec = FAMILIES[base_config.model_type]
        moe = set(spec.moe_layers(base_config)) if spec.router_attr else set()
        dense = [i for i in range(base_config.num_hidden_layers) if i not in moe]
        if dense:
            raise ConfigError(f"config key 'expand.variants.{routing[0]}.plan': the routing plan needs a "
                              f"specialisation score at every layer, and layers {dense} of the "
                              f"similarity model '{similarity_model(config)}' are dense (no routing profile); "
                              f"remove the variant or give it another plan")


def load(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config file, apply ``overrides`` (a nested dict merged on top) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file "
                          f"(the default is config/config.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if overrides:
        config = merge(config, overrides)
    return validate(config)


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def all_languages(config: dict) -> list[str]:
    """High-resource languages first (config order), then targets (config order)."""
    langs = config["languages"]
    return list(langs["high_resource"]) + [t for t in langs["targets"] if t not in langs["high_resource"]]


def check_lang(lang: str) -> str:
    """Reject anything that is not a plain ISO 639 code before it reaches a path or a command line."""
    if not isinstance(lang, str) or not LANG_PATTERN.match(lang):
        raise ConfigError(f"'{lang}' is not a language code; use an ISO 639-1/639-3 code of 2-3 lower-case "
                          f"letters such as 'en' or 'yue'")
    return lang


def source_for(config: dict, lang: str) -> dict:
    """The corpus source of ``lang``: its own entry in corpus.sources, else corpus.default_source."""
    corpus = config["corpus"]
    source = corpus["sources"].get(lang, corpus["default_source"])
    return copy.deepcopy(source)


def corpus_options(config: dict, lang: str) -> opts.CorpusOptions:
    """Everything the corpus stage needs for one language (and nothing else, so that changing another
    stage's options does not make Snakemake redo this one)."""
    corpus = config["corpus"]
    return opts.CorpusOptions(
        source=source_for(config, lang),
        dev_fraction=corpus["dev_fraction"],
        test_fraction=corpus["test_fraction"],
        split_salt=corpus["split_salt"],
        min_chars=corpus["min_chars"],
        min_doc_chars=corpus["min_doc_chars"],
        dedup=corpus["dedup"],
        builtin=corpus["builtin"],
    )


def corpus_shards(config: dict, lang: str) -> int:
    """Corpus jobs for ``lang``: its source's ``shards``, else ``corpus.shards``."""
    return int(source_for(config, lang).get("shards") or config["corpus"]["shards"])


def parallel_options(config: dict) -> opts.ParallelOptions:
    corpus = config["corpus"]
    return opts.ParallelOptions(
        languages=all_languages(config),
        parallel=corpus["parallel"],
        builtin=corpus["builtin"],
        sources={lang: source_for(config, lang) for lang in all_languages(config)},
    )


def to_json(options: opts.StageOptions | dict) -> str:
    """Stable JSON for a Snakemake ``params`` value (sorted keys: equal options, equal string)."""
    if isinstance(options, opts.StageOptions):
        return options.to_json()
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def tokenizer_options(config: dict) -> opts.TokenizerOptions:
    return opts.TokenizerOptions(**config["tokenizer"], seed=config["seed"], base_language=config["languages"]["base"])


def checkpoint_steps(steps: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` evenly spaced optimizer steps from 0 (the starting model) to ``steps``."""
    return sorted({round(i * steps / (n_checkpoints - 1)) for i in range(n_checkpoints)})


def _model_fields(config: dict) -> dict:
    """What loading the base model needs."""
    model = config["model"]
    return {"base": model["base"], "dtype": model["dtype"], "device": model["device"],
            "experts_implementation": model["experts_implementation"]}


def model_options(config: dict) -> opts.ModelOptions:
    return opts.ModelOptions(**_model_fields(config))


def pretrain_options(config: dict) -> opts.PretrainOptions:
    return opts.PretrainOptions(**_model_fields(config), seed=config["seed"], language=config["languages"]["base"],
                                train=opts.TrainSettings.from_dict(config["model"]["pretrain"], what="model.pretrain"))


def cpt_options(config: dict) -> opts.CptOptions:
    """CPT's settings; ``steps`` are the exported checkpoints. Step 0 (the starting model) is exported
    only for a base this workflow trained: a pretrained base is used from where it is, not copied."""
    cpt = config["model"]["cpt"]
    steps = checkpoint_steps(cpt["train"]["steps"], cpt["n_checkpoints"])
    if config["model"]["base"]["type"] == "pretrained":
        steps = [step for step in steps if step > 0]
    return opts.CptOptions(**_model_fields(config), seed=config["seed"], steps=steps,
                           train=opts.TrainSettings.from_dict(cpt["train"], what="model.cpt.train"))


def _load_fields(config: dict, entry: registry.ModelEntry) -> dict:
    """How a stage loads the registered model ``entry``."""
    base = config["model"]["base"]
    pretrained = base["type"] == "pretrained"
    return {"ref": str(entry.ref), "revision": entry.revision, "dtype": config["model"]["dtype"],
            "device": config["model"]["device"],
            "trust_remote_code": base.get("trust_remote_code", False) if pretrained else False}


def _section_fields(cls: type[opts.StageOptions], section: dict) -> dict:
    """The keys of a config section that are options of ``cls`` (the others belong to other stages)."""
    return {k: v for k, v in section.items() if k not in cls.NOT_OPTIONS}


def routing_options(config: dict, name: str) -> opts.RoutingOptions:
    entry = registry.profiled(config)[name]
    return opts.RoutingOptions(**_section_fields(opts.RoutingOptions, config["routing"]), **_load_fields(config, entry),
                               model=entry.series, checkpoint_step=entry.checkpoint_step)


def selection_model(config: dict) -> registry.ModelEntry:
    """The profiled model whose routing chooses the expert sets (``routing.selection_model``; default:
    the last one, the model adaptation starts from)."""
    profiled = registry.profiled(config)
    name = config["routing"]["selection_model"] or list(profiled)[-1]
    if name not in profiled:
        raise ConfigError(f"config key 'routing.selection_model': '{name}' is not a profiled model; use one of "
                          f"{', '.join(profiled)}")
    return profiled[name]


def routing_metrics_options(config: dict) -> opts.RoutingMetricsOptions:
    langs = config["languages"]
    section = _section_fields(opts.RoutingMetricsOptions, config["routing"])
    chosen = selection_model(config)
    section["selection_model"] = (chosen.series, chosen.checkpoint_step)
    return opts.RoutingMetricsOptions(**section, languages=all_languages(config), base_language=langs["base"],
                                      high_resource=langs["high_resource"], targets=langs["targets"],
                                      seed=config["seed"])


def similarity_model(config: dict) -> str:
    """The profiled model whose layer similarity drives the allocation (default: the last one)."""
    return config["similarity"]["model"] or list(registry.profiled(config))[-1]


def similarity_options(config: dict, name: str | None = None, method: str | None = None) -> opts.SimilarityOptions:
    """Options of the similarity of profiled model ``name`` by ``method`` (default: the configured ones)."""
    name = name or similarity_model(config)
    entry = registry.profiled(config)[name]
    section = {**config["similarity"], "method": method or config["similarity"]["method"]}
    return opts.SimilarityOptions(**section | {"model": entry.series}, **_load_fields(config, entry), name=name,
                                  checkpoint_step=entry.checkpoint_step)


def allocation_options(config: dict, kept: list[str]) -> opts.AllocationOptions:
    langs = config["languages"]
    alloc = config["allocation"]
    entry = registry.profiled(config)[similarity_model(config)]
    return opts.AllocationOptions(**alloc | {
        "old": alloc["old"] or [l for l in langs["high_resource"] if l in kept],
        "new": alloc["new"] or [l for l in langs["targets"] if l in kept]},
        model=entry.series, checkpoint_step=entry.checkpoint_step)


def adapt_targets(config: dict) -> list[str]:
    """The targets to adapt (``adapt.targets``, default every configured target), in config order;
    the workflow adapts those of them that the corpus stage kept."""
    if not config["adapt"]["enabled"]:
        return []
    chosen = config["adapt"]["targets"]
    return [t for t in config["languages"]["targets"] if chosen is None or t in chosen]


def adapt_start(config: dict) -> registry.ModelEntry:
    """The model adaptation starts from: ``adapt.start_model`` (a profiled model's name), default the
    model whose routing chose the expert sets (``routing.selection_model``)."""
    name = config["adapt"]["start_model"]
    if name is None:
        return selection_model(config)
    profiled = registry.profiled(config)
    if name not in profiled:
        raise ConfigError(f"config key 'adapt.start_model': '{name}' is not a profiled model; use one of "
                          f"{', '.join(profiled)}")
    return profiled[name]


def adapt_options(config: dict, lang: str, methods: list[str] | None = None) -> opts.AdaptOptions:
    """Options of the adaptation job of target ``lang`` (all configured methods, or ``methods``)."""
    section = {k: v for k, v in config["adapt"].items() if k not in opts.AdaptOptions.NOT_OPTIONS}
    start = adapt_start(config)
    evaluation = config["evaluation"]
    return opts.AdaptOptions(
        **section | {"methods": list(methods or section["methods"]),
                     "train": opts.TrainSettings.from_dict(section["train"], what="adapt.train")},
        **_load_fields(config, start), lang=lang, parent=config["languages"]["targets"][lang], start=start.name,
        final_layers=config["routing"]["final_layers"], seed=config["seed"],
        heldout={k: evaluation[k] for k in ("tokens_per_language", "seq_len", "batch_tokens")})


def expand_train_defaults(stage: str) -> dict:
    """The authors' recipe for expansion stage ``stage1`` or ``stage2`` (``ExpandOptions``' defaults):
    what a key left out of ``expand.<stage>`` takes."""
    settings = getattr(opts.ExpandOptions(), stage)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in
            ((k, getattr(settings, k)) for k in ("lr", "betas", "weight_decay", "warmup_steps", "min_lr_ratio",
                                                 "aux_loss_coef"))}


def expand_variants(config: dict) -> dict[str, dict]:
    """The expansion variants to run (name -> {plan, classifier}), in config order; none when the stage
    is off."""
    if not config["expand"]["enabled"]:
        return {}
    return {name: dict(variant) for name, variant in config["expand"]["variants"].items()}


def expand_start(config: dict) -> registry.ModelEntry:
    """The model the variants expand: ``expand.model``, a registered model's name, a directory or a hub
    id (default: the similarity stage's model, the one the plan was made on). A directory or hub id
    that a registered model is gets that model's entry; another one an entry of its own, named by its
    reference (evaluated only if listed in ``evaluation.models``)."""
    models = registry.model_registry(config)
    name = registry.expand_start_name(config)
    if name in models:
        return models[name]
    ref = config["expand"]["model"]
    if not (Path(ref).is_dir() or HUB_ID.match(ref) or ref.startswith("results/")):
        raise ConfigError(f"config key 'expand.model': '{ref}' is neither a model of this workflow "
                          f"({', '.join(models)}) nor an existing directory nor a hub id (owner/name); use one of those")
    base = registry.base_model(config)
    return registry.ModelEntry(name=ref, ref=ref, revision=base.revision if ref == base.ref else None, method="base",
                               rule=None, profiled=False, evaluated=False, series=ref, checkpoint_step=0)


def expand_options(config: dict, variant: str, kept: list[str] | None = None) -> opts.ExpandOptions:
    """Options of expansion variant ``variant`` (every step of it: stage 0, 1 and 2). The old and new
    languages are the allocation's, as the allocation stage resolves them from ``kept`` (the languages
    the corpus stage kept; default every configured language)."""
    section = config["expand"]
    spec = section["variants"][variant]
    start = expand_start(config)
    allocation = allocation_options(config, all_languages(config) if kept is None else kept)
    return opts.ExpandOptions(
        **{k: v for k, v in section.items() if k not in opts.ExpandOptions.NOT_OPTIONS and k not in ("stage1", "stage2")},
        stage1=opts.TrainSettings.from_dict(section["stage1"], what="expand.stage1"),
        stage2=opts.TrainSettings.from_dict(section["stage2"], what="expand.stage2"),
        **_load_fields(config, start), variant=variant, plan=spec["plan"], classifier=spec["classifier"],
        start=start.name, old=list(allocation.old), new=list(allocation.new),
        parents={lang: parent for lang, parent in config["languages"]["targets"].items() if lang in allocation.new},
        profile_model=start.name if start.profiled and config["routing"]["enabled"] else None, seed=config["seed"])


def evaluation_options(config: dict, name: str | None = None) -> opts.EvaluationOptions:
    """Evaluation options; with ``name``, of that registered model (without: what building the tasks needs)."""
    section = _section_fields(opts.EvaluationOptions, config["evaluation"])
    base = config["model"]["base"]
    pretrained = base["type"] == "pretrained"
    loading = {"dtype": config["model"]["dtype"], "device": config["model"]["device"],
               "trust_remote_code": base.get("trust_remote_code", False) if pretrained else False}
    if name is not None:
        loading = _load_fields(config, registry.evaluated(config)[name])
    return opts.EvaluationOptions(**section, **loading, seed=config["seed"])


def eval_summary_options(config: dict, families: list[str], names: list[str] | None = None,
                         kept: list[str] | None = None,
                         not_evaluated: dict[str, str] | None = None) -> opts.EvalSummaryOptions:
    """The summary of the evaluated models (``names``: those of this run, default all), in registry order;
    ``kept``: the languages the corpus stage kept (default every configured one), which decide the
    expansion's old and new languages; ``not_evaluated``: adapted models left out, name -> why."""
    evaluated = {n: e for n, e in registry.evaluated(config).items() if names is None or n in names}
    models = registry.summary_models(config)
    expanding = bool(expand_variants(config))
    allocation = allocation_options(config, all_languages(config) if kept is None else kept) if expanding else None
    return opts.EvalSummaryOptions(
        models={n: models[n] for n in evaluated}, order=list(evaluated), families=list(families),
        high_resource=list(config["languages"]["high_resource"]), targets=list(config["languages"]["targets"]),
        base_model=next((n for n, e in evaluated.items() if e.method == "base"), None),
        expand_old=list(allocation.old) if expanding else [], expand_new=list(allocation.new) if expanding else [],
        expand_runs="results/expand/runs.parquet" if expanding else None, not_evaluated=dict(not_evaluated or {}))


def report_options(config: dict) -> opts.ReportOptions:
    """The report's thresholds and the languages it names."""
    langs = config["languages"]
    return opts.ReportOptions(**config["report"], languages=all_languages(config),
                              high_resource=list(langs["high_resource"]), targets=dict(langs["targets"]),
                              base_language=langs["base"], final_layers=int(config["routing"]["final_layers"]))


# Sensible SLURM resources per rule (overridden by the config's `resources` section): data stages
# on CPUs, model stages on one GPU, continual pre-training on a whole node's GPUs. The GPU counts
# apply only with `resources.gpus: true` (config/README.md documents this table).
STAGE_RESOURCES: dict[str, dict] = {
    "corpus": {"runtime": 240, "mem_mb": 8000},
    "corpus_shard": {"runtime": 240, "mem_mb": 8000},
    "corpus_gather": {"runtime": 120, "mem_mb": 8000},
    "corpus_summary": {"runtime": 10, "mem_mb": 2000},
    "parallel": {"runtime": 60, "mem_mb": 8000},
    "tokenizer": {"runtime": 120, "mem_mb": 16000},
    "tokenize": {"runtime": 240, "mem_mb": 8000},
    "tokenize_shard": {"runtime": 240, "mem_mb": 8000},
    "tokenize_gather": {"runtime": 60, "mem_mb": 8000},
    "overlap": {"runtime": 30, "mem_mb": 8000},
    "pretrain_base": {"runtime": 720, "mem_mb": 32000, "gpu": 1},
    "cpt": {"runtime": 2880, "mem_mb": 256000, "gpu": 8},
    "profile_routing": {"runtime": 240, "mem_mb": 64000, "gpu": 1},
    "profile_routing_shard": {"runtime": 240, "mem_mb": 64000, "gpu": 1},
    "merge_routing": {"runtime": 30, "mem_mb": 8000},
    "routing_metrics": {"runtime": 30, "mem_mb": 8000},
    "layer_similarity": {"runtime": 240, "mem_mb": 64000, "gpu": 1},
    "allocate_experts": {"runtime": 10, "mem_mb": 2000},
    "adapt": {"runtime": 1440, "mem_mb": 64000, "gpu": 1},
    "select_adapt": {"runtime": 10, "mem_mb": 4000},
    "gather_adapt": {"runtime": 5, "mem_mb": 2000},
    "expand": {"runtime": 60, "mem_mb": 64000, "gpu": 1},
    "expand_stage1": {"runtime": 1440, "mem_mb": 64000, "gpu": 1},
    "expand_stage2": {"runtime": 720, "mem_mb": 64000, "gpu": 1},
    "gather_expand": {"runtime": 5, "mem_mb": 2000},
    "eval_tasks": {"runtime": 30, "mem_mb": 8000},
    "evaluate": {"runtime": 720, "mem_mb": 64000, "gpu": 1},
    "eval_summary": {"runtime": 10, "mem_mb": 4000},
    "report": {"runtime": 15, "mem_mb": 8000},
}
RESOURCE_KEYS = ("slurm_partition", "slurm_account", "runtime", "mem_mb", "cpus_per_task", "gpu", "slurm_extra")

# The Apptainer image each rule runs in with `--software-deployment-method apptainer`, by stage
# family (containers/<family>.def; which image is the config's `containers.<family>`): the data
# stages need no torch, the model stages need torch with CUDA, evaluation adds lm-eval. Same keys
# as STAGE_RESOURCES (tests/test_containers.py checks both against the rules).
CONTAINER_FAMILIES = ("data", "model", "eval")
RULE_CONTAINER_FAMILY: dict[str, str] = {
    "corpus": "data",
    "corpus_shard": "data",
    "corpus_gather": "data",
    "corpus_summary": "data",
    "parallel": "data",
    "tokenizer": "data",
    "tokenize": "data",
    "tokenize_shard": "data",
    "tokenize_gather": "data",
    "overlap": "data",
    "pretrain_base": "model",
    "cpt": "model",
    "profile_routing": "model",
    "profile_routing_shard": "model",
    "merge_routing": "model",
    "routing_metrics": "model",
    "layer_similarity": "model",
    "allocate_experts": "model",
    "adapt": "model",
    "select_adapt": "model",
    "gather_adapt": "model",
    "expand": "model",
    "expand_stage1": "model",
    "expand_stage2": "model",
    "gather_expand": "model",
    "eval_tasks": "eval",
    "evaluate": "eval",
    "eval_summary": "eval",
    "report": "eval",
}


def rule_resources(config: dict, rule: str) -> dict:
    """Resources of one rule: the stage default, then ``resources.default``, then ``resources.<rule>``.
    The stage defaults' GPUs are asked for only with ``resources.gpus: true`` (a GPU cluster, on
    purpose; the default is none, so a local run never starts one process per absent GPU); a ``gpu``
    count the config gives itself is asked for either way."""
    section = config.get("resources", {})
    stage = dict(STAGE_RESOURCES.get(rule, {}))
    if not section.get("gpus", False):
        stage.pop("gpu", None)
    merged = {**stage, **section.get("default", {}), **section.get(rule, {})}
    # gpu_memory_gb is the start-up memory check's (moelang.plan), not a scheduler resource
    return {k: v for k, v in merged.items() if v is not None and k != "gpu_memory_gb"}


def launcher(config: dict, rule: str) -> str:
    """The command that starts a training rule: ``python -m moelang`` on one device, torchrun with
    one process per GPU (DDP through accelerate) when the rule has several."""
    gpus = int(rule_resources(config, rule).get("gpu") or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m moelang"
    return "python -m moelang"


def rule_container(config: dict, rule: str) -> str:
    """The image ``rule`` runs in under ``--software-deployment-method apptainer``: the config's
    ``containers.<family>`` (a .sif file, or a docker://, oras:// or library:// URI)."""
    family = RULE_CONTAINER_FAMILY.get(rule)
    if family is None:
        raise MoelangError(f"rule '{rule}' has no container family; add it to RULE_CONTAINER_FAMILY in "
                           f"src/moelang/config.py with one of {', '.join(CONTAINER_FAMILIES)}")
    image = config.get("containers", {}).get(family)
    if not image:
        raise ConfigError(f"config key 'containers.{family}': no image for the {family} stages; set it to a .sif "
                          f"file or a docker:// or oras:// URI (default: containers/{family}.sif)")
    return image


def missing_container_images(config: dict, root: str | Path = ".") -> list[str]:
    """One line per configured image that is a local file (no ``scheme://``) missing under ``root``.
    Only a run with ``--sdm apptainer`` needs them; checking before any job starts turns a failure of
    every job into one message that says how to build the image."""
    missing = []
    for family in CONTAINER_FAMILIES:
        image = config.get("containers", {}).get(family)
        if image and "://" not in image and not (Path(root) / image).is_file():
            missing.append(f"config key 'containers.{family}': image '{image}' does not exist; build it with "
                           f"containers/build.sh {family}, or set containers.{family} to a docker:// or oras:// URI")
    return missing

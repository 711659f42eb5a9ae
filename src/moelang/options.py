"""Typed options of every stage: one frozen dataclass per stage, a docstring per field.

The config schema (``config.schema.yaml``) is the user-facing contract and holds the defaults a
user sees; :mod:`moelang.config` builds each stage's options from a validated config in one place
(``corpus_options``, ``routing_options``, ...); the Snakemake rules pass them to the stage as JSON
(``--options``) and the CLI parses that JSON back into the same class, so a misspelt or stale key
stops the stage in one line instead of being ignored. The dataclass defaults are the schema's
defaults (``tests/test_options.py`` ties the two, field by field), so calling a stage function from
Python with only a few options set gives what the workflow would.

Each class names the config section it mirrors (``SECTION``), the fields that come from elsewhere
in the config or from the run (``DERIVED``: the model reference, the seed, ...), and the keys of its
section that are not its options (``NOT_OPTIONS``: what Snakemake uses to split jobs, or another
stage's options); the test checks that every other key of the section is a field and vice versa.

The data stages (corpus, tokenizer) import this module, so it stays free of torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Self

from moelang.errors import ConfigError


class StageOptions:
    """What every stage's options class shares (mixed into frozen dataclasses)."""

    SECTION: ClassVar[str | None] = None
    """The config section the options mirror (dotted), or None."""
    DERIVED: ClassVar[frozenset[str]] = frozenset()
    """Fields that are not keys of ``SECTION`` (filled from elsewhere in the config or by the run)."""
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset()
    """Keys of ``SECTION`` that are not options of this stage."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], what: str | None = None) -> Self:
        """Checked construction: an unknown key names the nearest known one; a missing required key
        is named; nested options classes and tuples are built from their JSON form."""
        what = what or cls.__name__
        if not isinstance(values, dict):
            raise ConfigError(f"{what}: expected a JSON object of options, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean '{near[0]}'?" if near else f"known: {', '.join(sorted(fields))}"
                raise ConfigError(f"{what}: unknown option '{key}'; {hint}")
        missing = [name for name, f in fields.items() if name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{what}: missing option(s) {', '.join(missing)}; build the options with "
                              f"moelang.config (or pass --config CONFIG.yaml)")
        hints = _type_hints(cls)
        return cls(**{key: _convert(hints[key], value, f"{what}.{key}") for key, value in values.items()})

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--options is not valid JSON ({exc.msg} at position {exc.pos}); pass a JSON object") from None
        return cls.from_dict(values, what=f"--options ({cls.__name__})")

    @classmethod
    def coerce(cls, options: StageOptions | dict) -> Self:
        """``options`` as this class: an instance as it is, a dict checked by :meth:`from_dict`."""
        return options if isinstance(options, cls) else cls.from_dict(dict(options))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples as lists), nested options included."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """Stable JSON (sorted keys: equal options, equal string, so Snakemake reruns a job only when
        an option of its own stage changed)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def replace(self, **changes) -> Self:
        return dataclasses.replace(self, **changes)


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(hint, value, what: str):
    """``value`` (parsed JSON) as type ``hint`` where the two differ: nested options classes from
    dicts, tuples from lists; everything else as it is (the schema checked the config's types)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if arm is not type(None):
                try:
                    return _convert(arm, value, what)
                except (ConfigError, TypeError):
                    continue
        return value
    if isinstance(hint, type) and issubclass(hint, StageOptions) and isinstance(value, dict):
        return hint.from_dict(value, what=what)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of ``cls`` (and its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is StageOptions:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for stmt, after in zip(body, body[1:] + [None]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe(cls: type) -> str:
    """One line per field: name, type, default and its docstring (``moelang options STAGE`` prints it)."""
    hints = _type_hints(cls)
    docs = field_docs(cls)
    lines = [f"{cls.__name__}" + (f" (config section '{cls.SECTION}')" if cls.SECTION else "")]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {f.default_factory()!r}"
        else:
            default = " (required)"
        hint = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        lines.append(f"  {f.name}: {hint}{default}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadOptions(StageOptions):
    """How a stage that runs a model loads it."""

    ref: str = ""
    """The model: a directory this workflow wrote, a local directory, or a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id; None for local models."""
    dtype: str = "float32"
    """Weights' dtype for inference (``model.dtype``)."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (``model.device``)."""
    trust_remote_code: bool = False
    """Run code from the model's repository; only when the config turns it on for a pretrained base."""


# --------------------------------------------------------------------------------------------------
# Data stages
# --------------------------------------------------------------------------------------------------

BUILTIN_DEFAULT = {
    "packages": ["Django", "Sphinx", "plone.app.locales", "wagtail", "weblate"],
    "english_prose": ["pydoc_topics"],
}


@dataclass(frozen=True)
class CorpusOptions(StageOptions):
    """The corpus stage for one language (``moelang corpus``)."""

    SECTION: ClassVar[str] = "corpus"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"source"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"sources", "default_source", "shards", "parallel"})

    source: dict = field(default_factory=lambda: {"type": "builtin"})
    """This language's source: its entry in ``corpus.sources``, else ``corpus.default_source``
    (``type``: builtin, local or hf, with that type's keys; the schema defines them)."""
    dev_fraction: float = 0.1
    """Fraction of documents in the dev split (model selection; by a salted hash of the document id)."""
    test_fraction: float = 0.1
    """Fraction of documents in the test split (everything reported; by the same hash)."""
    split_salt: str = "moelang"
    """Salt of the split hash; another salt gives another split."""
    min_chars: int = 20000
    """A language with fewer characters in total is dropped (and reported)."""
    min_doc_chars: int = 1
    """Documents shorter than this are skipped."""
    dedup: bool = True
    """Drop exact duplicate documents (after whitespace normalisation)."""
    builtin: dict = field(default_factory=lambda: json.loads(json.dumps(BUILTIN_DEFAULT)))
    """The offline built-in source: ``packages`` (translation catalogs read from site-packages) and
    ``english_prose`` (English text shipped with Python)."""


@dataclass(frozen=True)
class ParallelOptions(StageOptions):
    """The parallel-sentence table (``moelang parallel``)."""

    SECTION: ClassVar[str] = "corpus"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"languages", "sources"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"default_source", "dev_fraction", "test_fraction", "split_salt",
                                                      "min_chars", "min_doc_chars", "dedup", "shards"})

    languages: list[str] = field(default_factory=list)
    """Every language of the run, high-resource first."""
    parallel: dict = field(default_factory=lambda: {"source": "builtin", "files": {}, "min_languages": 2})
    """``corpus.parallel``: ``source`` (builtin or files), ``files`` per language, ``min_languages``."""
    builtin: dict = field(default_factory=lambda: json.loads(json.dumps(BUILTIN_DEFAULT)))
    """As in :class:`CorpusOptions`."""
    sources: dict = field(default_factory=dict)
    """Each language's corpus source (the built-in catalogs give the built-in parallel sentences)."""


@dataclass(frozen=True)
class TokenizerOptions(StageOptions):
    """Training or fetching the tokenizer (``moelang tokenizer``)."""

    SECTION: ClassVar[str] = "tokenizer"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"seed", "base_language"})

    type: str = "train"
    """``train`` a byte-level BPE on the corpus, or use a ``pretrained`` model's tokenizer."""
    name_or_path: str | None = None
    """The pretrained tokenizer (hub id or directory); ``type: pretrained`` only."""
    revision: str | None = None
    """Hub revision of ``name_or_path``."""
    trust_remote_code: bool = False
    """Allow a tokenizer with custom code (off unless the config turns it on)."""
    vocab_size: int = 8000
    """Size of a trained vocabulary."""
    min_frequency: int = 2
    """A merge must occur at least this often."""
    base_language_fraction: float = 1.0
    """Fraction of the base language's training documents in the tokenizer's training mix."""
    other_language_fraction: float = 0.2
    """Fraction of every other language's training documents (an English-centric vocabulary)."""
    seed: int = 0
    """The run's seed (which documents the mix draws)."""
    base_language: str = "en"
    """``languages.base``."""


# --------------------------------------------------------------------------------------------------
# Model training
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings(StageOptions):
    """One training run (``model.pretrain``, ``model.cpt.train``, the adaptation runs)."""

    SECTION: ClassVar[str] = "model.cpt.train"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"seed", "mixture"})

    steps: int
    """Optimizer steps."""
    seq_len: int = 256
    """Tokens per packed training sequence."""
    micro_batch_size: int = 8
    """Sequences per forward pass and process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine ends at this fraction of ``lr``."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW weight decay (decoupled); on the trainable matrices only, unless ``decay_norms_and_biases``."""
    clip_norm: float = 1.0
    """Global gradient-norm clip."""
    aux_loss_coef: float = 0.01
    """Weight of the model's load-balancing loss (0: none)."""
    z_loss_coef: float = 0.0
    """Router z-loss weight (0: none; the OLMoE recipe: 0.001)."""
    warmup_start_ratio: float = 0.0
    """The warm-up goes linearly from this x lr to lr (0: from lr / warmup_steps)."""
    cosine_horizon_steps: int | None = None
    """The cosine reaches ``min_lr_ratio`` here (None: at the last step)."""
    decay_norms_and_biases: bool = False
    """Weight decay on 1-D tensors too (the OLMo trainer's choice)."""
    dtype: str = "fp32"
    """fp32 | bf16 (autocast). The optimizer steps fp32 weights either way: trainable tensors of a
    model loaded in half precision train as fp32 master weights (:func:`moelang.train.fp32_master_weights`)."""
    parallelism: str = "ddp"
    """ddp | fsdp: how several processes share the work (one process: neither)."""
    checkpoint_every: int = 0
    """Optimizer steps between training-state checkpoints (0: none in between)."""
    keep_last_states: int = 1
    """Training states (checkpoints with optimizer state, to resume from) kept in the state directory
    while the run goes on: the newest N. Each new one is written whole before the oldest is removed, so
    the disk holds up to N + 1 while one is written. When the run completes, its exports are published
    and the state directory is removed with every state in it: only the exports remain (exports only)."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input for the backward pass and recompute the layer there
    (transformers' gradient checkpointing, non-reentrant): activation memory falls to about one layer's
    plus the logits, for about one more forward pass of compute. Results are the same."""
    seed: int = 0
    """Seed of initialisation, data order and dropout (the run's ``seed``)."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Language -> sampling weight (normalised); the engine fills it from the token files."""

    def __post_init__(self):
        if self.parallelism not in PARALLELISMS:
            raise ConfigError(f"training option parallelism: {self.parallelism!r} is not one of "
                              f"{', '.join(PARALLELISMS)}; fix the value")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"training option dtype: {self.dtype!r} is not fp32 or bf16; fix the value")
        if self.keep_last_states < 1:
            raise ConfigError(f"training option keep_last_states: {self.keep_last_states} keeps no state to resume from; "
                              f"set 1 or more (checkpoint_every: 0 writes none)")


PARALLELISMS = ("ddp", "fsdp")


@dataclass(frozen=True)
class ModelOptions(StageOptions):
    """What loading or building the base model needs (``model``)."""

    SECTION: ClassVar[str] = "model"
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"pretrain", "cpt"})

    base: dict = field(default_factory=lambda: {"type": "train"})
    """``model.base``: ``type: train`` with an ``architecture``, or ``type: pretrained`` with
    ``name_or_path`` (and ``revision``, ``trust_remote_code``)."""
    dtype: str = "float32"
    """Weights' dtype when loading."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    experts_implementation: str | None = None
    """transformers' experts kernel (``eager``, ``grouped_mm``, ``batched_mm``; None: its default)."""


@dataclass(frozen=True)
class PretrainOptions(ModelOptions):
    """Pre-training the small English-centric base (``moelang pretrain``)."""

    DERIVED: ClassVar[frozenset[str]] = frozenset({"train", "seed", "language"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"pretrain", "cpt"})

    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=800))
    """``model.pretrain``."""
    seed: int = 0
    """The run's seed."""
    language: str = "en"
    """The base language (``languages.base``), the only training data."""


@dataclass(frozen=True)
class CptOptions(ModelOptions):
    """Continual pre-training on the high-resource languages (``moelang cpt``)."""

    DERIVED: ClassVar[frozenset[str]] = frozenset({"train", "seed", "steps"})

    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=800))
    """``model.cpt.train``."""
    seed: int = 0
    """The run's seed."""
    steps: list[int] = field(default_factory=list)
    """Optimizer steps whose weights are exported (``model.cpt.n_checkpoints`` evenly spaced)."""


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingOptions(LoadOptions):
    """Profiling one model's routing (``moelang profile-routing``)."""

    SECTION: ClassVar[str] = "routing"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"ref", "revision", "dtype", "device", "trust_remote_code",
                                                   "model", "checkpoint_step", "shard"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"enabled", "shards", "final_layers", "alpha", "shared_k", "shared_mode",
                                                      "top_n", "jsd_overlap_layer", "selection_model"})

    model: str = ""
    """The tables' ``model`` column (a CPT series' name, or the model's name)."""
    checkpoint_step: int = 0
    """The tables' ``checkpoint_step`` column."""
    tokens_per_language: int | None = 100000
    """Dev-split tokens profiled per language (None: all)."""
    windowing: str = "document"
    """``document``: chunks within documents; ``stream``: fixed windows across documents (the authors')."""
    seq_len: int = 512
    """Tokens per sequence (at most, ``document``; exactly, ``stream``)."""
    batch_tokens: int = 8192
    """Tokens per forward pass (padding included)."""
    token_layers: list[int] = field(default_factory=list)
    """Layers whose (token, expert) counts are also written."""
    shard: tuple[int, int] = (0, 1)
    """(i, n): profile every n-th sequence from the i-th (a job of a sharded profile)."""


@dataclass(frozen=True)
class RoutingMetricsOptions(StageOptions):
    """Routing metrics and expert selection over all profiles (``moelang routing-metrics``)."""

    SECTION: ClassVar[str] = "routing"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"languages", "base_language", "high_resource", "targets", "seed"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"enabled", "tokens_per_language", "windowing", "seq_len",
                                                      "batch_tokens", "shards", "token_layers"})

    languages: list[str] = field(default_factory=list)
    """Every language of the run, high-resource first."""
    base_language: str = "en"
    """``languages.base``."""
    high_resource: list[str] = field(default_factory=list)
    """``languages.high_resource``."""
    targets: dict[str, str] = field(default_factory=dict)
    """``languages.targets``: target -> parent high-resource language."""
    seed: int = 0
    """The run's seed (the random expert sets)."""
    final_layers: int = 2
    """Expert sets are chosen in the last this-many MoE layers."""
    alpha: float = 0.01
    """A language-specific expert's share gap over every other language must exceed this."""
    shared_k: int = 5
    """Shared experts added to SSFT's set."""
    shared_mode: str = "k_extra"
    """``k_extra``: k shared experts not already specific; ``union``: the top k, overlaps merged."""
    top_n: int = 20
    """Rows of the per-layer top-expert table."""
    jsd_overlap_layer: int | None = None
    """Layer of the JSD-vs-overlap correlation (None: the last MoE layer)."""
    selection_model: tuple[str, int] | None = None
    """(model, checkpoint_step) whose routing chooses the experts (None: the last checkpoint profiled)."""


@dataclass(frozen=True)
class SimilarityOptions(LoadOptions):
    """Per-layer cross-lingual similarity of one model (``moelang similarity``)."""

    SECTION: ClassVar[str] = "similarity"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"ref", "revision", "dtype", "device", "trust_remote_code",
                                                   "checkpoint_step", "name"})

    name: str = ""
    """The profiled model's name (the output file's name)."""
    model: str | None = None
    """The tables' ``model`` column (the config key ``similarity.model`` picks ``name``)."""
    checkpoint_step: int = 0
    """The tables' ``checkpoint_step`` column."""
    method: str = "tokens"
    """``tokens`` (mean hidden state per language) or ``parallel`` (translated sentences)."""
    tokens_per_language: int | None = 100000
    """Dev-split tokens per language (``tokens``)."""
    context: str = "chunks"
    """``chunks`` of at most ``seq_len`` tokens, or whole ``documents`` cut at ``seq_len``."""
    bos: bool = False
    """Start every sequence with the tokenizer's BOS token."""
    seq_len: int = 512
    """Tokens per sequence (at most)."""
    batch_tokens: int = 8192
    """Tokens per forward pass."""
    max_parallel_items: int | None = 2000
    """Parallel sentences used at most (``parallel``)."""


@dataclass(frozen=True)
class AllocationOptions(StageOptions):
    """LayerMoE's allocation of new experts per layer (``moelang allocate``)."""

    SECTION: ClassVar[str] = "allocation"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"model", "checkpoint_step", "existing"})

    old: list[str] | None = None
    """Languages the model knows (None in the config: the kept high-resource ones, filled in by
    :func:`moelang.config.allocation_options`)."""
    new: list[str] | None = None
    """Languages being added (None in the config: the kept targets)."""
    delta: float | None = None
    """Expert budget as the paper's delta (exactly one of ``delta``, ``new_experts``)."""
    new_experts: int | None = None
    """Expert budget as a total number of new experts."""
    counts_existing: bool | None = None
    """Whether the budget counts the existing experts (None: dense no, MoE yes)."""
    classifier_layers: int | list[int] | None = None
    """Layers that get a router classifier: a list, or how many by our rule (None: its default)."""
    routing_weight: float = 1.0
    """Weight of the routing plan's specialisation term."""
    nonpositive: str = "shift"
    """Layer scores <= 0: ``shift``, ``clip`` or ``error``."""
    uniform_per_layer: int | None = None
    """The ``uniform`` plan's new experts in every layer (MoE-LPR's own budget, the LayerMoE paper's
    baseline); None: LayerMoE's total spread evenly (a comparison at equal budget)."""
    mola_budget: str = "authors"
    """The ``mola`` plan's budget: ``authors``, MoLA as the LayerMoE authors run it (1, 3, 5, 7 new
    experts per quarter of depth, on any base); ``layermoe_total``, the 2, 4, 6, 8 shape scaled to
    LayerMoE's total (ours: a comparison at equal budget)."""
    model: str | None = None
    """The similarity table's model (chooses the specialisation rows)."""
    checkpoint_step: int | None = None
    """The similarity table's checkpoint step."""
    existing: int | None = None
    """Experts per layer today (None: from the similarity table)."""


# --------------------------------------------------------------------------------------------------
# Adaptation
# --------------------------------------------------------------------------------------------------

# Paper A's Full-FT (the OLMo trainer from the CPT model, authors-code.md): load balancing 0.01, z-loss
# 0.001, weight decay on every parameter, and a learning rate still in the CPT's warm-up, rising from about
# 1e-5 to 1.7e-5 over the run (0.59 of its end); the swept lr plays their 1.7e-5
FULL_FT_AUTHORS = {"recipe": "authors", "aux_loss_coef": 0.01, "z_loss_coef": 0.001, "weight_decay_all": True,
                   "warmup_start_ratio": 0.59, "warmup_steps": None}


@dataclass(frozen=True)
class AdaptOptions(LoadOptions):
    """Final-layer expert fine-tuning of one target language (``moelang adapt``): every method and
    learning rate of the job, each run trained from the start model on the target's train split."""

    SECTION: ClassVar[str] = "adapt"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"ref", "revision", "dtype", "device", "trust_remote_code", "lang",
                                                   "parent", "final_layers", "start", "seed", "heldout"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"enabled", "targets", "start_model", "job_per"})

    lang: str = ""
    """The target language."""
    parent: str = ""
    """Its high-resource parent (``languages.targets``)."""
    start: str = ""
    """The start model's name in the registry (the run records name it)."""
    methods: list[str] = field(default_factory=lambda: ["ssft", "seft", "aeft", "full-ft"])
    """Methods to run (``moelang.adapt.ADAPT_METHODS``; ``seft_top{N}`` with N = ``routing.top_n``)."""
    learning_rates: list[float] = field(default_factory=lambda: [1e-4, 1e-3])
    """Peak learning rates of the sweep; each (method, rate) is one run."""
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=100, aux_loss_coef=0.0))
    """Every run's training settings (its ``lr`` is the run's rate from ``learning_rates``)."""
    final_layers: int = 2
    """K: the final K MoE layers are adapted (``routing.final_layers``: where the expert sets were chosen)."""
    mask_router: bool = True
    """Expert methods: while training, route each token of the K layers among the chosen experts only."""
    full_ft: dict = field(default_factory=lambda: dict(FULL_FT_AUTHORS))
    """The ``full-ft`` method's own training settings over ``train`` (:func:`moelang.adapt.full_ft_settings`):
    ``recipe`` ``authors`` (paper A's Full-FT, the OLMo trainer: ``aux_loss_coef``, ``z_loss_coef``,
    ``weight_decay_all``, a warm-up from ``warmup_start_ratio`` x lr over ``warmup_steps``, null: the
    whole run) or ``expert_methods`` (ours: ``train`` as the expert methods have it)."""
    lora: dict = field(default_factory=lambda: {"rank": 8, "alpha": 16.0, "targets": ["experts", "router"]})
    """The ``lora`` method's settings (``moelang.models.lora.LoRASettings``: rank, alpha, targets)."""
    share_frozen_pass: bool = True
    """Runs whose trainable parameters all lie in the final K layers share one pass of the frozen layers
    below them (``moelang.sweep``); ``full-ft`` always trains alone."""
    keep_models: str = "all"
    """``all``: every (method, rate) run's model stays in its run directory; ``selected``: at the end of
    the job only each method's run with the lowest dev perplexity (the selection's own rule,
    :func:`moelang.adapt.select_runs`) keeps its weights, the others keep their records, logs and
    perplexities (and ``weights_not_kept.json``). At OLMoE-1B-7B scale a run's model is 13.8 GB and
    olmoe-m7 has 240 runs."""
    sweep_group_size: int | None = None
    """At most this many runs share one frozen pass (None: all of a job's eligible runs). Each run of a
    shared pass holds its own trainable tensors, fp32 weights, gradients and AdamW moments (16 bytes a
    parameter), so memory grows with the group: OLMoE-1B-7B's AEFT trains 805M parameters a run, 12.9 GB,
    and five rates together need 64 GB besides the model. Smaller groups: more passes, less memory."""
    seed: int = 0
    """The run's seed (data order; every run of a target sees the same batches)."""
    heldout: dict = field(default_factory=lambda: {"tokens_per_language": 100000, "seq_len": 512, "batch_tokens": 8192})
    """How each run's perplexity on the target is measured, on its dev split (selects the learning
    rate) and on its test split (reported) (``evaluation.tokens_per_language``, ``seq_len``, ``batch_tokens``)."""


@dataclass(frozen=True)
class ExpandOptions(LoadOptions):
    """LayerMoE expansion of one variant (``moelang expand``, ``moelang expand-train``): the model is
    grown by its allocation plan's new experts, trained in two stages (see :mod:`moelang.expand`)."""

    SECTION: ClassVar[str] = "expand"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"ref", "revision", "dtype", "device", "trust_remote_code",
                                                   "variant", "plan", "classifier", "start", "old", "new",
                                                   "parents", "profile_model", "seed"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"enabled", "model", "variants"})

    variant: str = ""
    """The variant's name (``expand.variants``): the directory and the registry name ``expand-{variant}``."""
    plan: str = "layermoe"
    """The allocation method whose plan gives the new experts per layer (``results/allocation/plan.json``)."""
    classifier: bool = True
    """Stage 2 puts router classifiers on the plan's classifier layers (False: the ablation)."""
    start: str = ""
    """The expanded model's name in the registry (gains and forgetting are measured against it)."""
    old: list[str] = field(default_factory=list)
    """Old languages: replayed in stage 2, class 0 of the classifier, pushed to the original experts."""
    new: list[str] = field(default_factory=list)
    """New languages: stage 1 trains on them alone; class 1 of the classifier."""
    parents: dict = field(default_factory=dict)
    """New language -> its high-resource parent: whose most-used experts seed an MoE base's new experts."""
    profile_model: str | None = None
    """The profiled model whose routing counts rank the experts (``init: most_used``; None: random copies)."""
    top_k: int = 2
    """Experts per token in an upcycled dense layer (k = min(top_k, experts)); an MoE base keeps its own."""
    init: str = "most_used"
    """MoE base: new experts start as copies of the parents' most-used experts (``most_used``) or of
    random existing experts (``random``). A dense base always copies its FFN."""
    noise: float = 0.0
    """Relative std of Gaussian noise added to the copies (0: exact copies, the authors' way)."""
    admit_steps: int = 0
    """Stage 1 admits the new experts over this many steps (ours; 0: the authors' way, they compete
    from the start): the expanded model starts with the new experts' softmax mass at 0, so it computes
    exactly what its base computes, and stage 1 raises it linearly to 1
    (:mod:`moelang.models.layermoe.admission`). At most ``stage1.steps``."""
    stage1: TrainSettings = field(default_factory=lambda: TrainSettings(
        steps=100, lr=5e-5, warmup_steps=0, min_lr_ratio=0.0, betas=(0.9, 0.999), weight_decay=0.0, aux_loss_coef=0.01))
    """Stage 1 (new experts and routers on the new languages): the authors' optimiser as default
    (AdamW 0.9/0.999, weight decay 0, cosine to 0, no warm-up), load balancing 0.01."""
    stage2: TrainSettings = field(default_factory=lambda: TrainSettings(
        steps=100, lr=5e-5, warmup_steps=0, min_lr_ratio=0.0, betas=(0.9, 0.999), weight_decay=0.0, aux_loss_coef=0.0))
    """Stage 2 (routers and classifiers on new languages plus a replay of the old), no balance loss."""
    replay_fraction: float = 0.33
    """Stage 2: the share of sequences drawn from the old languages (the authors: about a third)."""
    lpr_weight: float = 0.1
    """Stage 2: weight of the routing-prior loss (old-language tokens pushed to the original experts)."""
    lpr_form: str = "probabilities"
    """``probabilities``: the authors' code, cross-entropy over the softmax probabilities (a double
    softmax); ``logits``: the plain cross-entropy on the router logits."""
    classifier_weight: float = 0.1
    """Stage 2: weight of the classifier's cross-entropy on each sequence's group (old 0, new 1)."""
    classifier_pooling: str = "mean"
    """What the classifier reads: ``mean`` (ours) the mean MLP input over the real tokens; ``sum``
    (the authors') the plain sum over the sequence, padding included (it saturates the logits at a
    small model's learning rate: :mod:`moelang.models.layermoe.common`)."""
    classifier_decision: str = "causal"
    """``causal`` (ours) each position decided from its prefix, so scores never see later tokens;
    ``sequence`` (the authors') one decision from the whole sequence. Training and scoring alike."""
    classifier_balance: bool = True
    """Stage 2: the classifier's cross-entropy weighs the old and new sequences of a batch equally
    (ours; the replay makes about a third of them old, and a classifier that learns that share
    answers "new" for old text); False: the plain mean over sequences."""
    classifier_lr: float | None = None
    """Stage 2: the router classifiers' own peak learning rate (same schedule; None: the stage's lr,
    the authors' single rate)."""
    classifier_eval_sequences: int = 32
    """Held-out (test split) sequences per old and new language for each classifier's accuracy."""
    seed: int = 0
    """The run's seed (router and classifier initialisation, data order)."""


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluationOptions(LoadOptions):
    """Task building and evaluation of one model (``moelang eval-tasks``, ``moelang evaluate``)."""

    SECTION: ClassVar[str] = "evaluation"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"ref", "revision", "dtype", "device", "trust_remote_code", "seed"})
    NOT_OPTIONS: ClassVar[frozenset[str]] = frozenset({"models"})

    seed: int = 0
    """The run's seed (item order, few-shot draws)."""
    tasks: list[str] = field(default_factory=lambda: ["synthetic_blimp", "synthetic_belebele"])
    """Task families to build and run."""
    perplexity: bool = True
    """Also test-split perplexity per language."""
    belebele_shots: int = 4
    """Few-shot examples of Belebele-style tasks."""
    max_items: int = 200
    """Items per synthetic task at most."""
    min_items: int = 20
    """A synthetic task with fewer items is not built."""
    max_words: int = 40
    """Longest passage sentence of the synthetic tasks, in words."""
    mirror: str | None = None
    """Directory mirroring the hub datasets (offline Belebele/MultiBLiMP)."""
    codes: dict = field(default_factory=dict)
    """Per family, language -> the dataset's own code (overrides the built-in table)."""
    limit: int | None = None
    """Items per task at most (lm-eval's ``limit``)."""
    batch_size: int = 16
    """lm-eval batch size."""
    max_length: int | None = None
    """Context length lm-eval gives the model (None: the model's own)."""
    bootstrap_iters: int = 1000
    """lm-eval's bootstrap iterations for standard errors (0: none)."""
    tokens_per_language: int | None = 100000
    """Tokens of the split per language for perplexity (test in evaluation; dev and test in adaptation)."""
    seq_len: int = 512
    """Tokens per perplexity window."""
    batch_tokens: int = 8192
    """Tokens per perplexity forward pass."""


@dataclass(frozen=True)
class EvalSummaryOptions(StageOptions):
    """The results table (``moelang eval-summary``)."""

    models: dict[str, dict] = field(default_factory=dict)
    """Name -> {ref, method, trainable_fraction, target, start, variant} of every evaluated model
    (:func:`moelang.registry.summary_models`; an adapted model's target language and start model, an
    expanded model's variant and start model)."""
    order: list[str] = field(default_factory=list)
    """The models' order in the table: the registry's (JSON objects do not keep one)."""
    families: list[str] = field(default_factory=list)
    """Task families evaluated."""
    high_resource: list[str] = field(default_factory=list)
    """``languages.high_resource`` (forgetting)."""
    targets: list[str] = field(default_factory=list)
    """Target languages."""
    base_model: str | None = None
    """The model the others are compared with (None: no deltas)."""
    expand_old: list[str] = field(default_factory=list)
    """The expansion's old languages (forgetting): the allocation's, kept by the corpus stage."""
    expand_new: list[str] = field(default_factory=list)
    """The expansion's new languages (gain)."""
    expand_runs: str | None = None
    """``results/expand/runs.parquet`` (new experts, trainable fractions) when the expansion runs, else None."""
    not_evaluated: dict[str, str] = field(default_factory=dict)
    """Adapted models of the registry that are not evaluated, name -> why (their method was not trained:
    an expert set empty in every adapted layer); summary.md lists them."""


@dataclass(frozen=True)
class ReportOptions(StageOptions):
    """The report of a run and its findings (``moelang report``)."""

    SECTION: ClassVar[str] = "report"
    DERIVED: ClassVar[frozenset[str]] = frozenset({"languages", "high_resource", "targets", "base_language",
                                                   "final_layers"})

    ppl_tolerance: float = 0.02
    """Finding 4: LayerMoE's new-language perplexity counts as equal to the uniform plan's when it is at
    most this much higher (relative)."""
    classifier_min_margin: float = 0.15
    """Finding 4: the router classifier counts as learned when its held-out accuracy beats the
    majority-class baseline by at least this much in every classifier layer; otherwise the
    classifier clause is not computed."""
    ssft_max_fraction: float = 0.02
    """Finding 3: the share of the reference model's parameters SSFT must stay under (the paper's ~2%)."""
    ssft_min_gain_share: float = 0.9
    """Finding 3: the share of AEFT's mean target gain SSFT must recover, on each evaluated task family
    (accuracy) and, shown beside them, held-out perplexity (log; it decides only without task families)."""
    reference_shared_k: int = 5
    """Finding 3, extrapolated (the run's model has other than the reference's experts per layer): shared
    experts SSFT trains per layer at the reference scale (the paper's k = 5 of 64; the run's own
    ``routing.shared_k`` is sized for its model); the language-specific ones scale by their share of the
    layer's experts."""
    reference_model: str = "allenai/OLMoE-1B-7B-0924"
    """Finding 3: the model whose config SSFT's trainable fraction is counted on (meta device, no
    weights; offline, moelang's copy of its config)."""
    languages: list[str] = field(default_factory=list)
    """Every configured language, in config order."""
    high_resource: list[str] = field(default_factory=list)
    """``languages.high_resource``."""
    targets: dict[str, str] = field(default_factory=dict)
    """Target -> parent (``languages.targets``)."""
    base_language: str = "en"
    """The base model's language (``languages.base``)."""
    final_layers: int = 2
    """``routing.final_layers``: the adapted layers, finding 1's final layers."""


STAGE_OPTIONS: dict[str, type[StageOptions]] = {
    "corpus": CorpusOptions,
    "parallel": ParallelOptions,
    "tokenizer": TokenizerOptions,
    "pretrain": PretrainOptions,
    "cpt": CptOptions,
    "profile-routing": RoutingOptions,
    "routing-metrics": RoutingMetricsOptions,
    "similarity": SimilarityOptions,
    "allocate": AllocationOptions,
    "adapt": AdaptOptions,
    "expand": ExpandOptions,
    "evaluate": EvaluationOptions,
    "eval-summary": EvalSummaryOptions,
    "report": ReportOptions,
}
"""Subcommand -> its options class (``moelang options SUBCOMMAND`` describes one)."""

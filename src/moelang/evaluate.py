"""Stage: evaluation. lm-evaluation-harness tasks, test-split perplexity, one results table.

Everything here is reported, so everything reads each language's **test** split (:mod:`moelang.splits`),
never the dev split that chose learning rates, experts and plans.

Task families (``evaluation.tasks``):

``belebele`` / ``multiblimp``
    the harness's own ``belebele_<lang_Script>`` and ``multiblimp_<iso639-3>`` tasks: by name from the
    hub, or, with ``evaluation.mirror`` (offline clusters), from local Parquet copies with the original
    columns (``{mirror}/belebele/{lang_Script}.parquet``, ``{mirror}/multiblimp/{iso3}.parquet``). For a
    mirror the stage writes task YAMLs that ``include`` the shipped templates and override only the
    dataset path, files and splits, so prompts and metrics stay the harness's own.
``synthetic_blimp`` / ``synthetic_belebele`` (the embedded default; offline)
    two small tasks **labelled synthetic**, built by the pipeline from each language's test split
    in the formats of the real ones and run through the shipped templates: a MultiBLiMP-format
    minimal pair (a test sentence vs the same sentence with two adjacent words swapped) and a
    Belebele-format multiple choice (the first half of a test document as the passage; which of
    four second halves continues it?). The Belebele-format items come in groups of four documents that
    share their four choices, so a model that ignores the passage scores exactly 1/4, and they are
    scored as a cloze (each choice's log-likelihood after the passage, no shots) rather than through the
    letter prompt ("P: ... A: ... Answer:"), which asks for an ability tiny base models lack; the
    headline metric is ``acc_mutual_info`` (the passage's gain in each choice's log-likelihood). They
    measure a model's grip on each language's word order and local coherence; they are not the
    published benchmarks. Measured on the embedded default: see ``synthetic_belebele``.

Every prompt is fitted to the model's context (``fit_prompts``): the harness would cut a longer one
from the left and score what is left. A task drops shots while fewer than nine in ten of its items
(or fewer than ``min_items``) fit; the items that still do not fit are left out and
counted. Scoring is the harness's
(``lm_eval.simple_evaluate`` with a ``TaskManager``), never re-implemented. Its per-request warnings
are counted and summarised once per kind at the end of the job (``repeated_warnings``). Perplexity is
computed here: every test chunk is preceded by the end-of-text token and all of its tokens are
predicted; ``exp(total NLL / tokens)`` per language.

One job per model (:func:`evaluate_model`): the model, its tokenizer and the harness's model wrapper
are built once and the tasks of all families go through one ``simple_evaluate`` per shot count; each
family's file holds exactly what a job of that family alone wrote. The harness's index of its own
tasks is built only when a task is not local (a real task read from the hub).

Outputs
-------
``results/eval/tasks/``: the local task data (``data/*.parquet``), YAMLs and ``tasks.json``
(task -> family, language, shots).
``results/eval/{model}/{family}.json``: the harness's own results (samples left out) and ``moelang``:
per task ``fit`` (``n_shot`` used, ``n_docs``, ``left_out``, ``max_length``) and ``predictions`` (how
often each choice was the model's answer).
``results/eval/{model}/perplexity.parquet``: lang, n_tokens, nll, perplexity.
``results/eval/results.parquet``: ``model``, ``method``, ``lang``, ``task``, ``n_shot`` int64,
``metric`` (``acc``, ``acc_norm``, ``acc_mutual_info`` for the synthetic Belebele-format task,
``perplexity``), ``value``, ``stderr`` (null for perplexity),
``n_items`` int64 (items scored), ``chance`` (the task's chance level), ``p_chance`` (one-sided binomial
test of the score against chance), ``top_choice_share`` (share of items answered with the most
frequent choice; 1 = constant), ``n_left_out`` int64 (items longer than the model's context); the last
four are null for perplexity. Rows are in model order: the base model, CPT steps ascending, the rest.
``results/eval/summary.md``: per method the mean over high-resource, low-resource and all languages,
the trainable fraction, the languages scored above chance, and the change on the old (high-resource)
languages against the base model; below each table the flags: scores within noise of chance,
constant answers, items left out. With adapted models, an "Adaptation" section: per (target,
method) the gain on the target over the start model and the change on the other high-resource
languages (forgetting), per family's headline metric (:data:`HEADLINE`) and perplexity.
``results/eval/adaptation.parquet``: those numbers (:data:`ADAPTATION_SCHEMA`, docs/outputs.md).
With expanded models (LayerMoE variants), an "Expansion" section: per variant the gain on the new
languages and the change on the old ones (forgetting) against the model it was expanded from, per
family's headline metric and perplexity, with its new experts and trainable fractions from
``results/expand/runs.parquet``; ``results/eval/expansion.parquet``: those numbers
(:data:`EXPANSION_SCHEMA`, docs/outputs.md; empty without expanded models).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from moelang.errors import MoelangError
from moelang.io import atomic_dir, atomic_path, log, progress, write_json
from moelang.registry import trainable_fraction
from moelang.options import EvaluationOptions
from moelang.perplexity import perplexity  # noqa: F401  (part of this stage; the adapt stage uses it too)
from moelang.splits import TEST, split_texts

# ISO 639-1/3 code of a language -> Belebele's FLORES code and MultiBLiMP's ISO 639-3 code.
BELEBELE_CODES = {"en": "eng_Latn", "ar": "arb_Arab", "cs": "ces_Latn", "es": "spa_Latn", "fi": "fin_Latn",
                  "hi": "hin_Deva", "ru": "rus_Cyrl", "ca": "cat_Latn", "et": "est_Latn", "mr": "mar_Deva",
                  "sk": "slk_Latn", "uk": "ukr_Cyrl", "ur": "urd_Arab", "nl": "nld_Latn", "de": "deu_Latn",
                  "fr": "fra_Latn", "el": "ell_Grek", "hu": "hun_Latn", "tr": "tur_Latn", "zh": "zho_Hans",
                  "bn": "ben_Beng", "ne": "npi_Deva"}
MULTIBLIMP_CODES = {"en": "eng", "ar": "arb", "cs": "ces", "es": "spa", "fi": "fin", "hi": "hin", "ru": "rus",
                    "ca": "cat", "et": "est", "mr": "mar", "sk": "slk", "uk": "ukr", "ur": "urd", "nl": "nld",
                    "de": "deu", "fr": "fra", "el": "ell", "hu": "hun", "tr": "tur"}
BLIMP_COLUMNS = ["sen", "wrong_sen", "prefix", "phenomenon", "lang", "grammatical_feature", "ungrammatical_feature"]
BELEBELE_COLUMNS = ["link", "question_number", "flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3",
                    "mc_answer4", "correct_answer_num", "dialect", "ds"]
ADAPTATION_SCHEMA = {"target": pl.String, "method": pl.String, "model": pl.String, "start": pl.String,
                     "trainable_fraction": pl.Float64, "family": pl.String, "metric": pl.String,
                     "start_value": pl.Float64, "value": pl.Float64, "target_gain": pl.Float64,
                     "hr_change": pl.Float64, "n_hr": pl.Int64}
EXPANSION_SCHEMA = {"variant": pl.String, "model": pl.String, "start": pl.String, "new_experts": pl.Int64,
                    "stage1_trainable_fraction": pl.Float64, "stage2_trainable_fraction": pl.Float64,
                    "family": pl.String, "metric": pl.String, "n_new": pl.Int64, "start_new": pl.Float64,
                    "value_new": pl.Float64, "new_gain": pl.Float64, "n_old": pl.Int64, "start_old": pl.Float64,
                    "value_old": pl.Float64, "old_change": pl.Float64}
RESULTS_SCHEMA = {"model": pl.String, "method": pl.String, "lang": pl.String, "task": pl.String, "n_shot": pl.Int64,
                  "metric": pl.String, "value": pl.Float64, "stderr": pl.Float64, "n_items": pl.Int64,
                  "chance": pl.Float64, "p_chance": pl.Float64, "top_choice_share": pl.Float64, "n_left_out": pl.Int64}
# A task drops few-shot examples until this share of its prompts fits the model's context.
FIT_SHARE = 0.9
# A score is "within noise of chance" when a one-sided binomial test cannot tell it from the chance level.
CHANCE_ALPHA = 0.05


def shipped_template(family: str) -> Path:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    path = root / ("belebele/_default_template_yaml" if family == "belebele" else "multiblimp/_template_yaml")
    if not path.is_file():
        raise MoelangError(f"evaluation: lm-eval's {family} template is missing at {path}; reinstall lm-eval")
    return path


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.blake2b("\x00".join(map(str, parts)).encode(),
                                                                 digest_size=8).digest(), "big"))


# --------------------------------------------------------------------------------------------------
# Synthetic local tasks from the test split
# --------------------------------------------------------------------------------------------------

def synthetic_blimp(lang: str, docs: list[tuple[str, str]], max_items: int, max_words: int = 40) -> pl.DataFrame:
    """Minimal pairs: a test-split sentence and the same sentence with two adjacent (different) words swapped."""
    rows = []
    for doc_id, text in docs:
        words = text.split()
        positions = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        if not 3 <= len(words) <= max_words or not positions:
            continue
        i = positions[int(_rng("blimp", doc_id).integers(len(positions)))]
        wrong = words[:i] + [words[i + 1], words[i]] + words[i + 2:]
        rows.append({"sen": " ".join(words), "wrong_sen": " ".join(wrong), "prefix": "", "phenomenon": "synthetic_word_swap",
                     "lang": lang, "grammatical_feature": "original order", "ungrammatical_feature": "adjacent words swapped"})
        if len(rows) >= max_items:
            break
    return pl.DataFrame(rows, schema={c: pl.String for c in BLIMP_COLUMNS})


def synthetic_belebele(lang: str, docs: list[tuple[str, str]], max_items: int, max_words: int = 40,
                       min_words: int = 6) -> pl.DataFrame:
    """Multiple choice: which of four texts continues the passage (the first half of a test-split document)?

    Items come in groups of four documents. Each document's first half is the passage of one item and
    the four items of a group share the same four choices (the group's second halves, in one shuffled
    order), so each answer position occurs once per group. A model that ignores the passage (or that
    always picks one position) prefers the same choice in all four items and scores exactly 1/4: what
    lifts a score above 1/4 is the passage. Scored by ``acc_mutual_info`` (``CLOZE_OVERRIDES``).

    Measured on the embedded default (CPT checkpoints of ``config/config.yaml``, 11 languages with
    enough items, 56-100 items each, CPU):

    ========== ============================== ===================================================
    checkpoint before: letter prompt, 4 shots  after: grouped cloze, acc_mutual_info
               (mean acc_norm; constant langs) (mean HR / LR / all; languages above chance, p<.05)
    ========== ============================== ===================================================
    step 0     0.205; 10 of 11                 0.303 / 0.296 / 0.300; 1 of 11 (en 0.55)
    step 200   0.257; 11 of 11                 0.333 / 0.272 / 0.311; 3 of 11
    step 400   0.282; 3 of 11                  0.370 / 0.287 / 0.340; 6 of 11
    step 600   0.276; 1 of 11                  0.381 / 0.290 / 0.348; 7 of 11
    step 800   0.210; 6 of 11                  0.390 / 0.284 / 0.351; 8 of 11 (es 0.43, ru 0.39)
    ========== ============================== ===================================================

    Before, every 4-shot prompt overflowed the 512 positions (859 "Truncating" warnings per model)
    and most languages got one letter for every item: answer-letter bias, not reading. After, no
    prompt is cut; the trained languages rise with CPT and the untrained targets et, sk, uk stay
    within noise of 1/4. The same items scored by ``acc_norm`` stay at 0.27-0.29 for every
    checkpoint: the shared choices' own likelihoods decide.
    """
    halves, seen = [], set()
    for doc_id, text in docs:
        words = text.split()
        if min_words <= len(words) <= max_words:
            cut = len(words) // 2
            passage, continuation = " ".join(words[:cut]), " ".join(words[cut:])
            if passage in seen or continuation in seen:
                continue  # a repeated half would make an item with two right answers
            seen.update((passage, continuation))
            halves.append((doc_id, passage, continuation))
    rows = []
    for start in range(0, min(len(halves), max_items) // 4 * 4, 4):
        group = halves[start:start + 4]
        order = [int(i) for i in _rng("belebele", *(h[0] for h in group)).permutation(4)]
        choices = [group[i][2] for i in order]
        for k, (doc_id, passage, _) in enumerate(group):
            rows.append({"link": f"moelang-synthetic:{doc_id}", "question_number": str(start + k),
                         "flores_passage": passage, "question": "Which text continues the passage?",
                         "mc_answer1": choices[0], "mc_answer2": choices[1], "mc_answer3": choices[2],
                         "mc_answer4": choices[3], "correct_answer_num": str(order.index(k) + 1),
                         "dialect": lang, "ds": "moelang-synthetic"})
    return pl.DataFrame(rows, schema={c: pl.String for c in BELEBELE_COLUMNS})


# The synthetic Belebele task is scored as a cloze: the passage, then each choice's log-likelihood as its
# continuation (the data keep Belebele's columns). A letter prompt ("P: ... A: ... Answer:") asks for an
# ability that tiny base models do not have. Its headline metric is acc_mutual_info, the harness's
# log P(choice | passage) - log P(choice): a continuation's own likelihood (its length, its words) would
# otherwise decide between the four shared choices, whatever the passage.
CLOZE_OVERRIDES = {"doc_to_text": "{{flores_passage}}",
                   "doc_to_choice": "{{[mc_answer1, mc_answer2, mc_answer3, mc_answer4]}}",
                   "target_delimiter": " ", "doc_to_decontamination_query": "{{flores_passage}}",
                   "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in ("acc", "acc_norm", "acc_mutual_info")]}
# Chance level of each family: one over the number of choices.
CHANCE = {"synthetic_blimp": 0.5, "multiblimp": 0.5, "synthetic_belebele": 0.25, "belebele": 0.25}
# The headline metric of each family: the papers' acc_norm; acc_mutual_info for the cloze-scored
# synthetic Belebele-format task (its shared choices make acc_norm rank the choices themselves).
HEADLINE = {"synthetic_blimp": "acc_norm", "multiblimp": "acc_norm", "synthetic_belebele": "acc_mutual_info",
            "belebele": "acc_norm"}


def _task_yaml(family: str, task: str, data_file: Path, split: str, tag: str, overrides: dict | None = None) -> str:
    """A task YAML that includes the shipped template. Written by a YAML library: paths may hold
    characters that YAML reads as syntax (``#``, ``:``, quotes)."""
    import yaml

    spec = {"include": str(shipped_template(family)), "task": task, "tag": tag, "dataset_path": "parquet",
            "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data_file.resolve())}},
            "test_split": split}
    if family == "belebele":
        spec["fewshot_split"] = split
    spec.update(overrides or {})
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def build_tasks(corpus_files: dict[str, str | Path], options: EvaluationOptions | dict, out_dir: str | Path) -> dict:
    """Write the local task data and YAMLs; returns tasks.json's content (task -> its description)."""
    options = EvaluationOptions.coerce(options)
    out_dir = Path(out_dir)
    tasks: dict[str, dict] = {}
    families = options.tasks
    # The cloze-scored synthetic Belebele task runs without shots: examples of other passages add length,
    # not information, for a base model.
    shots = {"synthetic_blimp": 0, "multiblimp": 0, "synthetic_belebele": 0, "belebele": options.belebele_shots}
    with atomic_dir(out_dir) as tmp:
        (tmp / "data").mkdir(parents=True)
        (tmp / "yaml").mkdir()
        for lang, path in corpus_files.items():
            docs = []
            if any(f.startswith("synthetic") for f in families):
                docs = split_texts(path, TEST)
            for family in families:
                if family in ("synthetic_blimp", "synthetic_belebele"):
                    table = (synthetic_blimp if family == "synthetic_blimp" else synthetic_belebele)(
                        lang, docs, options.max_items, options.max_words)
                    if table.height < options.min_items:
                        log.warning("evaluation: %s for '%s' has %d items (< %d); left out", family, lang, table.height,
                                    options.min_items)
                        continue
                    name = f"moelang_{family}_{lang}"
                    data = tmp / "data" / f"{name}.parquet"
                    table.write_parquet(data)
                    template = "multiblimp" if family == "synthetic_blimp" else "belebele"
                    split = "train" if template == "multiblimp" else "test"
                    overrides = CLOZE_OVERRIDES if family == "synthetic_belebele" else None
                    (tmp / "yaml" / f"{name}.yaml").write_text(
                        _task_yaml(template, name, out_dir / "data" / data.name, split, f"moelang_{family}", overrides),
                        encoding="utf-8")
                    tasks[name] = {"family": family, "lang": lang, "n_shot": shots[family], "n_items": table.height,
                                   "synthetic": True}
                else:
                    name, entry = _real_task(family, lang, options, tmp, out_dir)
                    if name:
                        tasks[name] = {"family": family, "lang": lang, "n_shot": shots[family], "synthetic": False, **entry}
        write_json(tasks, tmp / "tasks.json")
    log.info("evaluation: %d tasks (%s)", len(tasks), ", ".join(sorted({t["family"] for t in tasks.values()})))
    return tasks


def _real_task(family: str, lang: str, options: EvaluationOptions, tmp: Path, out_dir: Path) -> tuple[str | None, dict]:
    codes = BELEBELE_CODES if family == "belebele" else MULTIBLIMP_CODES
    code = options.codes.get(family, {}).get(lang) or codes.get(lang)
    if code is None:
        log.warning("evaluation: no %s code known for '%s'; set evaluation.codes.%s.%s", family, lang, family, lang)
        return None, {}
    name = f"{family}_{code}"
    mirror = options.mirror
    if not mirror:
        return name, {}  # the shipped task, data from the hub
    data = Path(mirror) / family / f"{code}.parquet"
    if not data.is_file():
        raise MoelangError(f"evaluation: no local mirror of {'facebook/belebele' if family == 'belebele' else 'jumelet/multiblimp'} "
                           f"for '{lang}' at {data}; copy the dataset's '{code}' split there as Parquet with the original "
                           f"columns, or unset evaluation.mirror to read it from the hub")
    local = f"moelang_{name}"
    split = "test" if family == "belebele" else "train"
    (tmp / "yaml" / f"{local}.yaml").write_text(_task_yaml(family, local, data, split, f"moelang_{family}"),
                                              encoding="utf-8")
    return local, {"mirror": str(data)}


# --------------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------------

class RepeatedWarnings(logging.Filter):
    """Lets the first record of each kind through and counts the rest; ``summary_lines`` names each
    repeated kind once. A kind is the logger, the level and the message with its numbers blanked:
    lm-eval and transformers log per request ("Truncating 37 tokens from the left."), thousands of
    lines for one cause."""

    def __init__(self):
        super().__init__()
        self.counts: dict[tuple[str, str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # numbers and identifiers (task names such as moelang_synthetic_blimp_ar) blanked
        message = re.sub(r"\w*_\w*", "X", record.getMessage())
        kind = (record.name, record.levelname, re.sub(r"\d+(\.\d+)?", "N", message))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return self.counts[kind] == 1

    def summary_lines(self) -> list[str]:
        return [f"{name}: {level.lower()} repeated {n - 1} more times after the first: {message}"
                for (name, level, message), n in sorted(self.counts.items(), key=lambda kv: -kv[1]) if n > 1]


@contextlib.contextmanager
def repeated_warnings(prefixes: tuple[str, ...] = ("lm_eval", "transformers")):
    """Counts repeated warnings of the loggers under ``prefixes`` and logs one line per repeated kind
    at the end. A logger's filters see only the records created by that logger, so the filter goes on
    every such logger that exists on entry (importing lm-eval creates them all)."""
    counter = RepeatedWarnings()
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in prefixes]
    loggers = [logging.getLogger(n) for n in sorted(set(names) | set(prefixes))]
    # lm-eval's INFO lines are per task and per request batch ("Building contexts for ...", "Task: ...");
    # they stay available with moelang -v
    quiet = [lg for lg in loggers if lg.name.split(".")[0] == "lm_eval" and not log.isEnabledFor(logging.DEBUG)]
    levels = {lg.name: lg.level for lg in quiet}
    for logger in loggers:
        logger.addFilter(counter)
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield counter
    finally:
        for logger in loggers:
            logger.removeFilter(counter)
        for logger in quiet:
            logger.setLevel(levels[logger.name])
        for line in counter.summary_lines():
            log.warning("evaluation: %s", line)


@contextlib.contextmanager
def templates_compiled_once():
    """lm-eval compiles a task's Jinja template again for every document and field it renders
    (``lm_eval.utils.apply_template``: about a quarter of an evaluation job on the embedded default).
    Within the block each distinct template is compiled once, by the harness's own environment, and
    rendered as before."""
    import functools

    from lm_eval import utils

    if not hasattr(utils, "env"):  # another lm-eval layout: leave it as it is
        yield
        return
    original = utils.apply_template
    compile_once = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_once(template).render(**doc)

    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = original


# The harness modules that draw tqdm bars over requests and documents.
HARNESS_BAR_MODULES = ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task")


@contextlib.contextmanager
def harness_progress():
    """The harness's bars as the stages' own (:func:`moelang.io.progress`): a bar on a terminal, log
    lines every few percent in a log file. The harness passes ``disable=False`` to its bars itself,
    which overrides ``TQDM_DISABLE``, so in a log file each redraw was a line of carriage returns."""
    import importlib

    modules = [importlib.import_module(name) for name in HARNESS_BAR_MODULES]
    saved = [module.tqdm for module in modules]

    def bar(iterable=None, *args, **kwargs):
        return progress(iterable, **kwargs)

    for module in modules:
        module.tqdm = bar
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.tqdm = original


def _request_lengths(lm, task) -> dict[int, int]:
    """doc id -> tokens of its longest request (context + continuation), encoded as the harness
    encodes them (an empty context is the prefix token)."""
    lengths: dict[int, int] = {}
    for instance in task.instances:
        context, continuation = instance.args[:2]
        if context == "":
            n = len(lm.tok_encode(continuation, add_special_tokens=False)) + 1
        else:
            n = sum(map(len, lm._encode_pair(context, continuation)))
        lengths[instance.doc_id] = max(lengths.get(instance.doc_id, 0), n)
    return lengths


def fit_prompts(lm, manager, task_names: list[str], n_shot: int | dict[str, int],
                options: EvaluationOptions | dict) -> dict[str, dict]:
    """Which items fit the model's context, per task: ``{"n_shot", "n_docs", "indices", "left_out"}``.
    ``n_shot``: the shots asked for, one number for every task or task -> its own.

    The harness cuts a prompt longer than the model's positions from the left (the few-shot examples go first,
    then the passage) and scores what remains. Here each task's prompts are built by the harness itself
    and counted with the model's tokenizer. While fewer than ``FIT_SHARE`` of the items (or fewer than
    ``min_items``) fit, the task drops a shot: more items, comparable across models, before more shots.
    The items that still do not fit are left out and counted.
    """
    options = EvaluationOptions.coerce(options)
    seed = options.seed
    limit = options.limit
    # The harness truncates when context + continuation exceed max_length + 1 (the last token is not fed).
    budget = lm.max_length + 1
    asked = n_shot if isinstance(n_shot, dict) else dict.fromkeys(task_names, n_shot)
    fitted = {}
    for name in task_names:
        for shots in range(asked[name], -1, -1):
            task = manager.load([name])["tasks"][name]
            if task.get_config("num_fewshot") != 0:  # as the harness: a task's own 0 shots are kept
                task.set_config(key="num_fewshot", value=shots)
            task.set_fewshot_seed(seed=seed)
            task.build_all_requests(limit=limit, rank=0, world_size=1)
            lengths = _request_lengths(lm, task)
            indices = sorted(i for i, n in lengths.items() if n <= budget)
            needed = min(max(options.min_items, math.ceil(FIT_SHARE * len(lengths))), len(lengths))
            if len(indices) >= needed or shots == 0 or task.get_config("num_fewshot") == 0:
                break
        fitted[name] = {"n_shot": int(task.get_config("num_fewshot") or 0), "n_docs": len(lengths),
                        "indices": indices, "left_out": len(lengths) - len(indices), "max_length": lm.max_length}
        if fitted[name]["left_out"] or fitted[name]["n_shot"] < asked[name]:
            log.warning("evaluation: %s: %d of %d items fit %d positions with %d shots (asked for %d); %d left out",
                        name, len(indices), len(lengths), lm.max_length, fitted[name]["n_shot"], asked[name],
                        fitted[name]["left_out"])
    return fitted


def _prediction_counts(samples: list[dict], delimiter: str) -> dict[str, list[int]]:
    """Per metric, how often each choice was the model's answer, with the harness's rules: the argmax
    of the log-likelihoods (``acc``), of them per character of the choice (``acc_norm``), of them
    minus the choice's log-likelihood without context (``acc_mutual_info``: the second half of the
    requests)."""
    counts: dict[str, list[int]] = {}
    for sample in samples:
        lls = np.array([r[0] for r in sample["filtered_resps"]], dtype=float)
        mutual = "acc_mutual_info" in sample.get("metrics", [])
        n = len(lls) // 2 if mutual else len(lls)
        chars = np.array([max(1, len(args[1]) - len(delimiter)) for args in sample["arguments"][:n]], dtype=float)
        picks = {"acc": np.argmax(lls[:n]), "acc_norm": np.argmax(lls[:n] / chars)}
        if mutual:
            picks["acc_mutual_info"] = np.argmax(lls[:n] - lls[n:])
        for metric, pick in picks.items():
            counts.setdefault(metric, [0] * n)[int(pick)] += 1
    return counts


def run_harness(model, tokenizer, task_names: list[str], task_dir: str | Path, n_shot: int | dict[str, int],
                options: EvaluationOptions | dict, log_samples: bool = False) -> dict:
    """The harness on the items that fit the model's context, for tasks of any families at once
    (``n_shot``: one number, or task -> its shots). Returns simple_evaluate's dict (merged over the
    shot counts used: one call per count) with ``moelang``: per task its ``fit`` (shots, items left
    out) and ``predictions`` (how often each choice was picked)."""
    options = EvaluationOptions.coerce(options)
    import lm_eval
    import lm_eval.evaluator  # imported lazily by lm_eval: its logger must exist before the filter goes on
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    seed = options.seed
    yaml_dir = Path(task_dir) / "yaml"
    # Indexing the harness's own task YAMLs (about 14,000 files) took 6-15 s of every job. Our local
    # tasks include their shipped template by path, so the index is built only for a task that is
    # the harness's own by name (a real task read from the hub).
    shipped = [n for n in task_names if not (yaml_dir / f"{n}.yaml").is_file()]
    with repeated_warnings(), templates_compiled_once(), harness_progress():
        manager = TaskManager(include_path=str(yaml_dir), include_defaults=bool(shipped))
        # every model here is a causal LM; said explicitly because lm-eval guesses the backend from a
        # static list of model types, which the expanded (layermoe_*) types are not on
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size,
                  max_length=options.max_length, backend="causal")
        fitted = fit_prompts(lm, manager, task_names, n_shot, options)
        merged: dict = {"moelang": {"fit": fitted, "predictions": {}}}
        for shots in sorted({f["n_shot"] for f in fitted.values()}, reverse=True):
            names = [n for n in task_names if fitted[n]["n_shot"] == shots and fitted[n]["indices"]]
            if not names:
                continue
            result = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, num_fewshot=shots,
                samples={n: fitted[n]["indices"] for n in names}, log_samples=True, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                bootstrap_iters=options.bootstrap_iters)
            for key, value in result.items():
                if isinstance(value, dict):
                    merged.setdefault(key, {}).update(value)
            for name, samples in result.get("samples", {}).items():
                delimiter = result.get("configs", {}).get(name, {}).get("target_delimiter", " ")
                merged["moelang"]["predictions"][name] = _prediction_counts(samples, delimiter)
    for name in task_names:
        merged["moelang"]["fit"][name].pop("indices")
    if not log_samples:
        merged.pop("samples", None)
    return merged


# The harness's output keys kept in ``{family}.json``; each is a dict keyed by task.
HARNESS_KEYS = ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better")


def family_output(result: dict, names: list[str]) -> dict:
    """The part of :func:`run_harness`'s result that concerns tasks ``names`` (one family's): what
    that family's job wrote when each family was a job of its own."""
    part = {key: {n: v for n, v in result[key].items() if n in names} for key in HARNESS_KEYS if key in result}
    own = result.get("moelang", {})
    part["moelang"] = {key: {n: v for n, v in own.get(key, {}).items() if n in names} for key in ("fit", "predictions")}
    return json.loads(json.dumps(part, default=str))


def write_perplexity(model, tokenizer, token_files: dict[str, str | Path], options: EvaluationOptions,
                     out_path: str | Path) -> None:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows = [{"lang": lang, **perplexity(model, path, eos, options, TEST)} for lang, path in token_files.items()]
    with atomic_path(out_path) as tmp:
        pl.DataFrame(rows, schema={"lang": pl.String, "n_tokens": pl.Int64, "nll": pl.Float64,
                                   "perplexity": pl.Float64}).write_parquet(tmp)


def evaluate_model(model_ref: str, families: list[str], tasks: dict, task_dir: str | Path | None,
                   token_files: dict[str, str | Path], options: EvaluationOptions | dict, out_dir: str | Path) -> None:
    """One model's evaluation job: ``{out_dir}/{family}.json`` for each task family in ``families``
    and, when it lists ``perplexity``, ``{out_dir}/perplexity.parquet``.

    The model, its tokenizer and the harness's model wrapper are built once, and the tasks of all
    families go through the harness together (one ``simple_evaluate`` per shot count): each family's
    file holds what a job of that family alone writes (bit for bit on the embedded default).

    Measured on a model of the embedded default's architecture (22 synthetic tasks and perplexity on
    11 languages, 2 threads, a quiet 2-core CPU machine): 62-68 s in three jobs (synthetic_blimp 18 s,
    synthetic_belebele 26-30 s, perplexity 18-20 s), 35 s in one (harness 15 s, perplexity 15 s).
    Each task job of the three started for about 11 s: imports 3 s, model 2 s, the harness's own
    task index 6 s."""
    options = EvaluationOptions.coerce(options)
    not_run = Path(model_ref) / "not_run.json"  # moelang.adapt.NOT_RUN_FILE: a method that was not trained
    if not_run.is_file():
        reason = json.loads(not_run.read_text(encoding="utf-8")).get("reason", "")
        raise MoelangError(f"evaluate: '{model_ref}' holds no model: its method was not trained ({reason}); the "
                           f"workflow does not evaluate it, leave it out of the models to evaluate")
    task_families = [f for f in families if f != "perplexity"]
    unknown = [f for f in task_families if f not in CHANCE]
    if unknown:
        raise MoelangError(f"evaluate: unknown task family '{unknown[0]}'; use {', '.join(CHANCE)} or perplexity")
    if task_families and task_dir is None:
        raise MoelangError("evaluate: task families need --tasks results/eval/tasks (made by moelang eval-tasks)")
    if "perplexity" in families and not token_files:
        raise MoelangError("evaluate: perplexity needs --tokens results/tokens/<lang>.parquet of the kept languages")
    if Path(out_dir).suffix in (".json", ".parquet"):
        raise MoelangError(f"evaluate: --out {out_dir} looks like a file; give the model's directory (results/eval/"
                           f"<model>), which receives <family>.json and perplexity.parquet")
    from transformers import AutoTokenizer

    from moelang.models import load_for_inference

    out_dir = Path(out_dir)
    started = time.perf_counter()
    model = load_for_inference(model_ref, options)
    tokenizer = AutoTokenizer.from_pretrained(str(model_ref), revision=options.revision,
                                              trust_remote_code=options.trust_remote_code)
    log.info("evaluation: %s loaded in %.1f s", model_ref, time.perf_counter() - started)
    names = {family: sorted(n for n, t in tasks.items() if t["family"] == family) for family in task_families}
    run = [n for family in task_families for n in names[family]]
    if run:
        began = time.perf_counter()
        result = run_harness(model, tokenizer, run, task_dir, {n: tasks[n]["n_shot"] for n in run}, options)
        log.info("evaluation: %d tasks of %s in %.1f s", len(run), ", ".join(f for f in task_families if names[f]),
                 time.perf_counter() - began)
    for family in task_families:
        if names[family]:
            write_json(family_output(result, names[family]), out_dir / f"{family}.json")
        else:
            write_json({"results": {}, "note": f"no {family} task for these languages"}, out_dir / f"{family}.json")
    if "perplexity" in families:
        began = time.perf_counter()
        write_perplexity(model, tokenizer, token_files, options, out_dir / "perplexity.parquet")
        log.info("evaluation: perplexity of %d languages in %.1f s", len(token_files), time.perf_counter() - began)
    log.info("evaluation: %s done in %.1f s", model_ref, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# The results table and summary
# --------------------------------------------------------------------------------------------------

def p_above_chance(value: float, n_items: int | None, chance: float) -> float | None:
    """One-sided binomial test: the probability that guessing at ``chance`` scores ``value`` or more
    on ``n_items`` items."""
    from scipy.stats import binomtest

    if not n_items:
        return None
    return float(binomtest(round(value * n_items), n_items, chance, alternative="greater").pvalue)


def collect(eval_dir: str | Path, models: dict[str, dict], tasks: dict, families: list[str]) -> pl.DataFrame:
    eval_dir = Path(eval_dir)
    rows = []
    for name in list(models):
        entry = models[name]
        for family in families:
            data = json.loads((eval_dir / name / f"{family}.json").read_text())
            own = data.get("moelang", {})
            for task, metrics in data.get("results", {}).items():
                if task not in tasks:
                    continue
                n_items = (data.get("n-samples", {}).get(task) or {}).get("effective")
                n_shot = (own.get("fit", {}).get(task) or {}).get("n_shot", tasks[task]["n_shot"])
                left_out = (own.get("fit", {}).get(task) or {}).get("left_out")
                picks = own.get("predictions", {}).get(task, {})
                chance = CHANCE.get(tasks[task]["family"])
                for metric in ("acc", "acc_norm", "acc_mutual_info"):
                    if f"{metric},none" in metrics:
                        stderr = metrics.get(f"{metric}_stderr,none")
                        value = float(metrics[f"{metric},none"])
                        p_value = p_above_chance(value, n_items, chance) if chance is not None else None
                        top_share = max(picks[metric]) / sum(picks[metric]) if picks.get(metric) else None
                        rows.append((name, entry["method"], tasks[task]["lang"], task, n_shot, metric, value,
                                     float(stderr) if isinstance(stderr, (int, float)) else None, n_items,
                                     chance, p_value, top_share, left_out))
        ppl = eval_dir / name / "perplexity.parquet"
        if ppl.is_file():
            for row in pl.read_parquet(ppl).iter_rows(named=True):
                rows.append((name, entry["method"], row["lang"], "perplexity", 0, "perplexity", row["perplexity"], None,
                             row["n_tokens"], None, None, None, None))
    table = pl.DataFrame(rows, schema=RESULTS_SCHEMA, orient="row")
    # Rows in model order (base, CPT steps ascending, others), then by task, language and metric.
    rank = {name: i for i, name in enumerate(list(models))}
    return (table.with_columns(pl.col("model").replace_strict(rank, return_dtype=pl.Int64).alias("_rank"))
            .sort("_rank", "task", "lang", "metric", maintain_order=True).drop("_rank"))


def _aggregate(values: pl.Series, metric: str) -> float | None:
    """Mean of accuracies; geometric mean of perplexities (they span orders of magnitude)."""
    if values.len() == 0:
        return None
    if metric == "perplexity":
        return float(np.exp(np.log(values.to_numpy()).mean()))
    return float(values.mean())


def _flags(rows: pl.DataFrame) -> list[str]:
    """Why one model's scores on one task family should not be read as they stand."""
    flags = []
    noise = rows.filter(pl.col("p_chance") >= CHANCE_ALPHA).sort("lang")
    if noise.height:
        flags.append(f"within noise of chance ({noise.height} of {rows.height}: {', '.join(noise['lang'])})")
    constant = rows.filter(pl.col("top_choice_share") >= 1.0).sort("lang")
    if constant.height:
        flags.append(f"the same choice for every item ({', '.join(constant['lang'])})")
    left = rows.filter(pl.col("n_left_out") > 0).sort("lang")
    if left.height:
        flags.append("items left out, longer than the model's context: "
                     + ", ".join(f"{r['lang']} {r['n_left_out']}" for r in left.iter_rows(named=True)))
    return flags


def summary_markdown(table: pl.DataFrame, models: dict[str, dict], high_resource: list[str], targets: list[str],
                     base_model: str | None, adaptation: pl.DataFrame | None = None) -> str:
    lines = ["# Evaluation summary", "",
             "Tasks named `moelang_synthetic_*` are synthetic, built from the test split of the corpus (see "
             "`src/moelang/evaluate.py`); they are not the published benchmarks. Accuracy columns are means over "
             "languages, perplexity columns geometric means. The last column compares each model with the base "
             "model on the old (high-resource) languages: a difference of accuracy, a ratio of perplexity. "
             f"'Above chance' counts the languages whose score a one-sided binomial test (p < {CHANCE_ALPHA}) "
             "separates from the task's chance level; the flags under each table name the rest, tasks answered "
             "with one choice throughout, and items left out because their prompt was longer than the model's "
             "context. For `moelang_synthetic_belebele` read `acc_mutual_info` (the passage's gain in each "
             "choice's log-likelihood): its four items per group share their choices, so `acc_norm` mostly ranks "
             "the choices themselves.", ""]
    keyed = table.with_columns(
        pl.when(pl.col("lang").is_in(high_resource)).then(pl.lit("high-resource"))
        .when(pl.col("lang").is_in(targets)).then(pl.lit("low-resource")).otherwise(pl.lit("other")).alias("group"),
        pl.col("task").str.replace(r"_[a-z]{2,3}$", "").alias("family"))
    fmt = (lambda v: f"{v:.3f}" if v is not None and not np.isnan(v) else "-")
    for (family, metric), part in keyed.sort("family", "metric").group_by(["family", "metric"], maintain_order=True):
        if metric == "acc":
            continue  # acc_norm is the papers' headline metric; both are in results.parquet
        accuracy = metric != "perplexity"
        lines += [f"## {family} ({metric})", "", "| model | method | trainable fraction | high-resource | low-resource "
                  "| all | " + ("above chance | " if accuracy else "") + "change on old languages |",
                  "|---|---|---:|---:|---:|---:|" + ("---:|" if accuracy else "") + "---:|"]
        base = part.filter((pl.col("model") == base_model) & pl.col("lang").is_in(high_resource)) if base_model else None
        flagged = []
        for name in list(models):
            entry = models[name]
            rows = part.filter(pl.col("model") == name)
            if rows.height == 0:
                continue
            means = {g: _aggregate(rows.filter(pl.col("group") == g)["value"], metric)
                     for g in ("high-resource", "low-resource")}
            change = ""
            if base is not None and base.height and name != base_model:
                old = rows.filter(pl.col("lang").is_in(high_resource)).join(base.select("lang", "value"), on="lang",
                                                                           suffix="_base")
                if old.height and metric == "perplexity":
                    change = f"x{_aggregate(old['value'] / old['value_base'], metric):.3g}"
                elif old.height:
                    change = f"{(old['value'] - old['value_base']).mean():+.3f}"
            fraction = entry.get("trainable_fraction")
            above = ""
            if accuracy:
                above = f"{rows.filter(pl.col('p_chance') < CHANCE_ALPHA).height}/{rows.height} | "
                flagged += [f"- {name}: {flag}" for flag in _flags(rows)]
            lines.append(f"| {name} | {entry['method']} | {fmt(fraction) if fraction is not None else '-'} | "
                         f"{fmt(means['high-resource'])} | {fmt(means['low-resource'])} | "
                         f"{fmt(_aggregate(rows['value'], metric))} | {above}{change} |")
        lines.append("")
        if flagged:
            chance = part["chance"].drop_nulls()
            lines += [f"Flags (chance level {chance[0]:g}):" if chance.len() else "Flags:", "", *flagged, ""]
    if adaptation is not None:
        lines += adaptation_markdown(adaptation, list(models))
    return "\n".join(lines)


def _change(values: list[float], starts: list[float], metric: str) -> float | None:
    """Mean difference of accuracies; geometric mean of the ratios of perplexities."""
    if not values:
        return None
    if metric == "perplexity":
        return float(np.exp(np.mean(np.log(np.array(values) / np.array(starts)))))
    return float(np.mean(np.array(values) - np.array(starts)))


def adaptation_table(table: pl.DataFrame, models: dict[str, dict], tasks: dict, high_resource: list[str],
                     targets: list[str]) -> pl.DataFrame:
    """One row per adapted model (an entry with a ``target``) and task family (its headline metric,
    :data:`HEADLINE`) or perplexity: the model and its ``start`` model on the target language, the
    gain (a difference of accuracy, a ratio of perplexity) and the mean change on the high-resource
    languages other than the target (forgetting). Rows by target (in ``targets``' order), then in the
    order of ``models``. A start model that was not evaluated leaves the comparisons null."""
    scores = _headline_scores(table, tasks)
    present = sorted({(f, m) for _, f, m in scores if f != "perplexity"}) + \
        sorted({(f, m) for _, f, m in scores if f == "perplexity"})
    rank = {lang: i for i, lang in enumerate(targets)}
    adapted = sorted((name for name, entry in models.items() if entry.get("target")),
                     key=lambda name: (rank.get(models[name]["target"], len(rank)), models[name]["target"]))
    rows = []
    for name in adapted:
        entry = models[name]
        target, start = entry["target"], entry.get("start")
        for family, metric in present:
            mine = scores.get((name, family, metric), {})
            theirs = scores.get((start, family, metric), {})
            value, start_value = mine.get(target), theirs.get(target)
            old = [lang for lang in high_resource if lang != target and lang in mine and lang in theirs]
            gain = _change([value], [start_value], metric) if value is not None and start_value is not None else None
            rows.append((target, entry["method"], name, start, entry.get("trainable_fraction"), family, metric,
                         start_value, value, gain, _change([mine[l] for l in old], [theirs[l] for l in old], metric),
                         len(old)))
    return pl.DataFrame(rows, schema=ADAPTATION_SCHEMA, orient="row")


def adaptation_markdown(adaptation: pl.DataFrame, evaluated: list[str]) -> list[str]:
    """The summary's "Adaptation" section: one row per (target, method)."""
    if adaptation.height == 0:
        return []
    columns = adaptation.select("family", "metric").unique(maintain_order=True).rows()
    lines = ["## Adaptation", "",
             "Each adapted model against the model its adaptation started from: the gain on its target language "
             "and the mean change on the high-resource languages other than the target (forgetting), per task "
             "family's headline metric (a difference of accuracy: negative on the high-resource languages is "
             "forgetting) and for perplexity (a ratio: below 1 is better, above 1 on the high-resource languages "
             "is forgetting). The numbers are in `adaptation.parquet`.", "",
             "| target | method | model | start | trainable fraction | "
             + " | ".join(f"{'perplexity ratio on the target' if f == 'perplexity' else f'{f} gain ({m})'}"
                          for f, m in columns)
             + " | " + " | ".join(f"{'perplexity ratio' if f == 'perplexity' else f'{f} change'} on high-resource"
                                  for f, m in columns) + " |",
             "|---|---|---|---|---:|" + "---:|" * (2 * len(columns))]

    for (target, model), part in adaptation.group_by(["target", "model"], maintain_order=True):
        by = {(r["family"], r["metric"]): r for r in part.iter_rows(named=True)}
        first = part.row(0, named=True)
        fraction = first["trainable_fraction"]
        lines.append(f"| {target} | {first['method']} | {model} | {first['start'] or '-'} | "
                     f"{f'{fraction:.3g}' if fraction is not None else '-'} | "
                     + " | ".join(_comparison_cell(by[c]["target_gain"] if c in by else None, c[1]) for c in columns) + " | "
                     + " | ".join(_comparison_cell(by[c]["hr_change"] if c in by else None, c[1]) for c in columns) + " |")
    return lines + _unevaluated_starts(adaptation, evaluated)


def _comparison_cell(value, metric: str) -> str:
    """A summary cell of a comparison against a start model: a perplexity ratio or a score difference."""
    if value is None or np.isnan(value):
        return "-"
    return f"x{value:.3g}" if metric == "perplexity" else f"{value:+.3f}"


def _unevaluated_starts(table: pl.DataFrame, evaluated) -> list[str]:
    """The closing lines of a comparison section: the start models that were not evaluated, if any."""
    missing = sorted({s or "(none)" for s in table["start"].to_list() if s not in evaluated})
    return [""] + ([f"No comparison where the start model was not evaluated: {', '.join(missing)}.", ""]
                   if missing else [])


def _headline_scores(table: pl.DataFrame, tasks: dict) -> dict[tuple[str, str, str], dict[str, float]]:
    """(model, family, metric) -> language -> value, for each family's headline metric and perplexity."""
    family_of = {task: entry["family"] for task, entry in tasks.items()}
    scores: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in table.iter_rows(named=True):
        family = "perplexity" if row["metric"] == "perplexity" else family_of.get(row["task"])
        if family == "perplexity" or HEADLINE.get(family) == row["metric"]:
            scores.setdefault((row["model"], family, row["metric"]), {})[row["lang"]] = row["value"]
    return scores


def read_expand_runs(path: str | Path | None) -> dict[str, dict]:
    """Variant -> its row of ``results/expand/runs.parquet`` (none without the file)."""
    if path is None or not Path(path).is_file():
        return {}
    return {row["variant"]: row for row in pl.read_parquet(path).iter_rows(named=True)}


def expansion_table(table: pl.DataFrame, models: dict[str, dict], tasks: dict, old: list[str], new: list[str],
                    runs: dict[str, dict] | None = None) -> pl.DataFrame:
    """One row per expanded model (an entry with a ``variant``) and task family (its headline metric,
    :data:`HEADLINE`) or perplexity, against the model it was expanded from (``start``): on the new
    languages the gain (``new_gain``: mean difference of accuracy, geometric mean of the perplexity
    ratios) and on the old languages the change (``old_change``, the same measures: forgetting when
    accuracy falls or perplexity rises); ``start_*`` / ``value_*`` are the two models' means over the
    languages both were scored on (``n_new``, ``n_old``; geometric means for perplexity). New experts
    and the stages' trainable fractions come from the runs table (``runs``: variant -> row), the
    stage-2 fraction otherwise from the model's run record. A variant that shares an evaluated model
    (its runs row's ``trained_as`` names that model's variant: their plans and classifier coincide)
    gets the same numbers under its own name, with that ``model``. Rows in the order of ``models``; a
    start model that was not evaluated leaves the comparisons null."""
    runs = runs or {}
    scores = _headline_scores(table, tasks)
    present = sorted({(f, m) for _, f, m in scores if f != "perplexity"}) + \
        sorted({(f, m) for _, f, m in scores if f == "perplexity"})
    rows = []
    # each expanded model under its variant, then under the variants that share it (their plans and
    # classifier coincide: the runs table's trained_as names the model's variant)
    expanded = [(name, entry, variant) for name, entry in models.items() if entry.get("variant")
                for variant in [entry["variant"]] + [v for v, r in runs.items() if v != entry["variant"]
                                                     and r.get("trained_as") == entry["variant"]]]
    for name, entry, variant in expanded:
        start, run = entry.get("start"), runs.get(variant, {})
        stage2 = run.get("stage2_trainable_fraction")
        stage2 = stage2 if stage2 is not None and not math.isnan(stage2) else entry.get("trainable_fraction")
        stage1 = run.get("stage1_trainable_fraction")
        stage1 = stage1 if stage1 is not None and not math.isnan(stage1) else None
        for family, metric in present:
            mine = scores.get((name, family, metric), {})
            theirs = scores.get((start, family, metric), {})
            sides = []
            for langs in (new, old):
                both = [lang for lang in langs if lang in mine and lang in theirs]
                values, starts = [mine[l] for l in both], [theirs[l] for l in both]
                sides += [len(both), _aggregate(pl.Series(starts, dtype=pl.Float64), metric),
                          _aggregate(pl.Series(values, dtype=pl.Float64), metric), _change(values, starts, metric)]
            n_new, start_new, value_new, gain, n_old, start_old, value_old, change = sides
            rows.append((variant, name, start, run.get("new_experts"), stage1, stage2, family, metric,
                         n_new, start_new, value_new, gain, n_old, start_old, value_old, change))
    return pl.DataFrame(rows, schema=EXPANSION_SCHEMA, orient="row")


def expansion_markdown(expansion: pl.DataFrame, evaluated: list[str], old: list[str], new: list[str]) -> list[str]:
    """The summary's "Expansion" section: one row per variant."""
    if expansion.height == 0:
        return []
    columns = expansion.select("family", "metric").unique(maintain_order=True).rows()
    lines = ["## Expansion", "",
             f"Each expanded model (LayerMoE variant, stage 2) against the model it was expanded from: the gain on "
             f"the new languages ({', '.join(new) or 'none'}) and the change on the old languages "
             f"({', '.join(old) or 'none'}), per task family's headline metric (a mean difference of accuracy: "
             f"negative on the old languages is forgetting) and for perplexity (a geometric mean of ratios: below 1 "
             f"is better, above 1 on the old languages is forgetting). New experts and the trainable fractions of "
             f"stage 1 (new experts and routers) and stage 2 (routers and classifiers) are from "
             f"`results/expand/runs.parquet`. The numbers are in `expansion.parquet`.", "",
             "| variant | model | start | new experts | trainable fraction (stage 1 / 2) | "
             + " | ".join(f"{'perplexity ratio on new' if f == 'perplexity' else f'{f} gain on new ({m})'}"
                          for f, m in columns)
             + " | " + " | ".join(f"{'perplexity ratio on old' if f == 'perplexity' else f'{f} change on old'}"
                                  for f, m in columns) + " |",
             "|---|---|---|---:|---:|" + "---:|" * (2 * len(columns))]

    def fraction(value):
        return f"{value:.3g}" if value is not None and not np.isnan(value) else "-"

    owners = dict(expansion.select("model", "variant").unique("model", keep="first", maintain_order=True).rows())
    for (variant, model), part in expansion.group_by(["variant", "model"], maintain_order=True):
        by = {(r["family"], r["metric"]): r for r in part.iter_rows(named=True)}
        first = part.row(0, named=True)
        experts = first["new_experts"]
        variant += f" (shares {owners[model]}'s model: same plan and classifier)" if owners[model] != variant else ""
        lines.append(f"| {variant} | {model} | {first['start'] or '-'} | {experts if experts is not None else '-'} | "
                     f"{fraction(first['stage1_trainable_fraction'])} / {fraction(first['stage2_trainable_fraction'])} | "
                     + " | ".join(_comparison_cell(by[c]["new_gain"] if c in by else None, c[1]) for c in columns) + " | "
                     + " | ".join(_comparison_cell(by[c]["old_change"] if c in by else None, c[1]) for c in columns) + " |")
    return lines + _unevaluated_starts(expansion, evaluated)


def summarize(eval_dir: str | Path, models: dict[str, dict], task_dir: str | Path, families: list[str],
              high_resource: list[str], targets: list[str], base_model: str | None,
              expand_old: list[str] | None = None, expand_new: list[str] | None = None,
              expand_runs: str | Path | None = None, not_evaluated: dict[str, str] | None = None) -> pl.DataFrame:
    """Write ``results.parquet``, ``adaptation.parquet``, ``expansion.parquet`` and ``summary.md`` of
    ``models`` (name -> {ref, method, trainable_fraction, target, start, variant}:
    :func:`moelang.registry.summary_models`; an adapted model names its ``target`` language and its
    ``start`` model, an expanded model its ``variant`` and ``start``; the expansion is compared on
    ``expand_old`` and ``expand_new`` with the runs table ``expand_runs``), rows in the order of ``models``
    (the registry's: the base, CPT checkpoints by step, adapted models, the listed ones). A model's trainable fraction is
    the one its training run recorded (:func:`moelang.registry.trainable_fraction`); the configured
    one only for a model without a record. ``not_evaluated``: adapted models left out (name -> why),
    listed at the end of summary.md."""
    tasks = json.loads((Path(task_dir) / "tasks.json").read_text())
    models = {name: {**entry, "trainable_fraction": trainable_fraction(entry)} for name, entry in models.items()}
    table = collect(eval_dir, models, tasks, families)
    with atomic_path(Path(eval_dir) / "results.parquet") as tmp:
        table.write_parquet(tmp)
    adaptation = adaptation_table(table, models, tasks, high_resource, targets)
    with atomic_path(Path(eval_dir) / "adaptation.parquet") as tmp:
        adaptation.write_parquet(tmp)
    expansion = expansion_table(table, models, tasks, list(expand_old or []), list(expand_new or []),
                                read_expand_runs(expand_runs))
    with atomic_path(Path(eval_dir) / "expansion.parquet") as tmp:
        expansion.write_parquet(tmp)
    text = summary_markdown(table, models, high_resource, targets, base_model, adaptation)
    text += "\n".join(["", *expansion_markdown(expansion, list(models), list(expand_old or []), list(expand_new or []))])
    if not_evaluated:
        text += "\n".join(["", "## Not evaluated", "", *(f"- `{name}`: not trained, {why}"
                                                         for name, why in not_evaluated.items()), ""])
    with atomic_path(Path(eval_dir) / "summary.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("evaluation: %d result rows over %d models", table.height, len(models))
    return table

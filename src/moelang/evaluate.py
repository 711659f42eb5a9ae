"""Stage: evaluation. lm-evaluation-harness tasks, held-out perplexity, one results table.

Task families (``evaluation.tasks``):

``belebele`` / ``multiblimp``
    the harness's own ``belebele_<lang_Script>`` and ``multiblimp_<iso639-3>`` tasks: by name from the
    hub, or, with ``evaluation.mirror`` (offline clusters), from local Parquet copies with the original
    columns (``{mirror}/belebele/{lang_Script}.parquet``, ``{mirror}/multiblimp/{iso3}.parquet``). For a
    mirror the stage writes task YAMLs that ``include`` the shipped templates and override only the
    dataset path, files and splits, so prompts and metrics stay the harness's own.
``synthetic_blimp`` / ``synthetic_belebele`` (the embedded default; offline)
    two small tasks **labelled synthetic**, built by the pipeline from each language's held-out
    corpus in the formats of the real ones and run through the same shipped templates: a
    MultiBLiMP-format minimal pair (a held-out sentence vs the same sentence with two adjacent words
    swapped) and a Belebele-format multiple choice (the first half of a held-out document as the
    passage, "which text continues the passage?", its second half among three second halves of other
    documents). They measure a model's grip on each language's word order and local coherence; they
    are not the published benchmarks.

Scoring is the harness's (``lm_eval.simple_evaluate`` with a ``TaskManager``), never re-implemented.
Perplexity is computed here: every held-out chunk is preceded by the end-of-text token and all of its
tokens are predicted; ``exp(total NLL / tokens)`` per language.

Outputs
-------
``results/eval/tasks/``: the local task data (``data/*.parquet``), YAMLs and ``tasks.json``
(task -> family, language, shots).
``results/eval/{model}/{family}.json``: the harness's own results (samples left out).
``results/eval/{model}/perplexity.parquet``: lang, n_tokens, nll, perplexity.
``results/eval/results.parquet``: ``model``, ``method``, ``lang``, ``task``, ``n_shot`` int64,
``metric`` (``acc``, ``acc_norm``, ``perplexity``), ``value``, ``stderr`` (null for perplexity),
``n_items`` int64.
``results/eval/summary.md``: per method the mean over high-resource, low-resource and all languages,
the trainable fraction, and the change on the old (high-resource) languages against the base model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from moelang.errors import MoelangError
from moelang.io import atomic_dir, atomic_path, log, progress, write_json

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
RESULTS_SCHEMA = {"model": pl.String, "method": pl.String, "lang": pl.String, "task": pl.String, "n_shot": pl.Int64,
                  "metric": pl.String, "value": pl.Float64, "stderr": pl.Float64, "n_items": pl.Int64}


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
# Synthetic local tasks from the held-out corpus
# --------------------------------------------------------------------------------------------------

def synthetic_blimp(lang: str, docs: list[tuple[str, str]], max_items: int, max_words: int = 40) -> pl.DataFrame:
    """Minimal pairs: a held-out sentence and the same sentence with two adjacent (different) words swapped."""
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
    """Multiple choice: which of four texts continues the passage (the first half of a held-out document)?"""
    halves = []
    for doc_id, text in docs:
        words = text.split()
        if min_words <= len(words) <= max_words:
            cut = len(words) // 2
            halves.append((doc_id, " ".join(words[:cut]), " ".join(words[cut:])))
    rows = []
    if len(halves) < 4:
        return pl.DataFrame(rows, schema={c: pl.String for c in BELEBELE_COLUMNS})
    for k, (doc_id, passage, continuation) in enumerate(halves[:max_items]):
        rng = _rng("belebele", doc_id)
        others = [h[2] for j, h in enumerate(halves) if j != k and h[2] != continuation]
        distractors = [others[j] for j in rng.choice(len(others), size=3, replace=False)]
        answer = int(rng.integers(4))
        choices = distractors[:answer] + [continuation] + distractors[answer:]
        rows.append({"link": f"moelang-synthetic:{doc_id}", "question_number": str(k), "flores_passage": passage,
                     "question": "Which text continues the passage?", "mc_answer1": choices[0], "mc_answer2": choices[1],
                     "mc_answer3": choices[2], "mc_answer4": choices[3], "correct_answer_num": str(answer + 1),
                     "dialect": lang, "ds": "moelang-synthetic"})
    return pl.DataFrame(rows, schema={c: pl.String for c in BELEBELE_COLUMNS})


def _task_yaml(family: str, task: str, data_file: Path, split: str, tag: str) -> str:
    lines = [f"include: {shipped_template(family)}", f"task: {task}", f"tag: {tag}", "dataset_path: parquet",
             "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {split}: {data_file.resolve()}",
             f"test_split: {split}"]
    if family == "belebele":
        lines.append(f"fewshot_split: {split}")
    return "\n".join(lines) + "\n"


def build_tasks(corpus_files: dict[str, str | Path], options: dict, out_dir: str | Path) -> dict:
    """Write the local task data and YAMLs; returns tasks.json's content (task -> its description)."""
    out_dir = Path(out_dir)
    tasks: dict[str, dict] = {}
    families = options["tasks"]
    shots = {"synthetic_blimp": 0, "multiblimp": 0, "synthetic_belebele": options["belebele_shots"],
             "belebele": options["belebele_shots"]}
    with atomic_dir(out_dir) as tmp:
        (tmp / "data").mkdir(parents=True)
        (tmp / "yaml").mkdir()
        for lang, path in corpus_files.items():
            docs = []
            if any(f.startswith("synthetic") for f in families):
                frame = pl.read_parquet(path).filter(pl.col("split") == "heldout")
                docs = list(zip(frame["doc_id"].to_list(), frame["text"].to_list()))
            for family in families:
                if family in ("synthetic_blimp", "synthetic_belebele"):
                    table = (synthetic_blimp if family == "synthetic_blimp" else synthetic_belebele)(
                        lang, docs, options["max_items"], options.get("max_words", 40))
                    if table.height < options["min_items"]:
                        log.warning("evaluation: %s for '%s' has %d items (< %d); left out", family, lang, table.height,
                                    options["min_items"])
                        continue
                    name = f"moelang_{family}_{lang}"
                    data = tmp / "data" / f"{name}.parquet"
                    table.write_parquet(data)
                    template = "multiblimp" if family == "synthetic_blimp" else "belebele"
                    split = "train" if template == "multiblimp" else "test"
                    (tmp / "yaml" / f"{name}.yaml").write_text(
                        _task_yaml(template, name, out_dir / "data" / data.name, split, f"moelang_{family}"))
                    tasks[name] = {"family": family, "lang": lang, "n_shot": shots[family], "n_items": table.height,
                                   "synthetic": True}
                else:
                    name, entry = _real_task(family, lang, options, tmp, out_dir)
                    if name:
                        tasks[name] = {"family": family, "lang": lang, "n_shot": shots[family], "synthetic": False, **entry}
        write_json(tasks, tmp / "tasks.json")
    log.info("evaluation: %d tasks (%s)", len(tasks), ", ".join(sorted({t["family"] for t in tasks.values()})))
    return tasks


def _real_task(family: str, lang: str, options: dict, tmp: Path, out_dir: Path) -> tuple[str | None, dict]:
    codes = BELEBELE_CODES if family == "belebele" else MULTIBLIMP_CODES
    code = options.get("codes", {}).get(family, {}).get(lang) or codes.get(lang)
    if code is None:
        log.warning("evaluation: no %s code known for '%s'; set evaluation.codes.%s.%s", family, lang, family, lang)
        return None, {}
    name = f"{family}_{code}"
    mirror = options.get("mirror")
    if not mirror:
        return name, {}  # the shipped task, data from the hub
    data = Path(mirror) / family / f"{code}.parquet"
    if not data.is_file():
        raise MoelangError(f"evaluation: no local mirror of {'facebook/belebele' if family == 'belebele' else 'jumelet/multiblimp'} "
                           f"for '{lang}' at {data}; copy the dataset's '{code}' split there as Parquet with the original "
                           f"columns, or unset evaluation.mirror to read it from the hub")
    local = f"moelang_{name}"
    split = "test" if family == "belebele" else "train"
    (tmp / "yaml" / f"{local}.yaml").write_text(_task_yaml(family, local, data, split, f"moelang_{family}"))
    return local, {"mirror": str(data)}


# --------------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------------

def run_harness(model, tokenizer, task_names: list[str], task_dir: str | Path, n_shot: int, options: dict,
                log_samples: bool = False) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(Path(task_dir) / "yaml"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.get("batch_size", 16),
              max_length=options.get("max_length"))
    return lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=manager, num_fewshot=n_shot,
                                   limit=options.get("limit"), log_samples=log_samples, random_seed=options.get("seed", 0),
                                   numpy_random_seed=options.get("seed", 0), torch_random_seed=options.get("seed", 0),
                                   fewshot_random_seed=options.get("seed", 0), bootstrap_iters=options.get("bootstrap_iters", 1000))


@torch.no_grad()
def perplexity(model, token_file: str | Path, eos_id: int, options: dict) -> dict:
    from moelang.routing import heldout_chunks, length_batches

    device = next(model.parameters()).device
    chunks = heldout_chunks(token_file, options["seq_len"] - 1, options.get("tokens_per_language"))
    chunks = [np.concatenate([[eos_id], c]) for c in chunks]  # every real token gets a context
    total_nll, total = 0.0, 0
    for ids, mask in progress(length_batches(chunks, options["batch_tokens"], eos_id), desc="perplexity", unit=" batches"):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = mask[:, 1:].bool()
        total_nll -= float(logp[valid].double().sum())
        total += int(valid.sum())
    return {"n_tokens": total, "nll": total_nll / total, "perplexity": math.exp(total_nll / total)}


def evaluate_model(model_ref: str, family: str, tasks: dict, task_dir: str | Path, token_files: dict[str, str | Path],
                   options: dict, out_path: str | Path) -> None:
    """One (model, task family) job: the harness's JSON, or the perplexity table."""
    from transformers import AutoTokenizer

    from moelang.models import load_for_inference

    model = load_for_inference(model_ref, options)
    tokenizer = AutoTokenizer.from_pretrained(str(model_ref), revision=options.get("revision"),
                                              trust_remote_code=options.get("trust_remote_code", False))
    if family == "perplexity":
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        rows = [{"lang": lang, **perplexity(model, path, eos, options)} for lang, path in token_files.items()]
        with atomic_path(out_path) as tmp:
            pl.DataFrame(rows, schema={"lang": pl.String, "n_tokens": pl.Int64, "nll": pl.Float64,
                                       "perplexity": pl.Float64}).write_parquet(tmp)
        return
    names = sorted(name for name, t in tasks.items() if t["family"] == family)
    if not names:
        write_json({"results": {}, "note": f"no {family} task for these languages"}, out_path)
        return
    shots = {tasks[n]["n_shot"] for n in names}
    result = run_harness(model, tokenizer, names, task_dir, shots.pop(), options)
    keep = {k: result[k] for k in ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better") if k in result}
    write_json(json.loads(json.dumps(keep, default=str)), out_path)


# --------------------------------------------------------------------------------------------------
# The results table and summary
# --------------------------------------------------------------------------------------------------

def collect(eval_dir: str | Path, models: dict[str, dict], tasks: dict, families: list[str]) -> pl.DataFrame:
    eval_dir = Path(eval_dir)
    rows = []
    for name, entry in models.items():
        for family in families:
            data = json.loads((eval_dir / name / f"{family}.json").read_text())
            for task, metrics in data.get("results", {}).items():
                if task not in tasks:
                    continue
                n_items = (data.get("n-samples", {}).get(task) or {}).get("effective")
                for metric in ("acc", "acc_norm"):
                    if f"{metric},none" in metrics:
                        stderr = metrics.get(f"{metric}_stderr,none")
                        rows.append((name, entry["method"], tasks[task]["lang"], task, tasks[task]["n_shot"], metric,
                                     float(metrics[f"{metric},none"]),
                                     float(stderr) if isinstance(stderr, (int, float)) else None, n_items))
        ppl = eval_dir / name / "perplexity.parquet"
        if ppl.is_file():
            for row in pl.read_parquet(ppl).iter_rows(named=True):
                rows.append((name, entry["method"], row["lang"], "perplexity", 0, "perplexity", row["perplexity"], None,
                             row["n_tokens"]))
    return pl.DataFrame(rows, schema=RESULTS_SCHEMA, orient="row")


def _aggregate(values: pl.Series, metric: str) -> float | None:
    """Mean of accuracies; geometric mean of perplexities (they span orders of magnitude)."""
    if values.len() == 0:
        return None
    if metric == "perplexity":
        return float(np.exp(np.log(values.to_numpy()).mean()))
    return float(values.mean())


def summary_markdown(table: pl.DataFrame, models: dict[str, dict], high_resource: list[str], targets: list[str],
                     base_model: str | None) -> str:
    lines = ["# Evaluation summary", "",
             "Tasks named `moelang_synthetic_*` are synthetic, built from the held-out corpus (see "
             "`src/moelang/evaluate.py`); they are not the published benchmarks. Accuracy columns are means over "
             "languages, perplexity columns geometric means. The last column compares each model with the base "
             "model on the old (high-resource) languages: a difference of accuracy, a ratio of perplexity.", ""]
    keyed = table.with_columns(
        pl.when(pl.col("lang").is_in(high_resource)).then(pl.lit("high-resource"))
        .when(pl.col("lang").is_in(targets)).then(pl.lit("low-resource")).otherwise(pl.lit("other")).alias("group"),
        pl.col("task").str.replace(r"_[a-z]{2,3}$", "").alias("family"))
    fmt = (lambda v: f"{v:.3f}" if v is not None and not np.isnan(v) else "-")
    for (family, metric), part in keyed.sort("family", "metric").group_by(["family", "metric"], maintain_order=True):
        if metric == "acc":
            continue  # acc_norm is the papers' headline metric; both are in results.parquet
        lines += [f"## {family} ({metric})", "", "| model | method | trainable fraction | high-resource | low-resource "
                  "| all | change on old languages |", "|---|---|---:|---:|---:|---:|---:|"]
        base = part.filter((pl.col("model") == base_model) & pl.col("lang").is_in(high_resource)) if base_model else None
        for name, entry in models.items():
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
            lines.append(f"| {name} | {entry['method']} | {fmt(fraction) if fraction is not None else '-'} | "
                         f"{fmt(means['high-resource'])} | {fmt(means['low-resource'])} | "
                         f"{fmt(_aggregate(rows['value'], metric))} | {change} |")
        lines.append("")
    return "\n".join(lines)


def summarize(eval_dir: str | Path, models: dict[str, dict], task_dir: str | Path, families: list[str],
              high_resource: list[str], targets: list[str], base_model: str | None) -> pl.DataFrame:
    tasks = json.loads((Path(task_dir) / "tasks.json").read_text())
    table = collect(eval_dir, models, tasks, families)
    with atomic_path(Path(eval_dir) / "results.parquet") as tmp:
        table.write_parquet(tmp)
    with atomic_path(Path(eval_dir) / "summary.md") as tmp:
        tmp.write_text(summary_markdown(table, models, high_resource, targets, base_model), encoding="utf-8")
    log.info("evaluation: %d result rows over %d models", table.height, len(models))
    return table

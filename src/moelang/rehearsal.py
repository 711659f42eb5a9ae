"""Stand-ins for a paper config's hub inputs, so that the config can be rehearsed on this machine.

A paper config (``config/olmoe-m7.yaml``, ``config/layermoe-qwen.yaml``) reads its model, corpus and
tasks from the hub. :func:`make_standins` writes local inputs with the same shapes, from what
moelang ships:

* **the model** (``model/``): the real architecture's ``config.json`` (``models/known_configs/``:
  hidden size, heads, experts, top-k, expert width, vocabulary, rope, dtype) with random, seeded
  weights, cut to ``layers`` decoder layers, saved as sharded safetensors in bf16 (as the hub
  checkpoints are) with a byte-level BPE tokenizer trained on the stand-in corpus. The embedding
  matrices keep the real vocabulary size (their memory and the LM head's FLOPs are real); the
  tokenizer uses the first ids of it, as a real tokenizer leaves padding rows unused. The model's
  special-token ids are the tokenizer's; like OLMoE's and Qwen1.5's tokenizers, it adds no BOS token.
* **the corpus** (``corpus/{lang}.parquet``): each language's text of the built-in catalogs in the
  layout of the dataset the paper config names for it: CulturaX (``text``, ``timestamp``, ``url``,
  ``source``), SlimPajama (``text``, ``meta`` with ``redpajama_set_name``), SkyPile (``text``).
* **the tasks** (``mirror/belebele/{code}.parquet``, ``mirror/multiblimp/{code}.parquet``): for each
  language the config evaluates, a handful of items in the columns of ``facebook/belebele`` and
  ``jumelet/multiblimp``, which ``evaluation.mirror`` reads instead of the hub. The items are written
  from the stand-in corpus by rule: they have the real tasks' shape (passage, question, four answers;
  a grammatical and an ungrammatical sentence), not their content; scores on them mean nothing.

``inputs.json`` records what was written and how. A rehearsal config points the paper config's
inputs at these (``.test/rehearse-*.yaml``); ``make rehearse`` makes them and runs both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelang.errors import MoelangError
from moelang.io import atomic_dir, atomic_path, log
from moelang.options import BUILTIN_DEFAULT

# dataset id -> the columns of its records (what a local copy of it looks like)
LAYOUTS = {
    "uonlp/CulturaX": "culturax",
    "cerebras/SlimPajama-627B": "slimpajama",
    "Skywork/SkyPile-150B": "skypile",
}
# catalog locale directories of languages whose code is not the locale's name
LOCALES = {"zh": ["zh_Hans", "zh_CN"]}
TOKENIZER_VOCAB = 8000
BELEBELE_ITEMS = 8
MULTIBLIMP_ITEMS = 8


def culturax_table(lang: str, texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table({"text": texts,
                     "timestamp": [f"2019/0{1 + i % 9}/1{i % 10} 12:00:00" for i in range(n)],
                     "url": [f"https://example.{lang}/doc/{i}" for i in range(n)],
                     "source": ["mC4" if i % 2 else "OSCAR-2019" for i in range(n)]})


def slimpajama_table(lang: str, texts: list[str]) -> pa.Table:
    meta = pa.array([{"redpajama_set_name": "RedPajamaCommonCrawl"} for _ in texts],
                    type=pa.struct([("redpajama_set_name", pa.string())]))
    return pa.table({"text": texts, "meta": meta})


def skypile_table(lang: str, texts: list[str]) -> pa.Table:
    return pa.table({"text": texts})


TABLES = {"culturax": culturax_table, "slimpajama": slimpajama_table, "skypile": skypile_table}


def corpus_texts(lang: str, builtin: dict, max_docs: int | None = None) -> list[str]:
    """Documents of ``lang`` from the built-in catalogs (``corpus.builtin``: as the default's corpus
    stage reads them)."""
    from moelang.corpus import builtin_documents

    texts = []
    for _, _, text in builtin_documents(lang, {"locales": LOCALES.get(lang, [lang])}, builtin):
        text = text.strip()
        if text:
            texts.append(text)
        if max_docs and len(texts) >= max_docs:
            break
    if not texts:
        raise MoelangError(f"stand-ins: the built-in catalogs have no text for '{lang}'; add its locale to "
                           f"moelang.rehearsal.LOCALES")
    return texts


def layout_of(source: dict) -> str:
    """The local layout standing in for a config's corpus source (CulturaX's for a non-hub one)."""
    return LAYOUTS.get(source.get("dataset", ""), "culturax")


def write_corpus(config: dict, out: Path) -> dict[str, dict]:
    languages = list(config["languages"]["high_resource"]) + list(config["languages"]["targets"])
    corpus = config.get("corpus", {})
    written = {}
    for lang in languages:
        source = (corpus.get("sources") or {}).get(lang) or corpus.get("default_source") or {}
        layout = layout_of(source)
        texts = corpus_texts(lang, corpus.get("builtin") or BUILTIN_DEFAULT)
        with atomic_path(out / f"{lang}.parquet") as tmp:
            pq.write_table(TABLES[layout](lang, texts), tmp)
        written[lang] = {"layout": layout, "documents": len(texts), "characters": sum(map(len, texts))}
    return written


def train_standin_tokenizer(corpus_dir: Path, languages: list[str], out: Path, vocab_size: int) -> None:
    """The project's byte-level BPE (:func:`moelang.tokenize.byte_level_bpe`) on every stand-in
    document; no BOS token, like OLMoE's and Qwen1.5's tokenizers."""
    from moelang.tokenize import byte_level_bpe

    def texts():
        for lang in languages:
            yield from pq.read_table(corpus_dir / f"{lang}.parquet", columns=["text"]).column("text").to_pylist()

    byte_level_bpe(texts(), vocab_size, bos=False).save_pretrained(out)


def standin_config(name_or_path: str, layers: int, tokenizer):
    """The real architecture's config (shipped ``known_configs``), cut to ``layers`` decoder layers, with
    the tokenizer's special-token ids."""
    from moelang.models.loading import KNOWN_CONFIGS, load_config

    if not (KNOWN_CONFIGS / (name_or_path.replace("/", "--") + ".json")).is_file():
        shipped = sorted(p.stem.replace("--", "/") for p in KNOWN_CONFIGS.glob("*.json"))
        raise MoelangError(f"stand-ins: no shipped architecture for '{name_or_path}'; known: {', '.join(shipped)} "
                           f"(add its config.json to src/moelang/models/known_configs/)")
    config = load_config(name_or_path, known_first=True)
    if not 1 <= layers <= config.num_hidden_layers:
        raise MoelangError(f"stand-ins: layers {layers}; choose 1 to {config.num_hidden_layers} ({name_or_path})")
    if len(tokenizer) > config.vocab_size:
        raise MoelangError(f"stand-ins: the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                           f"{config.vocab_size}; train it with a smaller vocab_size")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if getattr(config, "max_window_layers", None):
        config.max_window_layers = min(config.max_window_layers, layers)
    config.bos_token_id = None
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def write_model(name_or_path: str, layers: int, tokenizer_dir: Path, out: Path, seed: int,
                max_shard_size: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelang.models import count_parameters

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = standin_config(name_or_path, layers, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    counts = count_parameters(model)
    return {"architecture": name_or_path, "layers": layers, "of_layers": load_layers(name_or_path),
            "parameters": int(counts["total"]), "dtype": "bfloat16", "seed": seed, "max_shard_size": max_shard_size,
            "tokenizer_tokens": len(tokenizer), "vocab_size": int(config.vocab_size)}


def load_layers(name_or_path: str) -> int:
    from moelang.models.loading import load_config

    return int(load_config(name_or_path, known_first=True).num_hidden_layers)


def belebele_rows(lang: str, code: str, texts: list[str], n: int, rng: np.random.Generator) -> list[dict]:
    """Belebele's columns; a passage of two documents, the question a third, the answers the first
    words of four documents, one of them the passage's."""
    rows = []
    for i in range(n):
        picks = rng.choice(len(texts), size=6, replace=False)
        passage = f"{texts[picks[0]]} {texts[picks[1]]}"
        answers = [" ".join(texts[p].split()[:4]) for p in picks[[0, 2, 3, 4]]]
        order = rng.permutation(4)
        correct = int(np.where(order == 0)[0][0]) + 1
        rows.append({"link": f"https://example.{lang}/belebele/{i}", "question_number": str(1 + i % 2),
                     "flores_passage": passage, "question": f"{texts[picks[5]][:80]}?",
                     **{f"mc_answer{j + 1}": answers[order[j]] for j in range(4)},
                     "correct_answer_num": str(correct), "dialect": code, "ds": "2023-05-03"})
    return rows


def multiblimp_rows(lang: str, code: str, texts: list[str], n: int, rng: np.random.Generator) -> list[dict]:
    """MultiBLiMP's columns; the ungrammatical sentence swaps two words of the grammatical one."""
    rows = []
    candidates = [t for t in texts if len(t.split()) >= 3] or texts
    for i in range(n):
        words = candidates[int(rng.integers(len(candidates)))].split()[:12]
        wrong = words[:]
        if len(wrong) >= 2:
            wrong[0], wrong[1] = wrong[1], wrong[0]
        else:
            wrong = wrong + wrong
        rows.append({"sen": " ".join(words), "wrong_sen": " ".join(wrong), "prefix": "", "phenomenon": "SV-#",
                     "lang": code, "grammatical_feature": "SG", "ungrammatical_feature": "PL"})
    return rows


def write_mirror(config: dict, corpus_dir: Path, out: Path, seed: int) -> dict[str, list[str]]:
    import polars as pl

    from moelang.evaluate import BELEBELE_CODES, BELEBELE_COLUMNS, BLIMP_COLUMNS, MULTIBLIMP_CODES

    tasks = [t for t in (config.get("evaluation") or {}).get("tasks", []) if t in ("belebele", "multiblimp")]
    languages = list(config["languages"]["high_resource"]) + list(config["languages"]["targets"])
    written: dict[str, list[str]] = {}
    for task in tasks:
        codes, columns = ((BELEBELE_CODES, BELEBELE_COLUMNS) if task == "belebele"
                          else (MULTIBLIMP_CODES, BLIMP_COLUMNS))
        make, n = (belebele_rows, BELEBELE_ITEMS) if task == "belebele" else (multiblimp_rows, MULTIBLIMP_ITEMS)
        (out / task).mkdir(parents=True, exist_ok=True)
        for lang in languages:
            code = codes.get(lang)
            if code is None:
                continue
            texts = pq.read_table(corpus_dir / f"{lang}.parquet", columns=["text"]).column("text").to_pylist()
            rng = np.random.default_rng([seed, sum(map(ord, lang))])
            rows = make(lang, code, texts, n, rng)
            with atomic_path(out / task / f"{code}.parquet") as tmp:
                pl.DataFrame(rows, schema={c: pl.String for c in columns}).write_parquet(tmp)
            written.setdefault(task, []).append(code)
    return written


def read_paper_config(path: str | Path) -> dict:
    """A paper config as written (not validated: its hub model and data need not be reachable here)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MoelangError(f"stand-ins: cannot read the config '{path}' ({type(exc).__name__}); pass a paper config "
                           f"such as config/olmoe-m7.yaml") from None
    if not isinstance(config.get("languages"), dict) or "high_resource" not in config["languages"]:
        raise MoelangError(f"stand-ins: '{path}' has no languages.high_resource; pass a paper config")
    config["languages"].setdefault("targets", {})
    return config


def make_standins(config: dict, out: str | Path, layers: int, seed: int = 0, vocab_size: int = TOKENIZER_VOCAB,
                  max_shard_size: str = "1GB") -> dict:
    """Write the stand-in model, corpus and task mirrors of ``config`` (a paper config as written,
    :func:`read_paper_config`) under ``out`` (see the module docstring); a finished ``out`` is left as
    it is."""
    out = Path(out)
    record_path = out / "inputs.json"
    if record_path.is_file():
        log.info("stand-ins: %s exists; delete it to write them again", out)
        return json.loads(record_path.read_text(encoding="utf-8"))
    base = (config.get("model") or {}).get("base") or {}
    if base.get("type") != "pretrained":
        raise MoelangError("stand-ins: the config trains its own model (model.base.type: train); stand-ins replace "
                           "a pretrained hub model only")
    out.mkdir(parents=True, exist_ok=True)
    languages = list(config["languages"]["high_resource"]) + list(config["languages"]["targets"])
    log.info("stand-ins: corpus of %s in the layouts of the config's sources", ", ".join(languages))
    corpus = write_corpus(config, out / "corpus")
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        with atomic_dir(tokenizer_dir) as tmp:
            train_standin_tokenizer(out / "corpus", languages, Path(tmp), vocab_size)
    log.info("stand-ins: %s with %d layers, random weights (seed %d)", base["name_or_path"], layers, seed)
    model = write_model(base["name_or_path"], layers, tokenizer_dir, out / "model", seed, max_shard_size)
    mirror = write_mirror(config, out / "corpus", out / "mirror", seed)
    record = {"config_model": base["name_or_path"], "model": model, "corpus": corpus, "mirror": mirror,
              "tokenizer_vocab": vocab_size}
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record

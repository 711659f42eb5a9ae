"""``python -m moelang <stage> ...`` (also installed as ``moelang``).

Each subcommand is one stage function. Its options are one typed dataclass of
:mod:`moelang.options`, built either from the pipeline config (``--config config/config.yaml``, the
way to run a stage by hand: the same options the workflow passes) or parsed from the JSON object
Snakemake passes (``--options``), which holds exactly the options that stage depends on.
``moelang options [STAGE]`` describes them.
Bad input ends with one line, ``moelang: error: <problem>; <fix>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelang import config as cfg
from moelang import options as opts
from moelang.errors import MoelangError


def _options(args, options_class: type[opts.StageOptions], derive, needs: str = ""):
    """The stage's options: parsed (and checked) from ``--options`` JSON, or built from ``--config``."""
    if args.options is not None:
        return options_class.from_json(args.options)
    if args.config is not None:
        return derive(cfg.load(args.config))
    raise MoelangError(f"pass --config CONFIG.yaml{needs} (or --options JSON, as the workflow does)")


def _add_option_source(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", help="pipeline config YAML (e.g. config/config.yaml)")
    group.add_argument("--options", help="this stage's options as JSON (what the Snakemake rules pass)")


def _lang_paths(values: list[str], what: str) -> dict[str, Path]:
    """Files named <lang>.<suffix>: map language -> path, in the given order."""
    out = {}
    for value in values:
        path = Path(value)
        lang = path.name.split(".")[0]
        cfg.check_lang(lang)
        if not path.is_file():
            raise MoelangError(f"{what}: '{path}' does not exist; run the stage that makes it first")
        out[lang] = path
    return out


def _shard(text: str | None, command: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), checked; None -> (0, 1), the whole input."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise MoelangError(f"{command}: --shard '{text}' is not I/N (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise MoelangError(f"{command}: --shard {text} does not exist; use I/N with 0 <= I < N")
    return index, count


def _existing(paths: list[str], command: str, what: str) -> list[str]:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise MoelangError(f"{command}: {missing[0]} does not exist; run every {what} job first")
    return paths


def cmd_corpus(args) -> None:
    from moelang.corpus import build_corpus, build_corpus_shard

    lang = cfg.check_lang(args.lang)
    options = _options(args, opts.CorpusOptions, lambda c: cfg.corpus_options(c, lang))
    shard = _shard(args.shard, "corpus")
    if shard[1] > 1:
        build_corpus_shard(lang, options, shard, args.out, args.stats)
    else:
        build_corpus(lang, options, args.out, args.stats)


def cmd_corpus_gather(args) -> None:
    from moelang.corpus import gather_corpus

    lang = cfg.check_lang(args.lang)
    options = _options(args, opts.CorpusOptions, lambda c: cfg.corpus_options(c, lang))
    if len(args.shards) != len(args.shard_stats):
        raise MoelangError("corpus-gather: pass one --shard-stats file per --shards file, in the same order")
    gather_corpus(lang, options, _existing(args.shards, "corpus-gather", "corpus shard"),
                  _existing(args.shard_stats, "corpus-gather", "corpus shard"), args.out, args.stats)


def cmd_corpus_summary(args) -> None:
    from moelang.corpus import summarize

    languages = [cfg.check_lang(lang) for lang in args.languages.split(",") if lang]
    summarize(args.stats, languages, args.out_table, args.out_languages)


def cmd_parallel(args) -> None:
    from moelang.corpus import build_parallel

    build_parallel(_options(args, opts.ParallelOptions, cfg.parallel_options), args.out)


def cmd_tokenizer(args) -> None:
    from moelang.tokenize import fetch_tokenizer, train_tokenizer

    options = _options(args, opts.TokenizerOptions, cfg.tokenizer_options)
    if options.type == "pretrained":
        fetch_tokenizer(options, args.out)
    else:
        if not args.corpus:
            raise MoelangError("tokenizer: training a tokenizer needs --corpus files (results/corpus/<lang>.parquet)")
        train_tokenizer(_lang_paths(args.corpus, "tokenizer"), options, options.base_language, args.out)


def cmd_tokenize(args) -> None:
    from moelang.tokenize import tokenize_corpus

    if not Path(args.corpus).is_file():
        raise MoelangError(f"tokenize: corpus file '{args.corpus}' does not exist; run the corpus stage first")
    tokenize_corpus(args.corpus, args.tokenizer, args.out, args.freq, batch_size=args.batch_size,
                    shard=_shard(args.shard, "tokenize"))


def cmd_tokenize_gather(args) -> None:
    from moelang.tokenize import gather_tokens

    gather_tokens(_existing(args.tokens, "tokenize-gather", "tokenize shard"),
                  _existing(args.freqs, "tokenize-gather", "tokenize shard"), args.out, args.freq)


def cmd_overlap(args) -> None:
    from moelang.overlap import run_overlap

    run_overlap(_lang_paths(args.freq, "overlap"), args.out, args.plot, min_count=args.min_count)


def cmd_pretrain(args) -> None:
    from moelang.train import die_with_launcher

    die_with_launcher()  # first: under torchrun, a worker must not outlive its launcher while loading either
    from moelang.basemodel import pretrain_base
    from moelang.models.loading import check_process_devices

    options = _options(args, opts.PretrainOptions, cfg.pretrain_options)
    check_process_devices(options.device, "pretrain_base")
    if options.base["type"] != "train":
        raise MoelangError("pretrain: model.base.type is 'pretrained'; there is nothing to pre-train")
    if not Path(args.tokens).is_file():
        raise MoelangError(f"pretrain: token file '{args.tokens}' does not exist; run the tokenize stage first")
    pretrain_base(args.tokens, args.tokenizer, options, args.out, args.state_dir)


def cmd_cpt(args) -> None:
    from moelang.train import die_with_launcher

    die_with_launcher()  # first: under torchrun, a worker must not outlive its launcher while loading either
    from moelang.basemodel import continual_pretrain
    from moelang.models.loading import check_process_devices

    options = _options(args, opts.CptOptions, cfg.cpt_options)
    check_process_devices(options.device, "cpt")
    continual_pretrain(args.base, _lang_paths(args.tokens, "cpt"), options, args.out, args.state_dir)


def cmd_profile(args) -> None:
    from moelang.routing import profile_model

    options = _options(args, opts.RoutingOptions, lambda c: cfg.routing_options(c, args.name), " --name MODEL")
    options = options.replace(shard=_shard(args.shard, "profile-routing"))
    profile_model(options.ref, _lang_paths(args.tokens, "routing"), options, args.out, options.model,
                  options.checkpoint_step)


def cmd_merge_routing(args) -> None:
    from moelang.routing import merge_profile_dirs

    merge_profile_dirs(_existing(args.shards, "merge-routing", "profile-routing shard"), args.out)


def cmd_routing_metrics(args) -> None:
    from moelang.routing_metrics import run_metrics

    options = _options(args, opts.RoutingMetricsOptions, cfg.routing_metrics_options)
    missing = [p for p in args.profiles + [args.overlap] if not Path(p).is_file()]
    if missing:
        raise MoelangError(f"routing metrics: {missing[0]} does not exist; run the profile and overlap stages first")
    run_metrics(args.profiles, args.overlap, options, args.out, args.selected)


def cmd_similarity(args) -> None:
    from moelang.similarity import run_similarity

    options = _options(args, opts.SimilarityOptions, cfg.similarity_options)
    run_similarity(options.ref, _lang_paths(args.tokens, "similarity"), options, args.out, args.plot,
                   options.name, parallel_path=args.parallel)


def _codes(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    codes = [cfg.check_lang(code.strip()) for code in text.split(",") if code.strip()]
    if not codes:
        raise MoelangError(f"allocate: {what} is empty; pass comma-separated language codes")
    return codes


# allocation option -> the `moelang allocate` flag that sets it by hand; with --config or --options
# every option comes from there instead
ALLOCATE_FLAGS = {"old": "--old", "new": "--new", "delta": "--delta", "new_experts": "--new-experts",
                  "existing": "--existing", "counts_existing": "--new-only/--counts-existing",
                  "classifier_layers": "--classifier-layers", "routing_weight": "--routing-weight",
                  "nonpositive": "--nonpositive", "checkpoint_step": "--checkpoint-step",
                  "uniform_per_layer": "--uniform-per-layer", "mola_budget": "--mola-budget"}


def _classifier_layers(text: str) -> int | list[int]:
    """``--classifier-layers``: ``3`` (how many, by our rule) or ``5,6,10`` (those layers)."""
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor comma-separated layer indices "
                                         f"(e.g. 3, or 5,6,10)") from None


def _kept_for_allocation(similarity_path: str) -> list[str]:
    """The kept languages as the workflow has them: results/corpus/languages.json when run where the
    workflow runs, else the languages of the similarity table (the kept ones the similarity stage saw)."""
    from moelang.allocation import read_similarity

    decided = Path("results/corpus/languages.json")
    if decided.is_file():
        return json.loads(decided.read_text(encoding="utf-8"))["kept"]
    table = read_similarity(similarity_path, need_experts=False)
    return sorted(set(table["lang_a"]) | set(table["lang_b"]))


def cmd_adapt(args) -> None:
    from moelang.train import die_with_launcher

    die_with_launcher()
    from moelang.adapt import adapt_target
    from moelang.models.loading import check_process_devices

    def from_config(config):
        return cfg.adapt_options(config, cfg.check_lang(args.lang), args.methods.split(",") if args.methods else None)

    options = _options(args, opts.AdaptOptions, from_config, " --lang LANG")
    check_process_devices(options.device, "adapt")
    tokens = _lang_paths([args.tokens], "adapt")
    if options.lang not in tokens:
        raise MoelangError(f"adapt: --tokens '{args.tokens}' is not the token file of '{options.lang}' "
                           f"(results/tokens/{options.lang}.parquet)")
    if not Path(args.selected).is_file():
        raise MoelangError(f"adapt: '{args.selected}' does not exist; run the routing metrics first")
    adapt_target(tokens[options.lang], args.selected, options, args.out, args.state_dir)


def cmd_adapt_select(args) -> None:
    from moelang.adapt import select_target

    cfg.check_lang(args.lang)
    select_target(args.lang, {"runs": _existing(args.runs, "adapt-select", "adaptation run")}, args.out,
                  Path(args.root) / args.lang)


def cmd_adapt_gather(args) -> None:
    from moelang.adapt import gather_runs

    gather_runs(_existing(args.tables, "adapt-gather", "runs table"), args.out)


def _expand_options(args) -> opts.ExpandOptions:
    return _options(args, opts.ExpandOptions, lambda config: cfg.expand_options(config, args.variant), " --variant NAME")


def cmd_expand(args) -> None:
    from moelang.expand import expand_variant

    options = _expand_options(args)
    if args.profile_dir is not None and not Path(args.profile_dir).is_dir():
        raise MoelangError(f"expand: --profile-dir '{args.profile_dir}' does not exist; profile the start model first")
    expand_variant(options, args.plan, args.out, args.profile_dir)


def cmd_expand_train(args) -> None:
    from moelang.train import die_with_launcher

    die_with_launcher()
    from moelang.expand import train_stage

    options = _expand_options(args)
    tokens = _lang_paths(args.tokens, "expand-train")
    if args.plan is not None and not Path(args.plan).is_file():
        raise MoelangError(f"expand-train: '{args.plan}' does not exist; run the allocation stage first")
    train_stage(args.stage, options, args.model, tokens, args.out, args.state_dir, args.plan)


def cmd_expand_gather(args) -> None:
    from moelang.expand import gather_runs

    variants = plan = None
    if args.variants is not None:  # the variants that share a trained model get its row under their name
        if args.plan is None or not Path(args.plan).is_file():
            raise MoelangError("expand-gather: --variants needs --plan, the allocation's plan.json (which variants' "
                               "plans coincide); run the allocation stage first")
        variants = json.loads(args.variants)
        plan = json.loads(Path(args.plan).read_text(encoding="utf-8"))
    gather_runs(_existing(args.runs, "expand-gather", "expand_stage2"), args.out, variants, plan)


def cmd_allocate(args) -> None:
    from moelang.allocation import run_allocation

    if not Path(args.similarity).is_file():
        raise MoelangError(f"allocate: similarity table '{args.similarity}' does not exist; run the similarity stage first")
    if args.specialization is not None and not Path(args.specialization).is_file():
        raise MoelangError(f"allocate: specialisation table '{args.specialization}' does not exist; run the routing "
                           f"metrics stage first, or leave out --specialization (no routing plan then)")
    given = {key: getattr(args, key) for key in ALLOCATE_FLAGS if getattr(args, key) is not None}
    if args.options is not None or args.config is not None:
        if given:
            raise MoelangError(f"allocate: {', '.join(ALLOCATE_FLAGS[k] for k in given)} cannot be combined with "
                               f"--config/--options, which give every allocation option; drop one or the other")
        if args.options is not None:
            options = opts.AllocationOptions.from_json(args.options)
        else:  # exactly what the workflow's rule passes for this config
            options = cfg.allocation_options(cfg.load(args.config), _kept_for_allocation(args.similarity))
    else:
        options = opts.AllocationOptions.from_dict({**given, "old": _codes(args.old, "--old"),
                                                    "new": _codes(args.new, "--new")}, what="allocate")
        if options.old is None or options.new is None:
            raise MoelangError("allocate: pass --old and --new language lists (or --config CONFIG.yaml, or --options JSON)")
        if (args.delta is None) == (args.new_experts is None):
            raise MoelangError("allocate: pass exactly one budget, --delta or --new-experts")
    run_allocation(args.similarity, options, args.out, args.specialization)


def cmd_eval_tasks(args) -> None:
    from moelang.evaluate import build_tasks

    options = _options(args, opts.EvaluationOptions, cfg.evaluation_options)
    build_tasks(_lang_paths(args.corpus, "evaluation"), options, args.out)


def cmd_evaluate(args) -> None:
    from moelang.evaluate import evaluate_model

    options = _options(args, opts.EvaluationOptions, lambda c: cfg.evaluation_options(c, args.name), " --name MODEL")
    tasks = json.loads((Path(args.tasks) / "tasks.json").read_text()) if args.tasks else {}
    tokens = _lang_paths(args.tokens, "evaluation") if args.tokens else {}
    evaluate_model(options.ref, args.families, tasks, args.tasks, tokens, options, args.out)


def cmd_eval_summary(args) -> None:
    from moelang.evaluate import summarize

    options = opts.EvalSummaryOptions.from_json(args.options)
    missing = sorted(set(options.models) - set(options.order))
    if missing:
        raise MoelangError(f"eval-summary: models {missing} have no place in --options' order; list every model there")
    summarize(args.eval_dir, {name: options.models[name] for name in options.order}, args.tasks, options.families, options.high_resource,
              options.targets, options.base_model, expand_old=options.expand_old, expand_new=options.expand_new,
              expand_runs=options.expand_runs, not_evaluated=options.not_evaluated)


def cmd_report(args) -> None:
    from moelang.report import ReportInputs, build_report

    options = _options(args, opts.ReportOptions, cfg.report_options)
    optional = lambda value: None if value is None else Path(value)  # noqa: E731
    inputs = ReportInputs(corpus_summary=Path(args.corpus_summary), token_files=[Path(p) for p in args.tokens],
                          overlap=Path(args.overlap), similarity=Path(args.similarity), plan=Path(args.plan),
                          plan_json=Path(args.plan_json),
                          results=Path(args.results), tasks=Path(args.tasks), routing_metrics=optional(args.routing_metrics),
                          selected_experts=optional(args.selected_experts), adaptation=optional(args.adaptation),
                          adapt_runs=optional(args.adapt_runs), expansion=optional(args.expansion),
                          expand_runs=optional(args.expand_runs))
    build_report(inputs, options, args.out, args.figures)


def cmd_report_figures(args) -> None:
    from moelang.report import export_figures

    export_figures(args.figures, args.out, args.max_width)


def cmd_usage(args) -> None:
    from moelang.usage import main_usage

    main_usage(args.dir, args.out)


def cmd_standins(args) -> None:
    from moelang.rehearsal import make_standins, read_paper_config

    record = make_standins(read_paper_config(args.configfile), args.out, args.layers, seed=args.seed)
    model = record["model"]
    print(f"stand-ins in {args.out}: {model['architecture']} cut to {model['layers']} of {model['of_layers']} layers "
          f"({model['parameters']:,} parameters, bf16, random), corpus of {len(record['corpus'])} languages, task "
          f"mirrors {', '.join(f'{t} ({len(c)})' for t, c in record['mirror'].items()) or 'none'}")


def cmd_plan(args) -> None:
    from moelang.io import write_table
    from moelang.plan import format_plan, load_config, plan_config, plan_table

    path = args.configfile or args.config
    if path is None:
        raise MoelangError("plan: pass --configfile CONFIG.yaml (the workflow's config)")
    rows = plan_config(load_config(path), gpu=args.gpu, utilisation=args.utilisation)
    print(format_plan(rows, args.gpu, args.utilisation))
    if args.out:
        write_table(plan_table(rows), args.out)


def cmd_options(args) -> None:
    stages = [args.stage] if args.stage else sorted(opts.STAGE_OPTIONS)
    print("\n\n".join(f"moelang {stage}: {opts.describe(opts.STAGE_OPTIONS[stage])}" for stage in stages))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelang", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = sub.add_parser("corpus", help="one language's corpus with its train/dev/test split")
    p.add_argument("--lang", required=True)
    _add_option_source(p)
    p.add_argument("--out", required=True, help="results/corpus/<lang>.parquet")
    p.add_argument("--stats", required=True, help="results/corpus/<lang>.stats.json")
    p.add_argument("--shard", default=None, help="I/N: write the I-th of N parts of the source (see corpus-gather)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("corpus-gather", help="merge one language's corpus shards in source order")
    p.add_argument("--lang", required=True)
    _add_option_source(p)
    p.add_argument("--shards", nargs="+", required=True, help="the shards' parquet files, in shard order")
    p.add_argument("--shard-stats", nargs="+", required=True, help="the shards' stats files, same order")
    p.add_argument("--out", required=True, help="results/corpus/<lang>.parquet")
    p.add_argument("--stats", required=True, help="results/corpus/<lang>.stats.json")
    p.set_defaults(func=cmd_corpus_gather)

    p = sub.add_parser("corpus-summary", help="gather corpus stats; decide the kept languages")
    p.add_argument("--stats", nargs="+", required=True)
    p.add_argument("--languages", required=True, help="comma-separated, in config order")
    p.add_argument("--out-table", required=True)
    p.add_argument("--out-languages", required=True)
    p.set_defaults(func=cmd_corpus_summary)

    p = sub.add_parser("parallel", help="the parallel table (one column per language)")
    _add_option_source(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_parallel)

    p = sub.add_parser("tokenizer", help="train the default BPE or save the model's tokenizer")
    _add_option_source(p)
    p.add_argument("--corpus", nargs="*", default=[], help="corpus files of the kept languages (train)")
    p.add_argument("--out", required=True, help="tokenizer directory")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("tokenize", help="token ids and frequencies of one language")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True)
    p.add_argument("--freq", required=True)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--shard", default=None, help="I/N: tokenize the I-th of N contiguous row ranges")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("tokenize-gather", help="join one language's token shards and add up their frequencies")
    p.add_argument("--tokens", nargs="+", required=True, help="the shards' token files, in shard order")
    p.add_argument("--freqs", nargs="+", required=True, help="the shards' frequency files")
    p.add_argument("--out", required=True, help="results/tokens/<lang>.parquet")
    p.add_argument("--freq", required=True, help="results/tokens/<lang>.freq.parquet")
    p.set_defaults(func=cmd_tokenize_gather)

    p = sub.add_parser("overlap", help="pairwise token-vocabulary overlap")
    p.add_argument("--freq", nargs="+", required=True, help="results/tokens/<lang>.freq.parquet files")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    p.add_argument("--min-count", type=int, default=1)
    p.set_defaults(func=cmd_overlap)

    p = sub.add_parser("pretrain", help="train the English-centric base model from scratch")
    _add_option_source(p)
    p.add_argument("--tokens", required=True, help="results/tokens/<base language>.parquet")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="model directory (save_pretrained)")
    p.add_argument("--state-dir", required=True, help="training state for resuming (removed on success)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("cpt", help="continual pre-training on a balanced language mix, with checkpoints")
    _add_option_source(p)
    p.add_argument("--base", required=True, help="base model directory or hub id")
    p.add_argument("--tokens", nargs="+", required=True, help="results/tokens/<lang>.parquet of the mix")
    p.add_argument("--out", required=True, help="directory receiving step-<N>/ checkpoints and train_log.parquet")
    p.add_argument("--state-dir", required=True)
    p.set_defaults(func=cmd_cpt)

    p = sub.add_parser("profile-routing", help="per (layer, expert) routing counts of one model, per language")
    _add_option_source(p)
    p.add_argument("--name", help="with --config: the model to profile (e.g. cpt-step800)")
    p.add_argument("--tokens", nargs="+", required=True, help="results/tokens/<lang>.parquet files")
    p.add_argument("--out", required=True, help="directory receiving <lang>.parquet")
    p.add_argument("--shard", default=None, help="I/N: profile the I-th of N interleaved shards of the tokens")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("merge-routing", help="add up one model's routing profiles made on token shards")
    p.add_argument("--shards", nargs="+", required=True, help="the shards' output directories")
    p.add_argument("--out", required=True, help="results/routing/<model>")
    p.set_defaults(func=cmd_merge_routing)

    p = sub.add_parser("routing-metrics", help="entropy, JSD, specialisation, expert selection, plots")
    _add_option_source(p)
    p.add_argument("--profiles", nargs="+", required=True, help="results/routing/<model>/<lang>.parquet files")
    p.add_argument("--overlap", required=True, help="results/overlap/overlap.parquet")
    p.add_argument("--out", required=True, help="results/routing/metrics")
    p.add_argument("--selected", required=True, help="results/routing/selected_experts.json")
    p.set_defaults(func=cmd_routing_metrics)

    p = sub.add_parser("similarity", help="per-layer cross-lingual similarity of one model's MLP inputs")
    _add_option_source(p)
    p.add_argument("--tokens", nargs="+", required=True, help="results/tokens/<lang>.parquet files")
    p.add_argument("--parallel", default=None, help="results/corpus/parallel.parquet (method: parallel)")
    p.add_argument("--out", required=True, help="results/similarity/<model>.<method>.parquet")
    p.add_argument("--plot", default=None, help="results/similarity/<model>.<method>.png")
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("adapt", help="final-layer expert fine-tuning of one target: every method and learning rate")
    _add_option_source(p)
    p.add_argument("--lang", help="with --config: the target language")
    p.add_argument("--methods", help="with --config: comma-separated methods (default: adapt.methods)")
    p.add_argument("--tokens", required=True, help="results/tokens/<lang>.parquet")
    p.add_argument("--selected", required=True, help="results/routing/selected_experts.json")
    p.add_argument("--out", required=True, help="results/adapt (runs go to <out>/<lang>/<method>/lr-<lr>)")
    p.add_argument("--state-dir", required=True, help="training states for resuming (removed on success)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("adapt-select", help="select each method's learning rate by dev-split perplexity")
    p.add_argument("--lang", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="results/adapt/<lang>/<method>/lr-<lr> directories")
    p.add_argument("--root", required=True, help="results/adapt (selected runs go to <root>/<lang>/<method>/selected)")
    p.add_argument("--out", required=True, help="results/adapt/<lang>/runs.parquet")
    p.set_defaults(func=cmd_adapt_select)

    p = sub.add_parser("adapt-gather", help="every target's runs in one table")
    p.add_argument("--tables", nargs="*", default=[], help="results/adapt/<lang>/runs.parquet files (none: an empty table)")
    p.add_argument("--out", required=True, help="results/adapt/runs.parquet")
    p.set_defaults(func=cmd_adapt_gather)

    p = sub.add_parser("expand", help="LayerMoE: grow a model by a variant's allocation plan (no training)")
    _add_option_source(p)
    p.add_argument("--variant", help="with --config: the variant (expand.variants)")
    p.add_argument("--plan", required=True, help="results/allocation/plan.json")
    p.add_argument("--profile-dir", default=None,
                   help="results/routing/<model>: the start model's routing profile (an MoE base's init: most_used)")
    p.add_argument("--out", required=True, help="results/expand/<variant>/stage0")
    p.set_defaults(func=cmd_expand)

    p = sub.add_parser("expand-train", help="LayerMoE: stage 1 (new experts, routers) or stage 2 (routers, classifiers)")
    _add_option_source(p)
    p.add_argument("--variant", help="with --config: the variant (expand.variants)")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", required=True, help="stage 1: results/expand/<v>/stage0; stage 2: the stage-1 model")
    p.add_argument("--tokens", nargs="+", required=True,
                   help="results/tokens/<lang>.parquet of the new languages (stage 2: and of the old ones)")
    p.add_argument("--plan", default=None, help="results/allocation/plan.json (stage 2 with classifiers)")
    p.add_argument("--out", required=True, help="results/expand/<variant>/stage<N>")
    p.add_argument("--state-dir", required=True, help="training state for resuming (removed on success)")
    p.set_defaults(func=cmd_expand_train)

    p = sub.add_parser("expand-gather", help="LayerMoE: every variant's stages in one table")
    p.add_argument("--runs", nargs="+", required=True, help="results/expand/<variant>/stage2 directories")
    p.add_argument("--variants", help="expand.variants as JSON (name -> {plan, classifier}): one row per variant, "
                                      "those sharing a trained model (coinciding plans) with its row")
    p.add_argument("--plan", help="results/allocation/plan.json (with --variants)")
    p.add_argument("--out", required=True, help="results/expand/runs.parquet")
    p.set_defaults(func=cmd_expand_gather)

    p = sub.add_parser("allocate", help="LayerMoE's new experts per layer (and baselines) from a similarity table")
    _add_option_source(p)
    p.add_argument("--similarity", required=True,
                   help="similarity table (results/similarity/<model>.<method>.parquet)")
    p.add_argument("--specialization", default=None,
                   help="routing specialisation table (results/routing/metrics/specialization.parquet) for the routing method")
    p.add_argument("--old", help="old languages, comma-separated (e.g. en,es,zh)")
    p.add_argument("--new", help="new languages, comma-separated (e.g. el,hu,tr)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--delta", type=float, help="LayerMoE's delta")
    budget.add_argument("--new-experts", type=int, help="total new experts (the delta is searched)")
    p.add_argument("--existing", type=int, default=None,
                   help="experts a layer has already (default: the similarity table's experts column)")
    counting = p.add_mutually_exclusive_group()
    counting.add_argument("--new-only", dest="counts_existing", action="store_const", const=False, default=None,
                          help="N_i counts only new experts (default: yes for an MoE, no for a dense model)")
    counting.add_argument("--counts-existing", dest="counts_existing", action="store_const", const=True,
                          help="N_i counts the existing experts too (LayerMoE on a dense model)")
    p.add_argument("--classifier-layers", type=_classifier_layers, default=None,
                   help="router-classifier layers: a list of layer indices (e.g. 5,6,10,23; the authors' way), or a "
                        "number m for our rule, the m layers with the highest S (default: as many as layers with the "
                        "smallest count)")
    p.add_argument("--routing-weight", type=float, default=None, help="routing method: weight of the specialisation score")
    p.add_argument("--nonpositive", choices=["shift", "clip", "error"], default=None,
                   help="what layer scores S_i <= 0 become (allocation.nonpositive; default shift)")
    p.add_argument("--checkpoint-step", type=int, default=None,
                   help="the similarity model's checkpoint in the specialisation table (when it has several)")
    p.add_argument("--uniform-per-layer", type=int, default=None,
                   help="the uniform plan's new experts in every layer (MoE-LPR's own budget; default: LayerMoE's "
                        "total spread evenly)")
    p.add_argument("--mola-budget", choices=["authors", "layermoe_total"], default=None,
                   help="the mola plan's budget: authors (1, 3, 5, 7 new experts per quarter of depth; the default) "
                        "or layermoe_total (the 2, 4, 6, 8 shape scaled to LayerMoE's total)")
    p.add_argument("--out", required=True, help="directory receiving plan.json, plan.parquet, plan.png")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("eval-tasks", help="local lm-eval tasks (synthetic or mirrored) and their YAMLs")
    _add_option_source(p)
    p.add_argument("--corpus", nargs="+", required=True, help="results/corpus/<lang>.parquet of the kept languages")
    p.add_argument("--out", required=True, help="results/eval/tasks")
    p.set_defaults(func=cmd_eval_tasks)

    p = sub.add_parser("evaluate", help="one model on its task families and perplexity (model loaded once)")
    _add_option_source(p)
    p.add_argument("--name", help="with --config: the model to evaluate")
    p.add_argument("--families", "--family", nargs="+", required=True,
                   help="any of synthetic_blimp, synthetic_belebele, multiblimp, belebele, perplexity")
    p.add_argument("--tasks", default=None, help="results/eval/tasks")
    p.add_argument("--tokens", nargs="*", default=[], help="results/tokens/<lang>.parquet (perplexity)")
    p.add_argument("--out", required=True, help="results/eval/<model>: receives <family>.json and perplexity.parquet")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("eval-summary", help="one results table and summary.md")
    p.add_argument("--options", required=True)
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--tasks", required=True)
    p.set_defaults(func=cmd_eval_summary)

    p = sub.add_parser("report", help="the run's report: report.md, its figures and the findings checked by numbers")
    _add_option_source(p)
    p.add_argument("--corpus-summary", required=True, help="results/corpus/summary.parquet")
    p.add_argument("--tokens", nargs="+", required=True, help="results/tokens/<lang>.parquet of the kept languages")
    p.add_argument("--overlap", required=True, help="results/overlap/overlap.parquet")
    p.add_argument("--similarity", required=True, help="results/similarity/<model>.<method>.parquet")
    p.add_argument("--plan", required=True, help="results/allocation/plan.parquet")
    p.add_argument("--plan-json", required=True, help="results/allocation/plan.json (the old and new languages)")
    p.add_argument("--results", required=True, help="results/eval/results.parquet")
    p.add_argument("--tasks", required=True, help="results/eval/tasks (its tasks.json names each task's family)")
    p.add_argument("--routing-metrics", help="results/routing/metrics (without: no routing sections)")
    p.add_argument("--selected-experts", help="results/routing/selected_experts.json")
    p.add_argument("--adaptation", help="results/eval/adaptation.parquet (without: no adaptation section)")
    p.add_argument("--adapt-runs", help="results/adapt/runs.parquet")
    p.add_argument("--expansion", help="results/eval/expansion.parquet (without: no expansion section)")
    p.add_argument("--expand-runs", help="results/expand/runs.parquet")
    p.add_argument("--out", required=True, help="the report's Markdown file, e.g. results/report.md")
    p.add_argument("--figures", required=True, help="directory of its figures, findings.parquet and summary.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("report-figures", help="small copies of a run's report figures (the README's docs/figures)")
    p.add_argument("--figures", default="results/report", help="the report's figure directory (default results/report)")
    p.add_argument("--out", default="docs/figures", help="where the copies go (default docs/figures)")
    p.add_argument("--max-width", type=int, default=1000, help="largest width in pixels (default 1000)")
    p.set_defaults(func=cmd_report_figures)

    p = sub.add_parser("standins", help="local stand-ins of a paper config's hub model, corpus and tasks (rehearsals)")
    p.add_argument("--configfile", required=True, help="the paper config whose inputs to stand in for")
    p.add_argument("--layers", type=int, required=True, help="decoder layers of the stand-in model (the depth cut)")
    p.add_argument("--out", required=True, help="directory of the stand-ins (model/, corpus/, mirror/, inputs.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the task items")
    p.set_defaults(func=cmd_standins)

    p = sub.add_parser("usage", help="per-stage wall time, peak memory and output size of a run's jobs (MOELANG_USAGE_DIR)")
    p.add_argument("--dir", required=True, help="the directory MOELANG_USAGE_DIR pointed at")
    p.add_argument("--out", help="also write the per-job table as Parquet here")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("plan", help="memory per GPU, FLOPs, GPU-hours and disk of every stage of a config, before "
                                    "anything runs (no weights needed)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--configfile", help="the workflow's config YAML (e.g. config/olmoe-m7.yaml)")
    source.add_argument("--config", help="the same as --configfile")
    p.add_argument("--gpu", choices=["h100", "a100", "h200"], default="h100",
                   help="GPU whose peak FLOP/s the GPU-hours assume (default h100: H100 SXM 80GB)")
    p.add_argument("--utilisation", type=float, default=0.4,
                   help="expected model-FLOPs utilisation, the share of the GPU's peak achieved (default 0.4)")
    p.add_argument("--out", help="also write the plan as Parquet (docs/outputs.md), e.g. plan.parquet")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("options", help="describe a stage's options: fields, types, defaults, what each does")
    p.add_argument("stage", nargs="?", choices=sorted(opts.STAGE_OPTIONS), help="subcommand (default: all)")
    p.set_defaults(func=cmd_options)
    return parser


def _is_arrow_error(exc: BaseException) -> bool:
    import pyarrow as pa

    return isinstance(exc, (pa.ArrowException, OSError)) or type(exc).__module__.startswith("polars")


def _unreadable_parquet_input(args) -> str | None:
    """After a Parquet read failed: the first existing ``.parquet`` file among the command's arguments
    whose footer cannot be read (a truncated copy, a file from another tool), as a one-line message."""
    import pyarrow.parquet as pq

    for value in vars(args).values():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or not item.endswith(".parquet") or not Path(item).is_file():
                continue
            try:
                pq.read_metadata(item)
            except Exception as exc:  # noqa: BLE001 - any failure to read the footer means the same
                reason = str(exc).split(". ")[0].strip().rstrip(".")
                return (f"'{item}' is not a readable Parquet file ({reason}); delete it and run the step that "
                        f"writes it again (Snakemake redoes a missing input)")
    return None


def end_distributed() -> None:
    """Tear down the process group a torchrun job started (nothing in a single process, and no torch
    import: the data stages' image has none). Left to the interpreter's exit, gloo's threads can still
    be running when the runtime is torn down: the process then aborts ("terminate called without an
    active exception") after its outputs were written, and the job fails for nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import time

    from moelang.usage import record_usage

    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    status = 1
    try:
        status = _run(args)
    finally:
        end_distributed()
        subcommand = next(a for a in argv if not a.startswith("-"))  # ("options" has its own "stage")
        record_usage(subcommand, argv, started, status == 0)  # with MOELANG_USAGE_DIR only
    return status


def _run(args) -> int:
    from moelang.io import setup_logging

    setup_logging(args.verbose)
    try:
        try:
            args.func(args)
        except Exception as exc:  # a corrupt input file is the user's to fix, not a bug: name it
            corrupt = _unreadable_parquet_input(args) if _is_arrow_error(exc) else None
            if corrupt is None:
                raise
            raise MoelangError(corrupt) from None
    except MoelangError as exc:
        print(f"moelang: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moelang: interrupted; outputs of the unfinished step were not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

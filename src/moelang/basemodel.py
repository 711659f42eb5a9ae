"""Stage: the base model and its continual pre-training (CPT) checkpoints.

On a cluster the base model is a hub id (the paper's ``allenai/OLMoE-1B-7B-0924``) and nothing is
pre-trained. In the embedded default an **English-centric** tiny MoE of the OLMoE family is trained
from scratch on the base language's train split (``model.pretrain``), as a real English-centric
model is, and then **continually pre-trained** on a balanced mix of the kept high-resource
languages (``model.cpt``). CPT keeps ``n_checkpoints`` evenly spaced exports, step 0 being the
English model itself: the routing-dynamics analysis compares them.

Outputs
-------
``results/models/base/``
    ``save_pretrained`` directory (safetensors) with the tokenizer, ``train_log.parquet``
    (:data:`moelang.train.LOG_SCHEMA`) and the run's record ``moelang_run.json``
    (:func:`moelang.registry.write_run_record`).
``results/models/cpt/step-{N}/``
    one ``save_pretrained`` directory per kept checkpoint, with the tokenizer and ``moelang_run.json``.
``results/models/cpt/train_log.parquet``
    the CPT step log.
Training state for resuming lives in ``results/state/<run>/`` (not an output: Snakemake would delete
it with a failed job), with the exports staged in it until the run completes: then they are put into
the outputs, and only after that is the state removed (:func:`moelang.train.publish`), so a job killed
at any point resumes without training again what it had trained. The state belongs to its inputs
(start model, tokenizer, token files, trainable set; :func:`moelang.train.run_fingerprint`): after a
change of any of them it is discarded and training starts over. One run at a time writes a state
(``results/state/<run>.lock``); under torchrun the workers die with their launcher.
"""

from __future__ import annotations

from pathlib import Path

from moelang.io import log, write_table
from moelang.models import build_config, init_model, load_model
from moelang.models.methods import FullTraining
from moelang.registry import write_run_record
from moelang.options import CptOptions, PretrainOptions
from moelang.train import (
    PackedStream,
    TrainSettings,
    exclusive_state,
    export_model,
    publish,
    staged_path,
    train,
    tree_digest,
)


def _is_main_process() -> bool:
    """True in a single process, and in the first of several (accelerate launch / torchrun)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _settings(options: PretrainOptions | CptOptions, mixture: dict[str, float]) -> TrainSettings:
    return options.train.replace(seed=options.seed, mixture=mixture)


def pretrain_base(token_file: str | Path, tokenizer_dir: str | Path, options: PretrainOptions | dict, out_dir: str | Path,
                  state_dir: str | Path) -> dict:
    """Train the English-centric base model from scratch and export it."""
    options = PretrainOptions.coerce(options)
    from transformers import AutoTokenizer

    with exclusive_state(state_dir):  # before any expensive work: a second run on this state stops here
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        config = build_config(options.base["architecture"], tokenizer)
        model = init_model(config, seed=options.seed, experts_implementation=options.experts_implementation)
        lang = options.language
        settings = _settings(options, {lang: 1.0})
        stream = PackedStream({lang: token_file}, {lang: 1.0}, settings.seq_len, tokenizer.eos_token_id, settings.seed)
        log.info("pretrain: %s model, %.2fM parameters, %d steps on '%s'", config.model_type,
                 sum(p.numel() for p in model.parameters()) / 1e6, settings.steps, lang)
        # Exported from inside the run, at its last step: under FSDP only the engine can gather the
        # sharded weights. The log is complete only afterwards; it joins the staged export, which is
        # then published.
        staged = staged_path(state_dir, "model")
        result = train(model, stream, settings, state_dir, inputs={"tokenizer": tree_digest(tokenizer_dir)},
                       export_steps={settings.steps: lambda m, sd: export_model(m, tokenizer, staged, state_dict=sd)},
                       method=FullTraining())
        if _is_main_process():
            write_table(result.log_table(), staged / "train_log.parquet")
            write_run_record(staged, "pretrain", result.parameters, settings.steps, result.tokens_at(settings.steps))
            publish(state_dir, {"model": out_dir})
    log.info("pretrain: done, final loss %.3f, %d tokens in %.0f s", result.final_loss, result.tokens, result.seconds)
    return {"final_loss": result.final_loss, "tokens": result.tokens}


def _source(base: str | Path, revision: str | None) -> dict[str, str]:
    """The start model's origin for the training state's fingerprint (its weights and config are
    fingerprinted by the engine): a local directory's other files (tokenizer, generation config),
    or a hub id with the revision asked for and the commit it resolved to."""
    if Path(base).is_dir():
        return {"tokenizer and other files of the start model": tree_digest(base, skip_suffixes=(".safetensors", ".bin", ".parquet"))}
    return {"start model hub id": f"{base}@{revision or 'default branch'} (commit {_hub_commit(base, revision)})"}


def _hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub revision resolved to when the model was loaded: the name of its snapshot in
    the local hub cache (a branch name such as ``main`` moves; a commit names the files exactly)."""
    from transformers.utils.hub import cached_file

    try:
        path = Path(cached_file(str(repo_id), "config.json", revision=revision))
    except Exception:  # the fingerprint still has the weights and config: the loaded model
        return "unknown"
    return path.parent.name if path.parent.parent.name == "snapshots" else "unknown"


def continual_pretrain(base: str | Path, token_files: dict[str, str | Path], options: CptOptions | dict, out_root: str | Path,
                       state_dir: str | Path) -> dict:
    """Continue pre-training ``base`` on a balanced mix of ``token_files``; export the checkpoints."""
    options = CptOptions.coerce(options)
    from transformers import AutoTokenizer

    out_root = Path(out_root)
    base_spec = options.base
    revision = base_spec.get("revision") if base_spec.get("type") == "pretrained" else None
    trust = bool(base_spec.get("trust_remote_code", False))
    with exclusive_state(state_dir):  # before any expensive work: a second run on this state stops here
        tokenizer = AutoTokenizer.from_pretrained(str(base), revision=revision, trust_remote_code=trust)
        # Loaded on the CPU: the training engine places it (each process's own GPU under DDP; under FSDP
        # each process moves only its shard), whereas loading onto "cuda" would put every process's
        # whole copy on the first GPU.
        model = load_model(base, revision=revision, dtype=options.dtype, device="cpu", trust_remote_code=trust,
                           experts_implementation=options.experts_implementation)
        mixture = {lang: 1.0 for lang in token_files}
        settings = _settings(options, mixture)
        stream = PackedStream(token_files, mixture, settings.seq_len, tokenizer.eos_token_id, settings.seed)
        # Exports are staged in the training state, not in the outputs: if the job is killed, Snakemake
        # deletes its outputs, and a resumed run cannot re-create an export of a step before its checkpoint.
        names = {step: f"step-{step}" for step in options.steps}
        exports = {step: (lambda m, sd, name=name: export_model(m, tokenizer, staged_path(state_dir, name),
                                                                state_dict=sd))
                   for step, name in names.items()}
        log.info("cpt: %s on %s, %d steps, checkpoints at %s", base, ", ".join(sorted(token_files)), settings.steps,
                 options.steps)
        result = train(model, stream, settings, state_dir, inputs=_source(base, revision), export_steps=exports,
                       method=FullTraining())
        if not _is_main_process():
            return {"final_loss": result.final_loss, "tokens": result.tokens}
        write_table(result.log_table(), staged_path(state_dir, "train_log.parquet"))
        for step, name in names.items():
            write_run_record(staged_path(state_dir, name), "cpt", result.parameters, step, result.tokens_at(step))
        publish(state_dir, {name: out_root / name for name in names.values()}
                | {"train_log.parquet": out_root / "train_log.parquet"})
    log.info("cpt: done, final loss %.3f, %d tokens in %.0f s", result.final_loss, result.tokens, result.seconds)
    return {"final_loss": result.final_loss, "tokens": result.tokens}

# moelang: one Snakemake DAG from text to results. Run it with `make run` (README), or
#   snakemake --workflow-profile workflow/profiles/default --configfile config/config.yaml
#   snakemake --profile workflow/profiles/slurm --configfile config/olmoe-m7.yaml      (SLURM)
# Every stage is a rule in workflow/rules/<stage>.smk that calls `python -m moelang <stage>`.
import json
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version, validate

from moelang import config as mcfg
from moelang.errors import ConfigError

min_version("9.0")

# Without --configfile the embedded default runs; with it, only the user's file counts (no silent
# merge with the default's keys).
if not config:
    configfile: "config/config.yaml"

# Our own check first: it names the offending key in one line, for the schema and for what the config
# points to (local corpus files, model references, architecture fields, languages; config/README.md),
# before any job. Then Snakemake's validator, which accepts whatever ours accepts and fills the same defaults.
try:
    mcfg.validate(config)
except ConfigError as error:
    sys.stderr.write(f"moelang: error: {error}\n")
    raise SystemExit(2)
validate(config, "workflow/schemas/config.schema.yaml")

# Jobs run the moelang of the Python that runs Snakemake (the project's .venv), not whatever
# `python` comes first on the caller's PATH. Not with --sdm apptainer: there every job runs the
# moelang installed in its stage's image (containers/), and the host venv's python, a link to a
# host interpreter, must not come first on the PATH a job takes into its container.
if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
    # A missing image fails every job of its family; say why once, before any job starts.
    for problem in mcfg.missing_container_images(config):
        sys.stderr.write(f"moelang: warning: {problem}\n")
else:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
MOELANG = "python -m moelang"
LANGUAGES = mcfg.all_languages(config)


wildcard_constraints:
    lang="[a-z]{2,3}",


def kept_languages(wildcards=None):
    """Languages whose corpus is big enough (decided by the corpus_summary checkpoint)."""
    with open(checkpoints.corpus_summary.get().output.languages, encoding="utf-8") as f:
        return json.load(f)["kept"]


include: "workflow/rules/corpus.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/overlap.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/routing.smk"
include: "workflow/rules/similarity.smk"
include: "workflow/rules/evaluate.smk"


def model_targets():
    targets = ["results/models/base"] if BASE_MODEL["type"] == "train" else []
    if config["model"]["cpt"]["enabled"]:
        targets += [f"results/models/cpt/step-{step}" for step in CPT_STEPS] + ["results/models/cpt/train_log.parquet"]
    return targets


rule all:
    default_target: True
    input:
        "results/corpus/summary.parquet",
        "results/corpus/parallel.parquet",
        lambda w: expand("results/tokens/{lang}.parquet", lang=kept_languages()),
        "results/overlap/overlap.parquet",
        model_targets(),
        "results/routing/selected_experts.json",
        "results/allocation/plan.json",
        "results/eval/results.parquet",

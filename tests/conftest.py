import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tiny end-to-end configs (the Snakemake catalog's .test/config-<name>.yaml) and their data files
TEST_CONFIGS = REPO / ".test"

# Tests never reach a hub, on any machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def repo() -> Path:
    return REPO


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def copy_test_config(name: str, work: Path, dest: str = "config.yaml") -> Path:
    """``.test/config-<name>.yaml`` copied into the work directory ``work`` as ``dest``, with the data
    files it names (relative to the working directory, ``data/...``) copied into ``work/data``: the
    tests run Snakemake in ``work`` the way a user runs ``snakemake --directory .test``."""
    shutil.copytree(TEST_CONFIGS / "data", work / "data", dirs_exist_ok=True)
    path = work / dest
    shutil.copyfile(TEST_CONFIGS / f"config-{name}.yaml", path)
    return path


def base_options(source: dict, **overrides) -> dict:
    """corpus_options() of a config whose only difference is ``source`` (and ``overrides``)."""
    from moelang import config as cfg

    config = cfg.validate({"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}},
                           "allocation": {"new_experts": 4}, "corpus": {"default_source": source, **overrides}})
    return cfg.corpus_options(config, "es")

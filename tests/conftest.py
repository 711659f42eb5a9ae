import os
import shutil
import subprocess
import sys
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


# --------------------------------------------------------------------------------------------------
# The tiny end-to-end run, shared by the test files that read a finished run
# --------------------------------------------------------------------------------------------------

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The workflow's Snakemake in ``workdir`` with its ``config.yaml`` (2 cores), output captured."""
    return subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir), "--cores", "2",
         "--configfile", str(workdir / "config.yaml"), *extra],
        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole DAG of ``.test/config-tiny.yaml`` (about 4 minutes), run once per session: the work
    directory (its config is ``config.yaml``) and Snakemake's completed process."""
    work = tmp_path_factory.mktemp("dag")
    copy_test_config("tiny", work)
    proc = snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


@pytest.fixture
def bf16_process():
    """accelerate keeps one mixed-precision setting per process (a job trains in one dtype): the other
    tests' fp32 state is cleared before this test and after it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts import their neighbour ``_results``, so
    benchmarks/ is on the path while it loads)."""
    import importlib.util
    import sys

    folder = str(REPO / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)

"""Crash-safe output writing and small shared helpers.

Every output is first written under a temporary name in the destination directory and then renamed
into place, so a killed job never leaves a half-written file that looks finished (and a previous,
complete output is only replaced once the new one is whole).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("moelang")


def clear_leftovers(path: str | Path) -> list[Path]:
    """Remove what an earlier, killed writer of ``path`` left beside it (``.NAME.tmp-PID`` and
    ``.NAME.old-PID`` of another process) and return what was removed.

    A SIGKILL runs no ``finally``, so a killed job's temporary files stay; only one job writes a
    given output at a time (Snakemake's rule), so every such sibling not of this process is dead."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    mine = {prefix + str(os.getpid()) for prefix in prefixes}
    for stale in path.parent.iterdir():
        if not stale.name.startswith(prefixes) or stale.name in mine:
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    if removed:
        log.info("removed %d leftover(s) of a killed earlier run beside %s", len(removed), path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory output (for example a tokenizer or model directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_table(table: pa.Table, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
            f.write("\n")


def save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr with the project's defaults (``TQDM_DISABLE=1`` turns bars off)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)

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


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def setup_logging(verbose: bool = False) -> None:
    if not _stderr_is_terminal():
        # the libraries' own bars (writing model shards, loading weights, dataset maps, lm-eval's
        # requests) redraw with a carriage return: in a log file each would be a line of control
        # characters. tqdm reads TQDM_DISABLE for every bar; the hub's flag at import, which comes later.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def progress(iterable=None, *, log_lines: bool = True, **kwargs):
    """Progress of a long step: a tqdm bar on a terminal; elsewhere (a log file, a pipe to ``tee``, a
    SLURM job's output), or with ``TQDM_DISABLE=1``, log lines (:class:`LogProgress`) instead of a
    carriage-return redraw per update that would fill the log.

    ``log_lines=False``: nothing off a terminal (for loops that log their own lines). ``disable=True``
    turns both off. Takes tqdm's keyword arguments either way."""
    disabled = bool(kwargs.get("disable"))
    bars_off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    if not disabled and not bars_off and _stderr_is_terminal():
        from tqdm.auto import tqdm

        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("mininterval", 0.5)
        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, disable=disabled or not log_lines, total=kwargs.get("total"),
                       initial=kwargs.get("initial", 0), desc=kwargs.get("desc", ""), unit=kwargs.get("unit", " it"))


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """The part of tqdm's interface the stages use (iteration, ``update``, ``set_postfix``, ``close``),
    reported as log lines: at a 10% step of ``total`` at least ``MIN_GAP_S`` after the last line, or
    every ``INTERVAL_S`` without a total; at the end a line with the time taken, unless the loop was
    shorter than ``MIN_GAP_S`` and said nothing before (a short loop is not worth a line)."""

    STEP_FRACTION = 0.1
    MIN_GAP_S = 5.0
    INTERVAL_S = 30.0

    def __init__(self, iterable=None, *, disable: bool = False, total: int | None = None, initial: int = 0,
                 desc: str = "", unit: str = " it", clock=None):
        import time

        self._clock = clock or time.monotonic  # seconds; a test passes its own
        self.iterable = iterable
        self.disable = disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.n = initial
        self.desc = desc or "progress"
        self.unit = unit
        self.postfix = ""
        self._start = self._clock()
        self._start_n = initial
        self._last_report = self._start
        self._reported = False
        self._next_fraction = self._fraction_after(initial)
        self._closed = False

    def _fraction_after(self, n: int) -> float:
        if not self.total:
            return float("inf")
        done = n / self.total
        return (int(done / self.STEP_FRACTION + 1e-9) + 1) * self.STEP_FRACTION

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self._clock()
        if self.total:
            if self.n / self.total + 1e-9 >= self._next_fraction and self.n < self.total:
                if now - self._last_report >= self.MIN_GAP_S:
                    self._report(now)
                self._next_fraction = self._fraction_after(self.n)
        elif now - self._last_report >= self.INTERVAL_S:
            self._report(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def _report(self, now: float) -> None:
        self._last_report = now
        self._reported = True
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = f", about {(self.total - self.n) / rate:.0f} s left" if rate > 0 else ""
            where = f"{self.n}/{self.total}{self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            left, where = "", f"{self.n}{self.unit}"
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s, %.1f%s/s%s%s", self.desc, where, rate, self.unit, left, extra)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = self._clock() - self._start
        if not self.disable and self.n > self._start_n and (self._reported or elapsed >= self.MIN_GAP_S):
            extra = f", {self.postfix}" if self.postfix else ""
            log.info("%s: %d%s done in %.1f s%s", self.desc, self.n, self.unit, elapsed, extra)

"""What each job of a run used: wall time, peak memory and output size, per stage (rehearsals).

With ``MOELANG_USAGE_DIR`` set, every ``moelang`` command writes one JSON record there when it ends
(:func:`record_usage`): the subcommand, its arguments, the wall time, the process's peak resident
memory (the kernel's high-water mark, ``ru_maxrss``: exact, not sampled) and, under torchrun, the
process's rank. :func:`usage_table` gathers them into a table, one row per job (a torchrun job's
processes summed), with the size on disk of what the job wrote under its ``--out*`` arguments (files
last written while it ran).

``usage.parquet``, :data:`USAGE_SCHEMA`: ``stage`` string (the subcommand), ``job`` string (its
arguments but the JSON options), ``processes`` int64, ``wall_s`` float64, ``peak_rss_mib`` float64 (the
largest process's peak), ``total_peak_rss_mib`` float64 (summed over the job's processes), ``output_mib``
float64, ``ok`` bool (the command's exit status was 0).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pyarrow as pa

USAGE_ENV = "MOELANG_USAGE_DIR"
USAGE_SCHEMA = pa.schema([("stage", pa.string()), ("job", pa.string()), ("processes", pa.int64()),
                          ("wall_s", pa.float64()), ("peak_rss_mib", pa.float64()),
                          ("total_peak_rss_mib", pa.float64()), ("output_mib", pa.float64()), ("ok", pa.bool_())])


def record_usage(stage: str, argv: list[str], started: float, ok: bool) -> None:
    """One JSON record of this process in ``$MOELANG_USAGE_DIR`` (nothing without it)."""
    directory = os.environ.get(USAGE_ENV)
    if not directory:
        return
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    record = {"stage": stage, "argv": argv, "cwd": os.getcwd(), "wall_s": time.time() - started,
              "peak_rss_mib": peak_kib / 1024, "rank": int(os.environ.get("RANK", 0)),
              "job_key": os.environ.get("TORCHELASTIC_RUN_ID", "") + str(os.getppid() if "RANK" in os.environ
                                                                           else os.getpid()),
              "ok": ok, "ended": time.time()}
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{stage}-{os.getpid()}-{int(started * 1000)}.json"
    tmp = target.with_name("." + target.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.rename(target)


def _outputs(argv: list[str], cwd: str) -> list[Path]:
    paths = []
    for flag, value in zip(argv, argv[1:]):
        if flag.startswith("--out"):
            path = Path(value) if Path(value).is_absolute() else Path(cwd) / value
            paths.append(path)
    return paths


def _size_mib(path: Path, since: float, until: float) -> float:
    """MiB of the files under ``path`` last written between ``since`` and ``until``: what the job
    wrote, also where jobs share an output root (the adaptation's ``--out results/adapt``)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    sizes = {}  # by inode: the selection's hard links (adapt's selected/) are no second copy on disk
    for file in files:
        stat = file.stat()
        if since - 1 <= stat.st_mtime <= until + 1:
            sizes[stat.st_dev, stat.st_ino] = stat.st_size
    return sum(sizes.values()) / 2**20


def usage_table(directory: str | Path) -> pa.Table:
    """One row per job of the records in ``directory`` (see the module docstring), in the order the
    jobs ended."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(directory).glob("*.json"))]
    jobs: dict[tuple, list[dict]] = {}
    for record in records:
        jobs.setdefault((record["stage"], record["job_key"]), []).append(record)
    rows = []
    for (stage, _), group in sorted(jobs.items(), key=lambda item: max(r["ended"] for r in item[1])):
        first = min(group, key=lambda r: r["rank"])
        outputs = _outputs(first["argv"], first["cwd"])
        # the job's arguments without its JSON options: its language, method, variant, stage and outputs
        job = " ".join(a for a in first["argv"][1:] if not a.startswith("{") and a != "--options")[:160]
        rows.append({"stage": stage, "job": job, "processes": len(group),
                     "wall_s": max(r["wall_s"] for r in group),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in group),
                     "total_peak_rss_mib": sum(r["peak_rss_mib"] for r in group),
                     "output_mib": sum(_size_mib(p, first["ended"] - first["wall_s"], max(r["ended"] for r in group))
                                       for p in outputs), "ok": all(r["ok"] for r in group)})
    return pa.Table.from_pylist(rows, schema=USAGE_SCHEMA)


def markdown(table: pa.Table) -> str:
    """The table by stage: jobs, the longest job's wall time, the largest peak RSS, the output size."""
    import polars as pl

    by_stage = (pl.from_arrow(table).group_by("stage", maintain_order=True)
                .agg(pl.len().alias("jobs"), pl.col("wall_s").sum().alias("wall_s"),
                     pl.col("wall_s").max().alias("longest_s"), pl.col("peak_rss_mib").max().alias("peak_rss_mib"),
                     pl.col("processes").max().alias("processes"), pl.col("output_mib").sum().alias("output_mib"),
                     pl.col("ok").all().alias("ok")))
    lines = ["| stage | jobs | processes | wall (s, all jobs) | longest job (s) | peak RSS (MiB) | output (MiB) | ok |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in by_stage.iter_rows(named=True):
        lines.append(f"| {r['stage']} | {r['jobs']} | {r['processes']} | {r['wall_s']:.0f} | {r['longest_s']:.0f} | "
                     f"{r['peak_rss_mib']:,.0f} | {r['output_mib']:,.1f} | {'yes' if r['ok'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main_usage(directory: str, out: str | None) -> None:
    from moelang.io import write_table

    table = usage_table(directory)
    if out:
        write_table(table, out)
    sys.stdout.write(markdown(table))

"""Shared by the benchmark scripts: the ``--quick`` and ``--out`` options, and where results go.

Every benchmark has two forms. The full form (no ``--quick``) measures: it writes its JSON to
``benchmarks/results/<name>.json`` and its section of ``RESULTS.md`` (the committed results; ``make
bench`` runs every full form). The quick form (``--quick``) runs the same code on a toy size with a
couple of repeats, so that the test suite (``tests/test_benchmarks.py``) sees a benchmark break
before anyone needs its numbers; its numbers measure nothing, and it never writes into
``benchmarks/results`` or ``RESULTS.md``: its JSON (the same keys as the full form's) and its section go
to ``--out`` or a new temporary directory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"


def update_results_md(name: str, section: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (or append it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS_MD.read_text(encoding="utf-8") if RESULTS_MD.exists() else "# Benchmark results\n"
    block = f"{start}\n{section.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text, encoding="utf-8")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--out``, the same in every benchmark."""
    parser.add_argument("--quick", action="store_true",
                        help="a toy size and a couple of repeats: the same code as the full form, to check that it "
                             "runs and writes its JSON (the test suite runs this); the numbers measure nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for <name>.json and <name>.md (default: the full form writes "
                             "benchmarks/results/<name>.json and its section of RESULTS.md; --quick, a new "
                             "temporary directory)")


def output_dir(args: argparse.Namespace) -> Path:
    """Where this run's results go; checked before anything runs. Exits with one line when a quick run
    is pointed at the committed results."""
    if args.out is None:
        return Path(tempfile.mkdtemp(prefix="moelang-bench-")) if args.quick else RESULTS_DIR
    out = args.out.resolve()
    if args.quick and out == RESULTS_DIR:
        sys.exit(f"benchmark: --quick never writes into {RESULTS_DIR} (the full forms' committed results): "
                 f"give --out another directory, or leave --out out for a temporary one")
    return out


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How this run was started, as a user would type it (``--out`` left out: where results went is
    not how they were measured)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            shown.append(arg)
    return " ".join([".venv/bin/python", f"benchmarks/{script}", *shown])


def save_results(name: str, result: dict, section: str, out: Path, indent: int = 2) -> Path:
    """``out/<name>.json``; the section goes into RESULTS.md when ``out`` is the committed results'
    directory, else next to the JSON as ``<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=indent) + "\n", encoding="utf-8")
    if out.resolve() == RESULTS_DIR:
        update_results_md(name, section)
        print(f"wrote {path} and the {name} section of {RESULTS_MD}", flush=True)
    else:
        (out / f"{name}.md").write_text(section.strip() + "\n", encoding="utf-8")
        print(f"wrote {path} and {out / f'{name}.md'}", flush=True)
    return path

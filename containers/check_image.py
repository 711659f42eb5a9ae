"""Check an image against its pins; the definitions' %test runs it at the end of every build.

    python check_image.py --pins FILE [FILE ...] [--cuda MAJOR.MINOR] [--modules a,b,c]

Each ``name==version`` line of the pin files (``name[extra]==version`` too) must be installed in
exactly that version, a local label such as ``+cu130`` aside; ``--cuda`` is the CUDA version torch
must be built for (a CPU build slipping in fails the build, not a GPU job days later); every module
of ``--modules`` must import. Prints one line per problem and exits 1 if there is any.
Standard library only: it runs before anything else is trusted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9_,.-]+\])?==([^\s;#]+)$")


def read_pins(path: str) -> dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = PIN.match(line)
            if match is None:
                raise SystemExit(f"check_image: {path}:{number}: '{line}' is not an exact pin (name==version)")
            pins[match.group(1)] = match.group(2)
    return pins


def problems(pins: dict[str, str], cuda: str | None, modules: list[str]) -> list[str]:
    found = []
    for name, wanted in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name}: not installed (pinned {wanted})")
            continue
        if installed.split("+", 1)[0] != wanted:
            found.append(f"{name}: {installed} installed, pinned {wanted}")
    if cuda is not None:
        import torch

        built = torch.version.cuda
        if built is None or built.split(".")[:2] != cuda.split(".")[:2]:
            found.append(f"torch {torch.__version__}: built for CUDA {built}, expected CUDA {cuda}")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure to import is a broken image, whatever its type
            found.append(f"import {module}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pins", nargs="+", required=True, help="files of name==version lines")
    parser.add_argument("--cuda", default=None, help="CUDA version torch must be built for, e.g. 13.0")
    parser.add_argument("--modules", default="", help="comma-separated modules that must import")
    args = parser.parse_args(argv)
    pins = {}
    for path in args.pins:
        pins.update(read_pins(path))
    found = problems(pins, args.cuda, [m for m in args.modules.split(",") if m])
    for line in found:
        print(f"check_image: {line}", file=sys.stderr)
    if not found:
        print(f"check_image: {len(pins)} pins installed as pinned")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

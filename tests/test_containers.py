"""The Apptainer images of the stage families (containers/), checked without Apptainer.

Apptainer is not on the development machine, so the images are never built here. What is checked
is everything that decides whether they will be right: every rule runs in a family's image, every
definition starts from a base pinned by digest, pins exactly the versions of pyproject.toml (and
requirements/catalogs.txt), and pins every distribution its stages import (found from the code:
rule -> CLI subcommand -> the moelang modules it imports -> their third-party imports -> those
distributions' own requirements), the wheel the images install carries every file the package
reads, the checker the images run at build time works, and containers/build.sh behaves.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from moelang import config as cfg
from moelang.errors import ConfigError, MoelangError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CONTAINERS = REPO / "containers"
DIGEST_FROM = re.compile(r"^\S+@sha256:[0-9a-f]{64}$")
# name[extras]==version anywhere in a script (quoted or not), as pip reads it.
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9_,.-]+\])?==([0-9][^\s'\"\\;]*)")
# Modules whose import needs an optional extra of their distribution (lm-eval's HFLM backend imports
# torch, transformers and accelerate, which lm-eval only requires with [hf]).
IMPORT_EXTRAS = {"lm_eval.models.huggingface": ("lm-eval", "hf")}


# --- the workflow's rules ----------------------------------------------------------------------

@cache
def smk_rules() -> dict[str, str]:
    """rule name -> the text of its block, for every rule and checkpoint of workflow/rules/*.smk
    (whatever branch of an `if` defines it; rules/common.smk holds functions, no rule)."""
    rules = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text(encoding="utf-8")
        heads = list(re.finditer(r"^[ \t]*(?:rule|checkpoint)\s+(\w+)\s*:", text, re.M))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            assert head.group(1) not in rules, f"rule {head.group(1)} is defined twice"
            rules[head.group(1)] = text[head.end():end]
    return rules


def rule_subcommand(rule: str) -> str:
    match = re.search(r"(?:python -m moelang|\{params\.launcher\})\s+([a-z][a-z-]*)", smk_rules()[rule])
    assert match, f"rule {rule}: no `python -m moelang <stage>` command in its shell"
    return match.group(1)


def test_the_rule_lists_agree():
    rules = set(smk_rules())
    assert len(rules) >= 16  # the parser found the workflow, not an empty directory
    assert rules == set(cfg.RULE_CONTAINER_FAMILY), "workflow/rules/*.smk and RULE_CONTAINER_FAMILY differ"
    assert set(cfg.RULE_CONTAINER_FAMILY) == set(cfg.STAGE_RESOURCES)
    assert set(cfg.RULE_CONTAINER_FAMILY.values()) == set(cfg.CONTAINER_FAMILIES)


@pytest.mark.parametrize("rule", sorted(smk_rules()))
def test_every_rule_runs_in_its_family_image(rule):
    block = smk_rules()[rule]
    named = re.findall(r"^\s*container:\s*\n?\s*mcfg\.rule_container\(config,\s*\"(\w+)\"\)", block, re.M)
    assert named == [rule], (f"rule {rule} needs `container:` with mcfg.rule_container(config, \"{rule}\") "
                             f"(found {named})")


# --- the definitions ---------------------------------------------------------------------------

@cache
def definition(family: str) -> tuple[dict[str, str], dict[str, str]]:
    """(header, sections) of containers/<family>.def, split the way Apptainer splits it: a line
    whose first word starts with % opens a section."""
    header, sections, current = {}, {}, None
    for line in (CONTAINERS / f"{family}.def").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            current = words[0][1:].lower()
            assert current not in sections, f"{family}.def: section %{current} twice"
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
        elif words and not words[0].startswith("#"):
            key, sep, value = line.split("#")[0].partition(":")
            assert sep, f"{family}.def: header line without a key: {line!r}"
            assert key.strip().lower() not in header, f"{family}.def: header {key.strip()} twice"
            header[key.strip().lower()] = value.strip()
    return header, sections


def shell_commands(script: str) -> list[str]:
    """The script's commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", script)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def def_pins(family: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """canonical name -> (version, extras) of every pin in the definition's %post."""
    pins = {}
    for name, extras, version in PIN.findall(definition(family)[1]["post"]):
        key = canonicalize_name(name)
        entry = (version, tuple(sorted(extras.strip("[]").split(","))) if extras else ())
        assert pins.get(key, entry) == entry, f"{family}.def pins {name} twice, differently"
        pins[key] = entry
    return pins


@cache
def project_pins() -> dict[str, str]:
    """canonical name -> version of pyproject.toml's dependencies and requirements/catalogs.txt."""
    pins = {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    catalogs = (REPO / "requirements" / "catalogs.txt").read_text(encoding="utf-8").splitlines()
    for line in project["dependencies"] + [l for l in catalogs if l.strip() and not l.startswith("#")]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line}: not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def catalog_names() -> set[str]:
    lines = (REPO / "requirements" / "catalogs.txt").read_text(encoding="utf-8").splitlines()
    return {canonicalize_name(Requirement(l).name) for l in lines if l.strip() and not l.startswith("#")}


@pytest.mark.parametrize("family", cfg.CONTAINER_FAMILIES)
def test_base_image_is_pinned_by_digest(family):
    header, _ = definition(family)
    assert header.get("bootstrap") == "docker"
    assert DIGEST_FROM.match(header.get("from", "")), f"{family}.def: From must be <image>@sha256:<64 hex>"


@pytest.mark.parametrize("family", cfg.CONTAINER_FAMILIES)
def test_definition_pins_exactly_the_project_versions(family):
    pins = def_pins(family)
    assert len(pins) >= 10
    project = project_pins()
    for name, (version, _) in pins.items():
        assert name in project, f"{family}.def pins {name}, which pyproject.toml / catalogs.txt do not"
        assert version == project[name], f"{family}.def: {name}=={version}, pyproject.toml: {project[name]}"
    # Nothing is installed unpinned: every pip install names pins, requirement files written by the
    # definition itself, or moelang's own sources.
    post = definition(family)[1]["post"]
    written = set(re.findall(r">\s*(\S+\.txt)", post))
    for command in shell_commands(post):
        if "pip install" not in command:
            continue
        words = command.split("pip install", 1)[1].split()
        i = 0
        while i < len(words):
            word = words[i].strip("'\"")
            if word in ("-r", "--index-url", "--extra-index-url"):
                value = words[i + 1]
                if word == "-r":
                    assert value in written, f"{family}.def: -r {value} is not a file the definition writes"
                else:
                    assert value.startswith("https://"), f"{family}.def: {word} {value}"
                i += 2
                continue
            assert word.startswith("-") or word == "/opt/moelang" or PIN.fullmatch(word), (
                f"{family}.def installs {word!r} without an exact version")
            i += 1


@pytest.mark.parametrize("family", cfg.CONTAINER_FAMILIES)
def test_definition_installs_moelang_for_any_user(family):
    _, sections = definition(family)
    files = {tuple(line.split()) for line in sections["files"].splitlines() if line.split()}
    for source in ("pyproject.toml", "README.md", "src"):  # README.md: pyproject's readme, needed to build
        assert (source, f"/opt/moelang/{source}") in files, f"{family}.def: %files lacks {source}"
    assert ("containers/check_image.py", "/opt/moelang-image/check_image.py") in files
    assert any(re.search(r"pip install --no-deps /opt/moelang$", c) for c in shell_commands(sections["post"]))
    assert "python -m moelang" in sections["runscript"]
    environment = sections["environment"]
    # Caches: the caller's value wins, the default lies outside HOME (Snakemake sets --home to the
    # working directory, and the image is read-only).
    for variable in ("XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR"):
        assert re.search(rf'export {variable}="\$\{{{variable}:-', environment), f"{family}.def: {variable}"
    assert not re.search(r"\$\{?HOME\b|~/", environment), f"{family}.def: %environment depends on HOME"
    assert "export PYTHONNOUSERSITE=1" in environment
    # %test checks the image against the very pin files %post installed from.
    test = " ".join(shell_commands(sections["test"]))
    installed_from = re.findall(r"pip install .*-r (\S+)", "\n".join(shell_commands(sections["post"])))
    assert "requirements.txt" in installed_from
    for name in installed_from:
        assert f"/opt/moelang-image/{name}" in test, f"{family}.def: %test does not check {name}"


@pytest.mark.parametrize("family", ["model", "eval"])
def test_torch_is_the_cuda_build_of_the_pinned_version(family):
    _, sections = definition(family)
    torch_install = [c for c in shell_commands(sections["post"]) if "download.pytorch.org" in c]
    assert len(torch_install) == 1
    index = re.search(r"--index-url https://download\.pytorch\.org/whl/cu(\d+)(\d)\s", torch_install[0])
    assert index, "torch must come from the PyTorch CUDA index (--index-url .../whl/cuXYZ)"
    assert re.search(r"\btorch==" + re.escape(project_pins()["torch"]) + r"$", torch_install[0])
    cuda = re.search(r"--cuda (\d+)\.(\d+)\b", sections["test"])
    assert cuda and cuda.groups() == index.groups(), "%test must check the CUDA version of the index torch came from"


def test_the_data_image_has_no_torch():
    assert "torch" not in def_pins("data")


# --- what the stages import ----------------------------------------------------------------------

def imports(node: ast.AST) -> set[str]:
    """Absolute imports anywhere under ``node``, function-level ones included (conservative)."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {alias.name for alias in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            found |= {n.module} | {f"{n.module}.{alias.name}" for alias in n.names}
    return found


def moelang_module(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def cli_command_modules(subcommand: str) -> set[str]:
    """The imports that running ``moelang <subcommand>`` can reach in cli.py: the module level, the
    helpers, main(), and the one cmd_* function the subcommand calls."""
    tree = ast.parse((SRC / "moelang" / "cli.py").read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    commands, name = {}, None
    for statement in functions["build_parser"].body:
        for call in (n for n in ast.walk(statement) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
            if call.func.attr == "add_parser" and call.args and isinstance(call.args[0], ast.Constant):
                name = call.args[0].value
            elif call.func.attr == "set_defaults":
                commands[name] = next(k.value.id for k in call.keywords if k.arg == "func")
    assert subcommand in commands, f"moelang has no subcommand {subcommand}"
    found = set()
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_")):
            found |= imports(node)
    return found | imports(functions[commands[subcommand]])


def stage_imports(rule: str) -> tuple[set[str], set[str]]:
    """(moelang modules, other modules) that the rule's job can import."""
    seen, other, todo = set(), set(), list(cli_command_modules(rule_subcommand(rule)))
    while todo:
        name = todo.pop()
        if name.split(".")[0] != "moelang":
            other.add(name)
            continue
        path = moelang_module(name)
        if path is None or name in seen:  # `from moelang.x import function`: not a module
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        todo += imports(ast.parse(path.read_text(encoding="utf-8")))
    return seen, other


def distribution_closure(roots: dict[str, tuple[str, ...]]) -> set[str]:
    """The installed distributions ``roots`` (name -> extras) need, themselves included, following
    their metadata's requirements for this platform."""
    seen, todo = set(), list(roots.items())
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:  # not for this platform: no pyproject pin either
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((canonicalize_name(req.name), tuple(sorted(req.extras))))
    return {name for name, _ in seen}


@cache
def family_needs(family: str) -> tuple[set[str], dict[str, set[str]], bool]:
    """(pyproject distributions the family's stages need, extras they need, whether they read the
    gettext catalogs)."""
    top_level = importlib.metadata.packages_distributions()
    roots: dict[str, set[str]] = {}
    reads_catalogs = False
    for rule, rule_family in cfg.RULE_CONTAINER_FAMILY.items():
        if rule_family != family:
            continue
        modules, other = stage_imports(rule)
        reads_catalogs |= "moelang.catalogs" in modules
        for name in other:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            assert top in top_level, f"rule {rule} imports {top}, which no installed distribution provides"
            for dist in top_level[top]:
                roots.setdefault(canonicalize_name(dist), set())
        for module, (dist, extra) in IMPORT_EXTRAS.items():
            if module in other:
                roots.setdefault(dist, set()).add(extra)
    needed = distribution_closure({name: tuple(sorted(extras)) for name, extras in roots.items()})
    project = set(project_pins())
    return needed & project, {n: e for n, e in roots.items() if e}, reads_catalogs


@pytest.mark.parametrize("family", cfg.CONTAINER_FAMILIES)
def test_definition_pins_everything_its_stages_import(family):
    needed, extras, reads_catalogs = family_needs(family)
    assert {"numpy", "pyarrow", "jsonschema", "pyyaml"} <= needed  # the analysis reached the code
    pins = def_pins(family)
    missing = sorted(needed - set(pins))
    assert not missing, f"{family}.def lacks pins its stages need: {missing}"
    for name, wanted in extras.items():
        assert set(wanted) <= set(pins[name][1]), f"{family}.def must install {name}[{','.join(sorted(wanted))}]"
    if reads_catalogs:
        assert catalog_names() <= set(pins), f"{family}.def lacks the catalog packages the corpus stage reads"
    assert reads_catalogs == (family == "data")


def test_the_analysis_sees_the_stage_specific_packages():
    # Guards the guard: the data stages need datasets (hf sources) but no torch; the model stages
    # torch and accelerate; evaluation lm-eval with its hf extra.
    data, _, _ = family_needs("data")
    model, _, _ = family_needs("model")
    evaluation, extras, _ = family_needs("eval")
    assert {"datasets", "tokenizers", "polib"} <= data and "torch" not in data
    assert {"torch", "accelerate", "safetensors", "scipy"} <= model and "lm-eval" not in model
    assert {"lm-eval", "torch", "transformers", "accelerate"} <= evaluation and extras == {"lm-eval": {"hf"}}


# --- the image checker and the wheel ----------------------------------------------------------------

@pytest.mark.parametrize("family", cfg.CONTAINER_FAMILIES)
def test_check_image_passes_on_the_pins_and_modules_of_each_definition(family, tmp_path):
    # The development venv holds the pyproject versions (CPU torch), so each definition's pins and
    # %test module list must pass here: this runs the checker the images run, on real metadata.
    _, sections = definition(family)
    pins = tmp_path / "pins.txt"
    pins.write_text("".join(f"{n}{'[' + ','.join(e) + ']' if e else ''}=={v}\n"
                            for n, (v, e) in def_pins(family).items()), encoding="utf-8")
    modules = re.search(r"--modules (\S+)", " ".join(shell_commands(sections["test"]))).group(1)
    proc = subprocess.run([sys.executable, str(CONTAINERS / "check_image.py"), "--pins", str(pins),
                           "--modules", modules], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(def_pins(family))} pins installed as pinned" in proc.stdout


def test_check_image_reports_each_problem(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("numpy==0.0.1\nno-such-distribution==1.0\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(CONTAINERS / "check_image.py"), "--pins", str(pins),
                           "--cuda", "13.0", "--modules", "no_such_module"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4
    assert f"numpy: {importlib.metadata.version('numpy')} installed, pinned 0.0.1" in lines[0]
    assert "no-such-distribution: not installed" in lines[1]
    assert "expected CUDA 13.0" in lines[2]  # the development torch is the CPU build
    assert "import no_such_module: ModuleNotFoundError" in lines[3]


def test_the_wheel_the_images_install_ships_every_package_file(tmp_path):
    # The images install a wheel; the development venv an editable install that would hide a data
    # file missing from it (models/known_configs/*.json once was).
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(SRC / "moelang", tmp_path / "src" / "moelang",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path / "dist"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("moelang-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package_files = {p.relative_to(tmp_path / "src").as_posix()
                     for p in (tmp_path / "src" / "moelang").rglob("*") if p.is_file()}
    assert "moelang/models/known_configs/allenai--OLMoE-1B-7B-0924.json" in package_files
    assert package_files - shipped == set()


# --- containers/build.sh -------------------------------------------------------------------------

FAKE_APPTAINER = """#!/bin/sh
# Test double: logs its arguments; `build ... TARGET DEF` writes TARGET unless FAIL is set.
echo "$@" >> "$LOG"
[ -n "${FAIL:-}" ] && exit 3
for last; do :; done
target=""
for arg; do [ "$arg" = "$last" ] && break; target="$arg"; done
echo "image from $last" > "$target"
"""


def build_sh(tmp_path: Path, *families: str, apptainer: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a copy of containers/build.sh in a copy of containers/ under tmp_path, with a PATH that
    holds only the tools it uses (and a fake apptainer, or none)."""
    if not (tmp_path / "containers").exists():
        shutil.copytree(CONTAINERS, tmp_path / "containers", ignore=shutil.ignore_patterns("*.sif"))
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for tool in ("dirname", "id", "rm", "mv", "cat"):
        if not (tools / tool).exists():
            (tools / tool).symlink_to(shutil.which(tool))
    fake = tools / "apptainer"
    if apptainer and not fake.exists():
        fake.write_text(FAKE_APPTAINER, encoding="utf-8")
        fake.chmod(0o755)
    elif not apptainer and fake.exists():
        fake.unlink()
    return subprocess.run([shutil.which("bash"), str(tmp_path / "containers" / "build.sh"), *families],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tools), "LOG": str(tmp_path / "calls.log"), **env})


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def test_build_sh_without_apptainer_says_so_in_one_line(tmp_path):
    proc = build_sh(tmp_path, apptainer=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "apptainer is not on PATH" in proc.stderr
    assert not list((tmp_path / "containers").glob("*.sif"))


def test_build_sh_builds_every_family_from_the_repository_root(tmp_path):
    proc = build_sh(tmp_path)
    assert proc.returncode == 0, proc.stderr
    fakeroot = "--fakeroot " if os.getuid() != 0 else ""
    assert calls(tmp_path) == [f"build {fakeroot}containers/{f}.partial.sif containers/{f}.def"
                               for f in ("data", "model", "eval")]
    for family in ("data", "model", "eval"):  # moved into place, no partial file left
        assert (tmp_path / "containers" / f"{family}.sif").read_text() == f"image from containers/{family}.def\n"
    assert not list((tmp_path / "containers").glob("*.partial.sif"))


def test_build_sh_builds_named_families_with_extra_arguments(tmp_path):
    proc = build_sh(tmp_path, "eval", APPTAINER_BUILD_ARGS="--notest --force")
    assert proc.returncode == 0, proc.stderr
    fakeroot = "--fakeroot " if os.getuid() != 0 else ""
    assert calls(tmp_path) == [f"build {fakeroot}--notest --force containers/eval.partial.sif containers/eval.def"]
    assert [p.name for p in (tmp_path / "containers").glob("*.sif")] == ["eval.sif"]


def test_build_sh_rejects_an_unknown_family_before_building_anything(tmp_path):
    proc = build_sh(tmp_path, "data", "../evil")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "name one or more of: data, model, eval" in proc.stderr
    assert calls(tmp_path) == []


def test_build_sh_keeps_the_previous_image_when_a_build_fails(tmp_path):
    assert build_sh(tmp_path, "data").returncode == 0
    proc = build_sh(tmp_path, "data", FAIL="1")
    assert proc.returncode == 1
    assert "building containers/data.sif failed" in proc.stderr
    assert (tmp_path / "containers" / "data.sif").read_text() == "image from containers/data.def\n"
    assert not (tmp_path / "containers" / "data.partial.sif").exists()


# --- the config ----------------------------------------------------------------------------------

def minimal(**extra):
    return {"languages": {"high_resource": ["en", "es"], "targets": {"ca": "es"}}, "allocation": {"new_experts": 4},
            **extra}


def test_the_default_images_are_the_built_sif_files():
    config = cfg.validate(minimal())
    assert config["containers"] == {"data": "containers/data.sif", "model": "containers/model.sif",
                                    "eval": "containers/eval.sif"}
    assert cfg.rule_container(config, "tokenize") == "containers/data.sif"
    assert cfg.rule_container(config, "cpt") == "containers/model.sif"
    assert cfg.rule_container(config, "evaluate") == "containers/eval.sif"
    for family in cfg.CONTAINER_FAMILIES:
        assert config["containers"][family] == f"containers/{family}.sif"
        assert (CONTAINERS / f"{family}.def").is_file()


def test_an_image_can_be_a_registry_uri():
    config = cfg.validate(minimal(containers={"model": "oras://ghcr.io/lab/moelang-model:0.1.0"}))
    assert cfg.rule_container(config, "profile_routing") == "oras://ghcr.io/lab/moelang-model:0.1.0"
    assert cfg.rule_container(config, "overlap") == "containers/data.sif"  # the others keep their default


def test_unknown_rules_and_bad_images_fail_in_one_line():
    config = cfg.validate(minimal())
    with pytest.raises(MoelangError, match=r"rule 'distill' has no container family; add it to RULE_CONTAINER_FAMILY"):
        cfg.rule_container(config, "distill")
    with pytest.raises(ConfigError, match=r"config key 'containers.data'"):
        cfg.validate(minimal(containers={"data": "containers/my data.sif"}))
    with pytest.raises(ConfigError, match=r"'containers'.*'gpu' was unexpected"):
        cfg.validate(minimal(containers={"gpu": "x.sif"}))
    with pytest.raises(ConfigError, match=r"config key 'containers.eval': no image"):
        cfg.rule_container({"containers": {"data": "d.sif"}}, "eval_summary")


def test_missing_local_images_are_named_with_the_command_that_builds_them(tmp_path):
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "data.sif").write_text("image")
    config = cfg.validate(minimal(containers={"eval": "docker://ghcr.io/lab/moelang-eval:0.1.0"}))
    (problem,) = cfg.missing_container_images(config, tmp_path)
    assert problem == ("config key 'containers.model': image 'containers/model.sif' does not exist; build it with "
                       "containers/build.sh model, or set containers.model to a docker:// or oras:// URI")

"""Packaging: every library the package imports is declared in pyproject.toml, with a lower bound;
one ruff version for `make lint` and pre-commit; one CI entry point; the minimum-versions
constraints. Read from the files (syntax trees, TOML, YAML): nothing is installed or run."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "residual_lightning"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Import names that differ from their distribution's name.
IMPORT_TO_DIST = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "open_clip": "open-clip-torch",
    "skdim": "scikit-dimension",
    "google": "protobuf",
}
# Optional libraries: imported only inside functions, declared in their extra.
OPTIONAL = {"transformers": "hf"}
# Upper bounds only where we read a library's internals (see the comments in pyproject.toml).
UPPER_BOUNDED = {"open-clip-torch", "timm", "transformers"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> dict[str, Requirement]:
    own = normalize(PROJECT["name"])
    reqs = (Requirement(r) for r in requirements)
    return {normalize(r.name): r for r in reqs if normalize(r.name) != own}


CORE = declared(PROJECT["dependencies"])
EXTRAS = {extra: declared(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


FUNCTIONS = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


def third_party_imports() -> list[tuple[str, bool, str]]:
    """(top-level module, at module level, "file:line") of every third-party import in the package.

    Module level excludes function bodies, ``if TYPE_CHECKING:`` blocks and ``try:`` blocks that
    catch an ImportError: those only run when the optional feature is used."""
    found = []

    def visit(node: ast.AST, top: bool, where: Path) -> None:
        for child in ast.iter_child_nodes(node):
            child_top = top
            if _is_type_checking(child) or isinstance(child, FUNCTIONS):
                child_top = False
            elif isinstance(child, ast.Try) and any(
                h.type is not None and re.search(r"ImportError|ModuleNotFoundError", ast.unparse(h.type))
                for h in child.handlers
            ):
                child_top = False
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level:
                names = [child.module or ""]
            else:
                names = []
            for name in names:
                module = name.partition(".")[0]
                if module and module not in sys.stdlib_module_names and module != PACKAGE.name:
                    found.append((module, child_top, f"{where.relative_to(ROOT)}:{child.lineno}"))
            visit(child, child_top, where)

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text()), True, path)
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


@functools.cache
def distributions(module: str) -> set[str]:
    """The distributions that may provide `module`: the known mapping, the name itself, and the
    installed distributions that ship it."""
    names = {module, IMPORT_TO_DIST.get(module, module)}
    names |= set(_installed().get(module, []))
    return {normalize(n) for n in names}


IMPORTS = third_party_imports()


def test_the_scan_sees_the_known_libraries():
    modules = {m for m, _, _ in IMPORTS}
    assert {"torch", "numpy", "PIL", "lightning", "open_clip", "transformers"} <= modules, sorted(modules)


def test_every_module_level_import_is_a_core_dependency():
    missing = sorted({(m, where) for m, top, where in IMPORTS if top and not distributions(m) & CORE.keys()})
    assert not missing, f"imported at module level but not in [project.dependencies]: {missing}"


def test_every_function_level_import_is_declared_somewhere():
    anywhere = set(CORE).union(*EXTRAS.values())
    missing = sorted({(m, where) for m, _, where in IMPORTS if not distributions(m) & anywhere})
    assert not missing, f"imported but declared nowhere in pyproject.toml: {missing}"


@pytest.mark.parametrize("module, extra", sorted(OPTIONAL.items()))
def test_optional_libraries_stay_optional_and_sit_in_their_extra(module, extra):
    uses = [(top, where) for m, top, where in IMPORTS if m == module]
    assert uses, f"{module} is no longer imported: drop it from OPTIONAL (and maybe from [{extra}])"
    at_top = [where for top, where in uses if top]
    assert not at_top, f"{module} belongs to the [{extra}] extra, import it inside functions: {at_top}"
    assert distributions(module) & EXTRAS[extra].keys(), f"{module} is not declared in the [{extra}] extra"
    assert not distributions(module) & CORE.keys(), f"{module} is optional: keep it out of the core"


@pytest.mark.parametrize("group", ["dependencies", "hf"])
def test_runtime_requirements_have_a_floor_no_pin_and_rare_ceilings(group):
    reqs = CORE if group == "dependencies" else EXTRAS[group]
    for name, req in reqs.items():
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops, f"{req}: give it a lower bound (the minimum-versions CI job installs it)"
        assert not ops & {"==", "==="}, f"{req}: no exact pins for libraries"
        if ops & {"<", "<="}:
            assert name in UPPER_BOUNDED, f"{req}: upper bounds only where we read the library's internals"


def _ruff_pin() -> str | None:
    ruff = EXTRAS["dev"].get("ruff")
    pins = [s.version for s in ruff.specifier if s.operator == "=="] if ruff else []
    return pins[0] if pins else None


def test_pre_commit_runs_the_dev_extras_ruff():
    pin = _ruff_pin()
    assert pin, "pin ruff in the dev extra (ruff==X): `make lint` and pre-commit must agree"
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [(repo, hook) for repo in config["repos"] for hook in repo["hooks"] if "ruff" in hook["id"]]
    assert hooks, "no ruff hook in .pre-commit-config.yaml"
    for repo, hook in hooks:
        if repo["repo"] == "local":  # runs the venv's ruff, the one the dev extra installs
            assert hook["entry"].split()[0] == ".venv/bin/ruff", hook
        else:
            assert "ruff-pre-commit" in repo["repo"], repo
            assert repo["rev"].removeprefix("v") == pin, (repo["rev"], f"ruff=={pin}")


def test_ci_has_one_entry_point_running_the_readme_test_command():
    run = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", run, re.M), "`.ci/run` runs the README's test command"
    assert "make test" in (ROOT / "README.md").read_text()
    for workflow in sorted((ROOT / ".github" / "workflows").glob("*.yml")):
        config = yaml.safe_load(workflow.read_text())
        for name, job in config["jobs"].items():
            steps = " ".join(step.get("run", "") for step in job["steps"])
            assert ".ci/run" in steps, f"{workflow.name}:{name} must run .ci/run"
            assert not re.search(r"\bmake (test|lint)\b", steps), f"{workflow.name}:{name}: via .ci/run only"


def _min_versions():
    spec = importlib.util.spec_from_file_location("min_versions", ROOT / ".ci" / "min_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_min_versions_pins_every_runtime_floor():
    lines = _min_versions().constraints()
    pins = {normalize(Requirement(line).name): Requirement(line) for line in lines}
    floors = {**CORE, **EXTRAS["hf"]}
    assert set(pins) == set(floors)
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        floor = max(Version(s.version) for s in floors[name].specifier if s.operator == ">=")
        assert Version(spec.version) == floor, (pin, floors[name])


def test_the_torch_and_torchvision_floors_are_a_pair():
    """Each torchvision release requires one torch: 0.(m + 15) goes with 2.m (0.17 with 2.2)."""

    def floor(name):
        return next(Version(s.version) for s in CORE[name].specifier if s.operator == ">=")

    torch, torchvision = floor("torch"), floor("torchvision")
    assert (torch.major, torchvision.major) == (2, 0)
    assert torchvision.minor == torch.minor + 15, (torch, torchvision)

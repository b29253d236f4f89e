"""Print pip constraints that pin every declared lower bound (``>=X`` -> ``==X``) in pyproject.toml.

The minimum-versions CI job installs with these constraints, so the floors we declare are the
versions we test::

    python .ci/min_versions.py > constraints.txt            # [project.dependencies] + the hf extra
    python .ci/min_versions.py --extras hf dev > c.txt      # other extras too
    PIP_CONSTRAINT=$PWD/constraints.txt make test

Requirements without a lower bound are left free; a package with several floors (core and an extra)
gets the highest one. The project itself (``residual-lightning[hf]`` in the dev extra) is skipped.
Runs on Python 3.10 without installing anything (``tomllib`` is 3.11+; pip vendors ``tomli`` and ``packaging``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib
try:
    from packaging.version import Version
except ModuleNotFoundError:  # a bare venv: pip vendors packaging too
    from pip._vendor.packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_REQ = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<spec>[^;]*)")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(requirements: list[str], skip: str) -> dict[str, str]:
    """``{normalized name: lowest allowed version}`` of the requirements with a ``>=`` bound."""
    out: dict[str, str] = {}
    for req in requirements:
        match = _REQ.match(req)
        if match is None:
            raise ValueError(f"cannot parse requirement {req!r}")
        name = normalize(match["name"])
        if name == skip:
            continue
        for spec in match["spec"].split(","):
            spec = spec.strip()
            if spec.startswith(">="):
                version = spec[2:].strip()
                if name not in out or Version(version) > Version(out[name]):
                    out[name] = version
    return out


def constraints(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ("hf",)) -> list[str]:
    """The constraint lines, sorted by package name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject declares {sorted(optional)}")
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += optional[extra]
    found = floors(requirements, skip=normalize(project["name"]))
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", nargs="*", default=["hf"], help="optional-dependency groups to include")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    sys.stdout.write("".join(line + "\n" for line in constraints(args.pyproject, tuple(args.extras))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Packaging: maskaq states dependency ranges like a library; the exact set lives in constraints.txt."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's; pyproject.toml is read with it")

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return _NAME.match(requirement).group(1).lower().replace("_", "-")


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version
    return pins


def test_runtime_dependencies_are_ranges_not_pins():
    project = _pyproject()
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pinned = [r for r in requirements if "==" in r or "===" in r]
    assert not pinned, f"exact pins in pyproject.toml (move them to constraints.txt): {pinned}"
    assert all(">=" in r for r in project["dependencies"]), "every runtime dependency states its oldest version"


def test_constraints_pin_every_dependency_inside_its_range():
    from packaging.requirements import Requirement

    pins = _pins()
    project = _pyproject()
    requirements = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values()
                                                     for r in extra]
    for text in requirements:
        req = Requirement(text)
        name = _name(req.name)
        assert name in pins, f"{name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req}"


def test_make_install_uses_the_constraints():
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip" in line.lower()
               and " install " in line and "--upgrade pip" not in line]
    assert install and all("-c constraints.txt" in line for line in install), install

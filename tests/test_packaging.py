"""Packaging: maskaq states dependency ranges like a library; the exact set lives in constraints.txt."""
import json
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's; pyproject.toml is read with it")

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements():
    """Every requirement of pyproject.toml: runtime dependencies and all extras."""
    project = _pyproject()
    return list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                            for r in extra]


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
    pinned = [r for r in _requirements() if "==" in r or "===" in r]
    assert not pinned, f"exact pins in pyproject.toml (move them to constraints.txt): {pinned}"
    assert all(">=" in r for r in project["dependencies"]), "every runtime dependency states its oldest version"


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _pins()
    for text in _requirements():
        req = Requirement(text)
        name = _name(req.name)
        assert name in pins, f"{name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req}"


def test_make_install_uses_the_constraints():
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip" in line.lower()
               and " install " in line and "--upgrade pip" not in line]
    assert install and all("-c constraints.txt" in line for line in install), install


def _compat_records():
    path = ROOT / "benchmarks" / "results" / "compat_matrix.json"
    assert path.exists(), "benchmarks/results/compat_matrix.json is missing: run make test-compat"
    return json.loads(path.read_text())


def test_every_lower_bound_is_a_tested_floor():
    """Each `>=` of pyproject.toml (runtime and extras) and requires-python has a passing row of
    `make test-compat` (benchmarks/results/compat_matrix.json) that ran exactly that version."""
    project = _pyproject()
    passing = [r for r in _compat_records() if r.get("status") == "passed" and not r.get("failed")]
    assert passing, "no passing row in compat_matrix.json"
    untested = []
    for text in _requirements():
        req = Requirement(text)
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if not lows:
            continue
        name = _name(req.name)
        if not any(name in r.get("versions", {}) and Version(r["versions"][name]) == Version(lows[0])
                   for r in passing):
            untested.append(f"{name}>={lows[0]}")
    python = re.search(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)
    if not any(".".join(r.get("python", "").split(".")[:2]) == python for r in passing):
        untested.append(f"python>={python}")
    assert not untested, f"lower bounds with no passing make test-compat row: {untested}"


def test_compat_records_say_where_they_ran():
    for record in _compat_records():
        for key in ("row", "date", "cpu", "cpu_flags", "status"):
            assert record.get(key), f"compat_matrix.json record without {key}: {record}"
        if record["status"] in ("passed", "failed"):
            for key in ("python", "torch", "torchvision", "timm", "numpy", "passed", "failed", "skipped"):
                assert record.get(key) is not None, f"record {record['row']} lacks {key}"

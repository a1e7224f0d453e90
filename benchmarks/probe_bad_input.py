"""Where does the crash on bad input come from? A probe for the lent GPU machine.

On the first lent H200 (torch 2.11, Python 3.12) every bad-input test of maskaq._C killed the
pytest process (SIGSEGV), CPU kernels included, while the same bad call in plain Python raised a
clean ValueError. This probe calls one bad op (fq_attention on a rank-3 q: a ValueError whose
message formats numbers) in fresh child processes that differ in one thing each:

- plain Python (torch + maskaq only);
- inside a one-test pytest session, as is, with output capture off (-s), without faulthandler,
  without third-party plugins: which pytest feature, if any, is to blame;
- after pytest has collected the given test files (their imports loaded): whether a module they
  import is to blame; if so, after importing each such top-level module alone, to name it.

It prints one line per child (what the child reported, or the signal that killed it) and the
C++ runtimes mapped into the process after collection: two copies of libstdc++ in one process
break the locale facets that number formatting uses, a classic cause of exactly this crash.

    python benchmarks/probe_bad_input.py [--device cuda] [TEST_FILE ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CALL_BAD_OP = """
import torch, maskaq
q = torch.randn(2, 5, 8, device={device!r})
try:
    torch.ops.maskaq.fq_attention(q, q, q, None, None, [], [], 0.3, False)
    print("PROBE: no error raised")
except (ValueError, RuntimeError) as e:
    print("PROBE: raised " + type(e).__name__)
"""

ONE_TEST_FILE = """
import pytest, torch, maskaq

def test_bad_input_raises():
    q = torch.randn(2, 5, 8, device={device!r})
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.maskaq.fq_attention(q, q, q, None, None, [], [], 0.3, False)
"""

COLLECT = """
import pytest, sys
before = set(sys.modules)
pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *{tests!r}])
added = sorted({{m.split(".")[0] for m in set(sys.modules) - before if m.split(".")[0].isidentifier() and not m.startswith("__")}}
               - set(sys.builtin_module_names) - set(sys.stdlib_module_names))
print("MODULES: " + " ".join(added))
with open("/proc/self/maps") as f:
    libs = sorted({{line.split()[-1] for line in f if "libstdc++" in line or "libgcc_s" in line}})
print("RUNTIMES: " + " ".join(libs))
"""


def killed_by(proc: subprocess.CompletedProcess) -> str | None:
    return f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else None


def outcome(proc: subprocess.CompletedProcess) -> str:
    if killed := killed_by(proc):
        return killed
    probes = [line[len("PROBE: "):] for line in proc.stdout.splitlines() if line.startswith("PROBE: ")]
    if probes:
        return probes[-1] + ("" if proc.returncode == 0 else f" (rc {proc.returncode})")
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
    return f"rc {proc.returncode}: {tail[0][:100]}"


def run_child(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
                               # the test modules and their helpers import as pytest imports them
                               "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "tests"),
                                                                           os.environ.get("PYTHONPATH")]))})


def pytest_child(test_file: str, *options: str, env: dict | None = None) -> str:
    proc = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, test_file],
                     env=env)
    if killed := killed_by(proc):
        return killed
    if proc.returncode == 0:
        return "passed (raised ValueError)"
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E ")]
    return f"failed (rc {proc.returncode}): " + (errors[-1][1:].strip()[:100] if errors else "see pytest output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", default=["tests/test_ops.py", "tests/test_int_ops.py"],
                        help="test files whose collection (imports) to reproduce")
    parser.add_argument("--device", default="cpu", help="device of the bad call (cpu or cuda)")
    args = parser.parse_args(argv)

    rows: list[tuple[str, str]] = []
    call = CALL_BAD_OP.format(device=args.device)
    rows.append(("plain python", outcome(run_child([sys.executable, "-c", call]))))

    with tempfile.TemporaryDirectory() as tmp:
        test_file = os.path.join(tmp, "test_probe_bad_input.py")
        with open(test_file, "w") as f:
            f.write(ONE_TEST_FILE.format(device=args.device))
        rows.append(("pytest, one test", pytest_child(test_file)))
        rows.append(("pytest, one test, -s (no capture)", pytest_child(test_file, "-s")))
        rows.append(("pytest, one test, no faulthandler", pytest_child(test_file, "-p", "no:faulthandler")))
        rows.append(("pytest, one test, no plugins", pytest_child(
            test_file, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})))

    collect = COLLECT.format(tests=list(args.tests))
    proc = run_child([sys.executable, "-c", collect + call])
    rows.append((f"after collecting {' '.join(args.tests)}", outcome(proc)))
    modules = next((line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("MODULES:")), [])
    runtimes = next((line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RUNTIMES:")), [])
    if "raised" not in rows[-1][1]:
        for module in modules:
            rows.append((f"after import {module}", outcome(run_child([sys.executable, "-c", f"import {module}\n" + call]))))

    width = max(len(name) for name, _ in rows)
    print(f"bad call: fq_attention on a rank-3 q, device {args.device}")
    for name, result in rows:
        print(f"{name:<{width}}  {result}")
    print("C++ runtimes mapped after collection: " + (", ".join(runtimes) or "(none found)"))
    if sum("libstdc++" in lib for lib in runtimes) > 1:
        print("more than one libstdc++ in one process: a likely cause of crashes while formatting numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

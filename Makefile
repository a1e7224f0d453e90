# maskaq: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.maskaq-installed
# checked before a new venv is made: a full disk otherwise fails half-way through pip, in 30 s
VENV_MIN_FREE_GB ?= 7
export MAX_JOBS ?= 2

.PHONY: install test test-avx2 test-compat fuzz demo bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h csrc/*/*.cuh)
	@test -x $(PY) || [ $$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}') -ge $(VENV_MIN_FREE_GB) ] || { \
	  echo "make install: a new $(VENV) needs about 6 GB (torch with its CUDA libraries is 5.5 GB);" \
	       "only $$(df -Ph . | awk 'NR==2 {print $$4}') is free here. Free some space, or set VENV_MIN_FREE_GB."; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt ninja pybind11
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[test,bench]"
	$(PY) -c "import maskaq; print(maskaq.extension_info())"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The integer tests on an emulated AMD EPYC-Rome (AVX2, no AVX-512, no VNNI), whatever this CPU is:
# the path the most common cloud CPUs take, checked on any x86 machine. Needs qemu-user
# (apt-get install qemu-user); slow (every instruction is emulated), so not part of `make test`.
# K=EXPR narrows the tests (pytest -k), e.g. make test-avx2 K=exact_integers.
QEMU_CPU ?= EPYC-Rome
AVX2_TESTS ?= tests/test_integer.py tests/test_int_ops.py
test-avx2: SHELL := /bin/bash
test-avx2: .SHELLFLAGS := -o pipefail -c
test-avx2: install
	@command -v qemu-x86_64 >/dev/null || { echo "make test-avx2 needs qemu-x86_64 (apt-get install qemu-user)"; exit 2; }
	qemu-x86_64 -cpu $(QEMU_CPU) $(PY) -c "import maskaq.integer.cpu_gemm as g; p = g.cpu_integer_path(); print(p); \
	  assert p['cpu_capability'] == 'AVX2' and all(p[k + '_int8'] == g.PATH_INT16 for k in g.KERNELS), \
	  'the emulated CPU does not take the AVX2 path'" 2>&1 | grep -v "TCG doesn't support"
	qemu-x86_64 -cpu $(QEMU_CPU) $(PY) -m pytest -q -p no:cacheprovider $(AVX2_TESTS) \
	  -k "not forced_avx2 $(if $(K),and ($(K)))" 2>&1 | grep -v "TCG doesn't support"

# The test suite against each version set pyproject.toml promises (the lowest bounds, torch 2.11, the
# newest releases): a fresh clone and venv per row, deleted after it; a table at the end, and one record
# per row appended to benchmarks/results/compat_matrix.json. Long (about 7 min a row), so not part
# of `make test`. ROWS=... picks rows, e.g. make test-compat ROWS=lowest.
test-compat:
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) benchmarks/compat_matrix.py $(if $(ROWS),--rows $(ROWS))

# The property-based tests with hundreds of examples per op (make test runs a small fixed set).
fuzz: install
	MASKAQ_FUZZ_PROFILE=large $(PY) -m pytest -q tests/test_fuzz.py

demo: install
	$(VENV)/bin/maskaq demo

bench: install
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_ops.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_inference.py --quick

clean:
	rm -rf build $(VENV) maskaq/*.so *.egg-info

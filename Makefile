# maskaq: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.maskaq-installed
export MAX_JOBS ?= 2

.PHONY: install test fuzz demo bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt ninja pybind11
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[test,bench]"
	$(PY) -c "import maskaq; print(maskaq.extension_info())"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

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

# Quickstart targets: each sets up .venv (CPU test environment, pinned in requirements-cpu.txt) when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml requirements-cpu.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: test bench report cuda-check clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(PY) bench/kernel_report.py --check
	$(PY) csrc/cuda/compile_check.py --check

bench: $(VENV)/.installed
	$(PY) -m fastlm bench

report: $(VENV)/.installed
	$(PY) bench/kernel_report.py

clean:
	rm -rf $(VENV) build *.egg-info fastlm/_C*.so bench-results

# Quickstart targets: each sets up .venv (CPU test environment, pinned in requirements-cpu.txt) when needed.
PYTHON ?= python3
VENV ?= .venv
# an index to take torch from first, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only build
# (PyPI's Linux x86_64 torch wheel is the CUDA build)
TORCH_INDEX ?=
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml requirements-cpu.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: test sanitize bench report clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) "$$(grep -m1 '^torch==' requirements-cpu.txt)")
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(PY) bench/kernel_report.py --check
	$(PY) csrc/cuda/compile_check.py --check
	$(PY) tests/sanitize.py

# the C++ CPU kernels' tests again, on a build with AddressSanitizer and UndefinedBehaviorSanitizer (build/sanitize/)
sanitize: $(VENV)/.installed
	$(PY) tests/sanitize.py

bench: $(VENV)/.installed
	$(PY) -m fastlm bench

report: $(VENV)/.installed
	$(PY) bench/kernel_report.py

clean:
	rm -rf $(VENV) build *.egg-info fastlm/_C*.so bench-results

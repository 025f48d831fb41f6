# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export VLM_VPR_DATA ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
OUT ?= out

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-openvino.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-openvino.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check vlm_vpr test benchmarks launch
	$(VENV)/bin/ruff format --check vlm_vpr test benchmarks launch
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) -m vlm_vpr.demo --data $(VLM_VPR_DATA) --out $(OUT)/demo

bench: $(STAMP)
	$(PY) benchmarks/bench.py --data $(VLM_VPR_DATA) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info

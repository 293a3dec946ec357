# Two commands matter on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
REF := .venv-ref
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
REF_STAMP := $(REF)/.stamp-ref
ONNX := .venv-onnx
ONNX_STAMP := $(ONNX)/.stamp-onnx

.PHONY: install ref onnx serve test test-cuda lint typecheck proto bench clean system-deps

# (Re)install when .venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml setup.py engine/runtime/_qlinear.c engine/runtime/_t5ops.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	$(MAKE) --no-print-directory proto
	touch $(STAMP)

install: $(STAMP)

# Hugging Face Transformers 4.55.x: the reference for contrastive search (later releases moved it
# out of the library) and for greedy/beam. Kept apart from the runtime's own environment.
$(REF_STAMP): scripts/requirements-ref.txt
	test -x $(REF)/bin/python || $(PY) -m venv $(REF)
	$(REF)/bin/pip install -q -r scripts/requirements-ref.txt
	touch $(REF_STAMP)

ref: $(REF_STAMP)

# ONNX Runtime int8, the benchmark suite's peer (optimum export + dynamic quantization): benchmarks
# only, in its own environment so that neither the runtime's nor the tests' grows.
$(ONNX_STAMP): scripts/requirements-onnx.txt
	test -x $(ONNX)/bin/python || $(PY) -m venv $(ONNX)
	$(ONNX)/bin/pip install -q -r scripts/requirements-onnx.txt
	touch $(ONNX_STAMP)

onnx: $(ONNX_STAMP)

proto:
	$(BIN)/python scripts/gen_proto.py

serve: $(STAMP)
	$(BIN)/engine serve $(SERVE_ARGS)

# Debian packages that the end-to-end tests drive (browser, promtool, redis); installed once.
system-deps:
	@bash scripts/system-deps.sh

test: $(STAMP) $(REF_STAMP) system-deps
	$(BIN)/ruff check engine tests scripts benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# On a GPU machine (pip install -e '.[cuda]'): the tests that CI skips for want of a GPU.
test-cuda: $(STAMP)
	$(BIN)/python -m pytest -m cuda $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check engine tests scripts benchmarks
	$(BIN)/ruff format --check engine tests scripts benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP) $(REF_STAMP) $(ONNX_STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(REF) $(ONNX) engine/pb/engine build *.egg-info

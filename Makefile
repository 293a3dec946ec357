# Two commands matter on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
REF := .venv-ref
BIN := $(VENV)/bin
# `make serve`: the runtime alone (what a wheel of the project pulls). `make test`: plus `dev`.
RUNTIME_STAMP := $(VENV)/.stamp-runtime
STAMP := $(VENV)/.stamp-install
REF_STAMP := $(REF)/.stamp-ref
ONNX := .venv-onnx
ONNX_STAMP := $(ONNX)/.stamp-onnx
# What a (re)install depends on: the build (setup.py generates engine/pb from proto/ and compiles
# the kernel; pip's isolated build env brings grpcio-tools, the venv never gets it).
BUILD_INPUTS := pyproject.toml setup.py $(wildcard engine/runtime/*.c engine/runtime/*.h proto/engine/v1/*.proto)

.PHONY: install runtime ref onnx serve test test-cuda lint typecheck proto bench clean system-deps

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# Editable, so that a checkout's edits serve at once; the same build as `pip install .`.
$(RUNTIME_STAMP): $(BUILD_INPUTS) | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(BUILD_INPUTS) | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(RUNTIME_STAMP)

runtime: $(RUNTIME_STAMP)

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

# By hand after editing proto/ (any pip install of the project does it too).
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

serve: $(RUNTIME_STAMP)
	$(BIN)/engine serve $(SERVE_ARGS)

# Debian packages that the end-to-end tests drive (browser, promtool, redis); installed once.
system-deps:
	@bash scripts/system-deps.sh

test: $(STAMP) $(REF_STAMP) system-deps
	$(BIN)/ruff check engine tests scripts benchmarks harness
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# On a GPU machine (pip install -e '.[cuda]'): the tests that CI skips for want of a GPU.
test-cuda: $(STAMP)
	$(BIN)/python -m pytest -m cuda $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check engine tests scripts benchmarks harness
	$(BIN)/ruff format --check engine tests scripts benchmarks harness

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP) $(REF_STAMP) $(ONNX_STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(REF) $(ONNX) build dist *.egg-info engine/pb/.proto-sha256
	find engine/pb -name "*_pb2*" -delete

#!/usr/bin/env bash
# The CUDA check as it ran on a lent GPU machine (no network, Python 3.12 with CuPy, torch and
# Transformers 5.x, no CTranslate2): wheels carried in .whl (ctranslate2) and .whlref
# (transformers 4.55.4 + its tokenizers and huggingface_hub, for contrastive search), docs/gpu.md's
# libcublas.so.12 link, then the CUDA tests (eager and with CUDA graphs) and
# benchmarks/bench_cuda.py. Output under $OUT (or ./cuda-out). scripts/fetch_gpu_wheels.sh fetches
# the wheels. About 4 minutes on an H100 with the default BENCH_ARGS.
set -u
OUT=${OUT:-$PWD/cuda-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ref .whlref/*.whl || exit 1
L=$(find / -xdev -name 'libcublas.so.13*' 2>/dev/null | head -1)
mkdir -p /tmp/cu12 && ln -sf "$L" /tmp/cu12/libcublas.so.12
export LD_LIBRARY_PATH=/tmp/cu12:$(dirname "$L"):${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nPYTHONPATH=/tmp/ref:%s exec python3 "$@"\n' "$PWD" > /tmp/hfpy && chmod +x /tmp/hfpy
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import ctranslate2, cupy, numpy; print('ctranslate2', ctranslate2.__version__, 'gpus', ctranslate2.get_cuda_device_count(), 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
/tmp/hfpy -c "import transformers, torch; print('reference transformers', transformers.__version__, 'torch', torch.__version__)"
timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -m cuda -p no:cacheprovider --continue-on-collection-errors \
  -W ignore::UserWarning -W ignore::DeprecationWarning -W ignore::FutureWarning -rA -q tests/test_cuda.py tests/test_contrastive.py \
  2>&1 | tee "$OUT/pytest.log" | tail -40
timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/bench_cuda.py --hf-python /tmp/hfpy --out "$OUT/bench_cuda.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench.log" | grep -v '^\[engine\]'

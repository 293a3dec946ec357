#!/usr/bin/env bash
# Wheels that benchmarks/cuda_check.sh installs on a GPU machine that has no network (Python 3.12,
# CuPy and torch preinstalled, no CTranslate2): run here, where pip reaches PyPI, then carry
# .whl and .whlref to the GPU machine with the working tree.
#   .whl     ctranslate2 (the runtime's version)
#   .whlref  transformers 4.55.4 + its tokenizers and huggingface_hub (the contrastive reference)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CT2=$(.venv/bin/python -c "import ctranslate2; print(ctranslate2.__version__)" 2>/dev/null || echo 4.8.5)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
for d in .whl .whlref; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
"$PY" -m pip download -q --no-deps "${platform[@]}" -d .whl "ctranslate2==$CT2"
"$PY" -m pip download -q --no-deps "${platform[@]}" -d .whlref transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.36.0
du -sh .whl .whlref
echo "next, on the GPU machine (carry .whl and .whlref): bash benchmarks/cuda_check.sh"

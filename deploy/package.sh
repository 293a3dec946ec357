#!/usr/bin/env bash
# The image's install steps, in one place: deploy/Dockerfile runs them, and so does the wheel test
# (tests/test_packaging.py), so that the image cannot drift from what CI checks.
#
#   deploy/package.sh build OUTDIR          sdist, then the wheel built from that sdist, into OUTDIR
#                                           (gRPC code generated, the C kernel compiled if a
#                                           compiler is there; grpcio-tools only in the build env)
#   deploy/package.sh install VENV WHEELDIR a fresh venv with the wheel and its runtime
#                                           dependencies only (plus the redis extra), then checks
#                                           that no build or test tool came with it
#
# PYTHON (default python3) runs `build` and makes the venv; PIP_ARGS is passed to pip install.
set -euo pipefail
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)

case "${1:-}" in
build)
  out=${2:?usage: deploy/package.sh build OUTDIR}
  if ! "$PYTHON" -c "import build" 2>/dev/null; then
    tools=$(mktemp -d)
    "$PYTHON" -m venv "$tools"
    "$tools/bin/pip" install -q "build>=1"
    PYTHON="$tools/bin/python"
  fi
  "$PYTHON" -m build --outdir "$out" "$here"
  ;;
install)
  venv=${2:?usage: deploy/package.sh install VENV WHEELDIR}
  wheels=${3:?usage: deploy/package.sh install VENV WHEELDIR}
  shopt -s nullglob
  found=("$wheels"/flan_t5_engine-*.whl)
  [ ${#found[@]} -eq 1 ] || { echo "package.sh: expected one wheel in $wheels, found ${#found[@]}" >&2; exit 1; }
  "$PYTHON" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q ${PIP_ARGS:-} "${found[0]}[redis]"
  # Runtime only: none of the reference, test or build tools.
  "$venv/bin/python" - <<'PY'
import importlib.util, sys
present = [m for m in ("torch", "transformers", "grpc_tools", "pytest", "setuptools_scm") if importlib.util.find_spec(m)]
if present:
    sys.exit(f"package.sh: the runtime venv has {', '.join(present)}: a runtime dependency pulls it")
PY
  "$venv/bin/engine" --version
  ;;
*)
  echo "usage: deploy/package.sh build OUTDIR | install VENV WHEELDIR" >&2
  exit 2
  ;;
esac

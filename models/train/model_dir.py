"""Builds a complete model folder from a training run: what `bearwatch classify --model DIR`,
`[model] path`, `model retrain --from DIR` and `bench loop --model DIR` take. It holds the run's
int8 graph and tokenizer, models/labels.json under a version of its own, the run's heads for
`model retrain`, and models/refit's anchors and frozen evaluation set less the sets the run did not
train on (so that a refit is not taught what the encoder never saw). For example, a model that never
saw SEntFiN, to measure what the analyst's loop buys on headlines new to the model:
    ../../.venv-train/bin/python model_dir.py --name nosentfin-s13 --out /tmp/nosentfin --version 2.1.0-nosentfin
"""
import argparse
import json
import shutil
from pathlib import Path

import data
import export_heads


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True, help="the work/NAME/ training run")
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--version", required=True, help="the version its labels.json names")
    p.add_argument("--model-name", help="the name its labels.json gives (default: the shipped model's)")
    args = p.parse_args()
    work = data.WORK / args.name
    out = Path(args.out)
    (out / "refit").mkdir(parents=True)
    trained_on = set(json.loads((work / "results.json").read_text())["settings"]["sets"])
    shutil.copy(work / "model.onnx", out / "model.onnx")
    shutil.copy(work / "tokenizer.json", out / "tokenizer.json")
    labels = json.loads((data.MODELS / "labels.json").read_text())
    labels["version"] = args.version
    labels["name"] = args.model_name or labels["name"]
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    (out / "refit" / "heads.json").write_text(json.dumps(export_heads.heads(args.name)) + "\n")
    for name in ("anchors.jsonl", "eval.jsonl"):
        lines = (data.MODELS / "refit" / name).read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["set"] in trained_on]
        (out / "refit" / name).write_text("".join(kept))
        print(name, len(kept), "of", len(lines))


if __name__ == "__main__":
    main()

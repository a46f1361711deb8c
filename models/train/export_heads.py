"""Writes the shipped model's two heads, as trained (fp32 weights, the temperatures built into the
graph), to models/refit/heads.json in the format of `classify::heads::Heads`. `bearwatch model
retrain` starts from them and keeps new heads close to them, so that a refit moves only as far as
the feedback asks. Needs the training run's weights (work/NAME/model.pt).
    ../../.venv-train/bin/python export_heads.py --name candidate-s13
"""
import argparse
import json

import torch

import data


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True, help="the work/NAME/ run whose model.onnx is shipped")
    args = p.parse_args()
    work = data.ROOT / "models" / "train" / "work" / args.name
    state = torch.load(work / "model.pt", map_location="cpu")
    temperatures = json.loads((work / "temperatures.json").read_text())

    def head(name):
        return {"weight": state[f"{name}.weight"].tolist(), "bias": state[f"{name}.bias"].tolist(),
                "temperature": temperatures[name]}

    heads = {"dims": state["sentiment.weight"].shape[1], "sentiment": head("sentiment"), "topic": head("topic")}
    (data.MODELS / "refit" / "heads.json").write_text(json.dumps(heads) + "\n")


if __name__ == "__main__":
    main()

"""Writes the shipped model's two heads, as trained (fp32 weights, the temperatures built into the
graph), to models/refit/heads.json in the format of `classify::heads::Heads`. `bearwatch model
retrain` starts from them and keeps new heads close to them, so that a refit moves only as far as
the feedback asks. Needs the training run's weights (work/NAME/model.pt).
    ../../.venv-train/bin/python export_heads.py --name candidate-s13 [--out PATH]
"""
import argparse
import json

import torch

import data


def heads(name):
    """The run's heads as `heads.json` holds them."""
    work = data.WORK / name
    state = torch.load(work / "model.pt", map_location="cpu")
    temperatures = json.loads((work / "temperatures.json").read_text())

    def head(kind):
        return {"weight": state[f"{kind}.weight"].tolist(), "bias": state[f"{kind}.bias"].tolist(),
                "temperature": temperatures[kind]}

    return {"dims": state["sentiment.weight"].shape[1], "sentiment": head("sentiment"), "topic": head("topic")}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True, help="the work/NAME/ run whose model.onnx is shipped")
    p.add_argument("--out", default=str(data.MODELS / "refit" / "heads.json"))
    args = p.parse_args()
    with open(args.out, "w") as f:
        f.write(json.dumps(heads(args.name)) + "\n")


if __name__ == "__main__":
    main()

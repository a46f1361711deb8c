"""Summarises trained candidates for the model card: the shipped one set by set with 95 % intervals,
the spread over seeds, the targets, and the reliability diagram (docs/reliability.png).
    .venv-train/bin/python models/train/report.py --shipped candidate-s13 \
        --seeds candidate-s13 candidate-s7 candidate-s29 --split final
Reads work/NAME/results.json (written by train.py); trains and scores nothing itself."""
import argparse
import json
import statistics
from pathlib import Path

import data

WORK = data.WORK
DOCS = data.ROOT / "docs"
SETS = ["phrasebank", "phrasebank_agree_100", "sentfin", "tweets_sentiment", "head_sentiment",
        "tweets_topic", "reuters", "reuters_with_body", "head_topic"]
# Issue 15's targets: (metric, at least / at most, value).
TARGETS = {
    "phrasebank": [("accuracy", ">=", 0.88), ("macro_f1", ">=", 0.86)],
    "tweets_sentiment": [("accuracy", ">=", 0.88)],
    "tweets_topic": [("accuracy", ">=", 0.88)],
    "sentfin": [("accuracy", ">=", 0.85)],
    "reuters": [("accuracy", ">=", 0.93)],
    "head_sentiment": [("ece", "<=", 0.03)],
    "head_topic": [("ece", "<=", 0.03)],
}
# Student t quantiles (two-sided 95 %) for n - 1 degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def scores(name, split, kind):
    results = json.loads((WORK / name / "results.json").read_text())
    sets = dict(results[split][kind])
    if "phrasebank" in sets:
        sets["phrasebank_agree_100"] = sets["phrasebank"]["agree_100"]
    return sets


def over_seeds(values):
    """mean ± sd (t-based 95 % interval of the mean) over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    sd = statistics.stdev(values)
    half = T95[len(values) - 1] * sd / len(values) ** 0.5
    return f"{mean:.3f} ± {sd:.3f} ({mean - half:.3f}–{mean + half:.3f})"


def met(name, r):
    out = []
    for metric, op, value in TARGETS.get(name, []):
        ok = r[metric] >= value if op == ">=" else r[metric] <= value
        out.append(f"{metric} {op} {value}: {'met' if ok else 'not met'}")
    return "; ".join(out)


def uncal(r):
    return f" ({r['ece_uncalibrated']:.3f})" if "ece_uncalibrated" in r else ""


def tables(shipped, seeds, split, kind):
    ship = scores(shipped, split, kind)
    per_seed = [scores(name, split, kind) for name in seeds]
    lines = [
        f"Shipped model `{shipped}` ({kind}), {split} split; over seeds {', '.join(seeds)}: mean ± sd "
        "(95 % t-interval of the mean).",
        "",
        "| set | n | accuracy (95 % Wilson) | macro-F1 | ECE (without temperature) | accuracy over seeds "
        "| macro-F1 over seeds | ECE over seeds | target (shipped) |",
        "|---|---:|---|---:|---:|---|---|---|---|",
    ]
    for name in SETS:
        if name not in ship:
            continue
        r = ship[name]
        lo, hi = r["accuracy_95"]
        seeds_of = lambda m: over_seeds([s[name][m] for s in per_seed if name in s])
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | {r['macro_f1']:.3f} "
                     f"| {r['ece']:.3f}{uncal(r)} | {seeds_of('accuracy')} | {seeds_of('macro_f1')} | {seeds_of('ece')} "
                     f"| {met(name, r)} |")
    return "\n".join(lines)


def diagram(shipped, split, kind, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ship = scores(shipped, split, kind)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=110)
    panels = (("sentiment head", "head_sentiment", ["phrasebank", "sentfin", "tweets_sentiment"]),
              ("topic head", "head_topic", ["reuters", "tweets_topic"]))
    for ax, (title, pooled, parts) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfectly calibrated")
        for name in parts + [pooled]:
            bins = [b for b in ship[name]["reliability"] if b[2] >= 5]  # bins under 5 items say nothing
            label = f"{'all sets' if name == pooled else name} (ECE {ship[name]['ece']:.3f}, n {ship[name]['n']})"
            ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o",
                    linewidth=2.5 if name == pooled else 1.2, color="#1d2330" if name == pooled else None, label=label)
        ax.set_title(f"{title}, {split} split")
        ax.set_xlabel("confidence (mean of bin)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0.3, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability of {shipped} ({kind}): 10 equal-width confidence bins, bins of ≥ 5 items")
    fig.tight_layout()
    fig.savefig(out)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shipped", required=True)
    p.add_argument("--seeds", nargs="+", required=True)
    p.add_argument("--split", choices=["dev", "final"], default="dev")
    p.add_argument("--kind", choices=["int8", "fp32"], default="int8")
    p.add_argument("--diagram", type=Path, default=DOCS / "reliability.png")
    args = p.parse_args()
    print(tables(args.shipped, args.seeds, args.split, args.kind))
    diagram(args.shipped, args.split, args.kind, args.diagram)
    print(f"\nreliability diagram: {args.diagram}")


if __name__ == "__main__":
    main()

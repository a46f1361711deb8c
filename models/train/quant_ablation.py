"""Which static-int8 calibration loses least against the fp32 export: quantizes one trained
candidate's work/NAME/model.fp32.onnx several ways and scores each on the dev split (never final),
with its agreement with fp32 and its speed on the dev texts.
    .venv-train/bin/python models/train/quant_ablation.py --name candidate-s13 [--variants a,b]
Writes work/NAME/quant_ablation.json and prints a Markdown table."""
import argparse
import json
import time

import numpy as np
from tokenizers import Tokenizer

import data
import evaluate
from quantize import quantize
from train import WORK

ALL_FFN_OUT = tuple(f"layers.{i}/out/MatMul" for i in range(6))
# Each variant's settings over quantize()'s defaults, whose outlier split (folded-outliers-4) ships.
PLAIN = {"ffn_outlier_channels": 0}
VARIANTS = {
    "minmax-512": PLAIN,
    "percentile-99.999": PLAIN | {"method": "percentile", "percentile": 99.999},
    "smooth-0.5": PLAIN | {"smooth_alpha": 0.5},
    "smooth-ffn-out-0.7": PLAIN | {"smooth_alpha": 0.7, "smooth_only": ("/out/MatMul",)},
    "weights-only": PLAIN | {"keep_fp32": ("MatMul",)},
    "qkv-fp32": PLAIN | {"keep_fp32": ("query/MatMul", "key/MatMul", "value/MatMul")},
    "attn-out-fp32": PLAIN | {"keep_fp32": ("attn_out/MatMul",)},
    "inter-fp32": PLAIN | {"keep_fp32": ("inter/MatMul",)},
    "ffn-out-fp32": PLAIN | {"keep_fp32": ALL_FFN_OUT},
    **{f"layer-{i}-ffn-out-fp32": PLAIN | {"keep_fp32": (f"layers.{i}/out/MatMul",)} for i in range(6)},
    "masked-outliers-4": PLAIN | {"outlier_channels": 4, "outlier_only": ("out/MatMul",)},
    "all-masked-outliers-4": PLAIN | {"outlier_channels": 4, "outlier_only": ("MatMul",)},
    **{f"folded-outliers-{k}": {"ffn_outlier_channels": k} for k in (4, 8)},
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", default="candidate-s13")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--keep", action="store_true", help="keep each export as work/NAME/model.VARIANT.onnx")
    p.add_argument("--limit", type=int, default=0, help="score the first N texts of each dev set (a quick look); 0 = all")
    args = p.parse_args()
    work = WORK / args.name
    splits = data.load()
    dev = {name: items[:args.limit] if args.limit else items for name, items in splits["dev"].items()}
    tok_path = work / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    train_texts = [it.text for items in splits["train"].values() for it in items]
    texts = {name: [it.text for it in items] for name, items in dev.items()}

    def score(path):
        started = time.perf_counter()
        preds = {name: evaluate.predict(path, t, args.threads, tok_path) for name, t in texts.items()}
        return preds, time.perf_counter() - started

    reference, fp32_seconds = score(work / "model.fp32.onnx")
    out_path = work / (f"quant_ablation.first{args.limit}.json" if args.limit else "quant_ablation.json")
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["fp32"] = {"seconds": round(fp32_seconds, 1), **summary(reference, reference, dev)}
    for variant in args.variants:
        dst = work / f"model.{variant}.onnx"
        quantize(work / "model.fp32.onnx", dst, tok, train_texts, args.seed, **VARIANTS[variant])
        preds, seconds = score(dst)
        results[variant] = {"seconds": round(seconds, 1), "bytes": dst.stat().st_size, **summary(preds, reference, dev)}
        if not args.keep:
            dst.unlink()
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        print(variant, json.dumps(results[variant]), flush=True)
    print(table(results))


def summary(preds, reference, dev):
    """Per set: accuracy on its head, and the share of predictions equal to fp32's."""
    out = {}
    for name, items in dev.items():
        head = 1 if name in evaluate.TOPIC_SETS else 0
        gold = [it.topic if head else it.sentiment for it in items]
        probs, ref = preds[name][head], reference[name][head]
        out[name] = {"accuracy": round(float((probs.argmax(1) == np.asarray(gold)).mean()), 4),
                     "agree_fp32": round(float((probs.argmax(1) == ref.argmax(1)).mean()), 4),
                     "ece": evaluate.ece(probs, gold)}
    return out


def table(results):
    sets = [k for k in results["fp32"] if k != "seconds"]
    lines = ["| export | " + " | ".join(f"{s} acc (agree)" for s in sets) + " | dev seconds |",
             "|---|" + "---:|" * (len(sets) + 1)]
    for variant, r in results.items():
        cells = [f"{r[s]['accuracy']:.3f} ({r[s]['agree_fp32']:.3f})" for s in sets]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {r['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

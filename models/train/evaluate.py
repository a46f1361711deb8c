"""Scores an exported model with ONNX Runtime, set by set: accuracy with its 95 % interval, macro-F1,
and the expected calibration error of the head the set labels."""
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import f1_score
from tokenizers import Tokenizer

import data

TOPIC_SETS = ("reuters", "reuters_with_body", "tweets_topic")


def predict(path, texts, threads, tokenizer_path, batch_size=64):
    """Class probabilities for texts, batched by length like the Rust batcher."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Exact int8 products on x86 CPUs without VNNI too (golden.py says why).
    opts.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(data.MAX_LENGTH)
    encs = tok.encode_batch(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    sent = np.zeros((len(texts), len(data.SENTIMENT)), np.float32)
    topic = np.zeros((len(texts), len(data.TOPICS)), np.float32)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        t = max(len(encs[j].ids) for j in idx)
        ids = np.zeros((len(idx), t), np.int64)
        mask = np.zeros((len(idx), t), np.int64)
        for r, j in enumerate(idx):
            n = len(encs[j].ids)
            ids[r, :n] = encs[j].ids
            mask[r, :n] = 1
        s, tp = sess.run(["sentiment_probs", "topic_probs"], {"input_ids": ids, "attention_mask": mask})
        sent[idx], topic[idx] = s, tp
    return sent, topic


def wilson(correct, n, z=1.96):
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def ece(probs, gold, bins=10):
    """Expected calibration error of the top class, in `bins` equal-width confidence bins."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(gold)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return round(float(total), 4)


def reliability(probs, gold, bins=10):
    """Per confidence bin: (mean confidence, accuracy, count), for the reliability diagram."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(gold)
    rows = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            rows.append((float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())))
    return rows


def metrics(probs, gold):
    pred = probs.argmax(1)
    correct = int((pred == np.asarray(gold)).sum())
    return {
        "n": len(gold),
        "accuracy": round(correct / len(gold), 4),
        "accuracy_95": wilson(correct, len(gold)),
        "macro_f1": round(float(f1_score(gold, pred, average="macro")), 4),
        "ece": ece(probs, gold),
    }


def uncalibrated(probs, temperature):
    """The probabilities before temperature scaling: softmax(z / T) raised to T and renormalised is
    softmax(z), so what calibration was worth can be measured on the exported model itself."""
    with np.errstate(divide="ignore"):
        scaled = np.exp(temperature * (np.log(probs) - np.log(probs).max(1, keepdims=True)))
    return scaled / scaled.sum(1, keepdims=True)


def evaluate(path, sets, threads, tokenizer_path, temperatures):
    """{set: metrics} for every set in `sets` ({name: [data.Item]}); Reuters also as a pipeline with
    `body_chars = 200` would send it. `ece_uncalibrated` is each ECE without the head's temperature."""
    sets = dict(sets)
    if "reuters" in sets:
        sets["reuters_with_body"] = [data.Item(it.lead or it.text, "reuters", topic=data.TOPICS[it.topic]) for it in sets["reuters"]]
    out = {}
    heads = {"head_sentiment": ([], []), "head_topic": ([], [])}
    for name, items in sets.items():
        sent, topic = predict(Path(path), [it.text for it in items], threads, tokenizer_path)
        if name in TOPIC_SETS:
            probs, gold, temperature = topic, [it.topic for it in items], temperatures["topic"]
        else:
            probs, gold, temperature = sent, [it.sentiment for it in items], temperatures["sentiment"]
        out[name] = metrics(probs, gold)
        out[name]["ece_uncalibrated"] = ece(uncalibrated(probs, temperature), gold)
        out[name]["reliability"] = reliability(probs, gold)
        if name == "phrasebank":
            full = [i for i, it in enumerate(items) if it.agree == 100]
            out[name]["agree_100"] = metrics(probs[full], [gold[i] for i in full])
        if name != "reuters_with_body":
            pooled = heads["head_topic" if name in TOPIC_SETS else "head_sentiment"]
            pooled[0].append(probs)
            pooled[1].extend(gold)
    # Each head over all the sets it is scored on (Reuters by headline only), as a head's ECE target reads.
    for head, (probs, gold) in heads.items():
        if gold:
            probs = np.concatenate(probs)
            temperature = temperatures["topic" if head == "head_topic" else "sentiment"]
            out[head] = metrics(probs, gold) | {"ece_uncalibrated": ece(uncalibrated(probs, temperature), gold),
                                                "reliability": reliability(probs, gold)}
    return out


def markdown(results):
    rows = ["| split | model | set | n | accuracy (95 % interval) | macro-F1 | ECE |", "|---|---|---|---:|---|---:|---:|"]
    for split in ("dev", "final"):
        for kind, sets in results.get(split, {}).items():
            for name, r in sets.items():
                lo, hi = r["accuracy_95"]
                rows.append(f"| {split} | {kind} | {name} | {r['n']} | {r['accuracy']:.4f} ({lo:.3f}–{hi:.3f}) "
                            f"| {r['macro_f1']:.4f} | {r['ece']:.4f} |")
    return "\n".join(rows)


"""Scores an exported model with ONNX Runtime on the held-out validation splits."""
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import accuracy_score, f1_score
from tokenizers import Tokenizer

import data


def predict(path, texts, threads, batch_size=64):
    """Class probabilities for texts, batched by length like the Rust batcher."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(data.MODELS / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(data.LABELS["max_length"])
    encs = tok.encode_batch(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    sent = np.zeros((len(texts), 3), np.float32)
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
        s, tp = sess.run(None, {"input_ids": ids, "attention_mask": mask})
        sent[idx], topic[idx] = s, tp
    return sent, topic


def evaluate(path, val, threads):
    out = {}
    for name, items in val.items():
        texts = [x[0] for x in items]
        sent, topic = predict(Path(path), texts, threads)
        if name.startswith("reuters"):
            gold = [x[2] for x in items]
            pred = topic.argmax(1)
            labelled = [i for i, x in enumerate(items) if x[2] != data.TOPICS.index("other")]
        else:
            gold = [x[1] for x in items]
            pred = sent.argmax(1)
        out[name] = {
            "n": len(items),
            "accuracy": round(float(accuracy_score(gold, pred)), 4),
            "macro_f1": round(float(f1_score(gold, pred, average="macro")), 4),
        }
        if name == "phrasebank":
            agreement = data.phrasebank_agreement()
            full = [i for i, x in enumerate(items) if agreement[x[0]] == 100]
            g, p = [gold[i] for i in full], [pred[i] for i in full]
            out[name]["agree_100"] = {"n": len(full), "accuracy": round(float(accuracy_score(g, p)), 4),
                                      "macro_f1": round(float(f1_score(g, p, average="macro")), 4)}
        if name.startswith("reuters"):
            out[name]["accuracy_without_other"] = round(
                float(accuracy_score([gold[i] for i in labelled], [pred[i] for i in labelled])), 4)
    return out


def markdown(results):
    rows = ["| model | set | n | accuracy | macro-F1 |", "|---|---|---|---|---|"]
    for kind in ("fp32", "int8"):
        for name, r in results[kind].items():
            rows.append(f"| {kind} | {name} | {r['n']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |")
    return "\n".join(rows)

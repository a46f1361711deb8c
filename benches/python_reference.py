"""The Python pipeline `bearwatch bench classify` compares against: what a Python service does by default.

onnxruntime + tokenizers, the same model file and thread count, fixed batches of --batch-size items in
arrival order, each padded to its longest item; tokenizing and inference alternate in one thread.
Prints one JSON object for one timed pass (after an untimed one): items, seconds, CPU seconds (all
of the process's threads), per-batch milliseconds, padded tokens.
"""
import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def int8_saturates():
    """Whether ONNX Runtime's u8 x s8 MatMuls clip on this CPU (x86 without VNNI): bearwatch then asks
    for its exact u8 x u8 kernel (session.x64quantprecision), and so does this reference, so that
    both run the same arithmetic (src/classify/runtime.rs says why)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return not {"avx512_vnni", "avx_vnni"} & set(flags)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)

    args = p.parse_args()

    model = Path(args.model)
    labels = json.loads((model / "labels.json").read_text())
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.enable_truncation(labels["max_length"])
    tok.enable_padding()  # pad each batch to its longest item
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if int8_saturates():
        opts.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(str(model / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    with open(args.input, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.items), f)]

    def run(batch):
        encs = tok.encode_batch(batch)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        sess.run(None, {"input_ids": ids, "attention_mask": mask})
        return ids.size

    for i in range(0, len(texts), args.batch_size):  # an untimed pass first, as the Rust side does
        run(texts[i:i + args.batch_size])
    batch_ms, padded = [], 0
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), args.batch_size):
        t = time.perf_counter()
        padded += run(texts[i:i + args.batch_size])
        batch_ms.append((time.perf_counter() - t) * 1e3)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"items": len(texts), "seconds": seconds, "cpu_seconds": cpu_seconds, "batch_ms": batch_ms, "padded_tokens": padded}))


if __name__ == "__main__":
    main()

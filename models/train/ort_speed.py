"""Relative speed of ONNX model files under ONNX Runtime: the same 2,048 benchmark headlines in
batches of 64 (in file order), 2 threads, one untimed warm-up, then interleaved timed rounds so that
a shared machine's drift hits every file alike. Prints each file's median items/s and its per-round
ratio to the first file.
    .venv/bin/python models/train/ort_speed.py models/model.onnx OTHER.onnx [--rounds 5]
(the speed column of the model card's "Which int8" table; `bearwatch bench classify` measures the
whole pipeline). `--config KEY=VALUE` adds the first file again under that ONNX Runtime session
setting (e.g. `session.intra_op.allow_spinning=0`). CPU ms/item counts every thread of the process.
`--as-bearwatch` runs the batches as bearwatch's CPU sessions would: sorted by length into batches of
at most 512 tokens, one thread, SkipLayerNormFusion off; each other file's largest output difference
from the first is printed."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input", default=str(ROOT / "benches/data/headlines_mix.jsonl"))
    p.add_argument("--config", action="append", default=[], help="KEY=VALUE: the first file again with this session setting")
    p.add_argument("--as-bearwatch", action="store_true", help="length-sorted ≤ 512-token batches, 1 thread, SkipLayerNormFusion off")
    args = p.parse_args()
    if args.as_bearwatch:
        args.threads = 1
    tok = Tokenizer.from_file(str(ROOT / "models/tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(64)
    texts = [json.loads(line)["text"] for line in open(args.input)][:2048]
    encoded = [e.ids for e in tok.encode_batch(texts)]
    chunks = [encoded[i:i + 64] for i in range(0, len(encoded), 64)]
    if args.as_bearwatch:
        chunks, ordered = [], sorted(encoded, key=len)
        while ordered:
            rows = 1
            while rows < min(64, len(ordered)) and (rows + 1) * len(ordered[rows]) <= 512:
                rows += 1
            chunks.append(ordered[:rows])
            ordered = ordered[rows:]
    batches = []
    for chunk in chunks:
        ids = np.zeros((len(chunk), max(map(len, chunk))), np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(chunk):
            ids[row, :len(e)], mask[row, :len(e)] = e, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    def session(path, entry=None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        if entry:
            opts.add_session_config_entry(*entry.split("=", 1))
        disabled = ["SkipLayerNormFusion"] if args.as_bearwatch else []
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)

    runs = [(m, session(m)) for m in args.models] + [(f"{args.models[0]} with {c}", session(args.models[0], c)) for c in args.config]
    first_outputs = None
    warm_up = batches if args.as_bearwatch else batches[:3]  # all of them where outputs are compared
    for label, s in runs:
        outputs = [s.run(None, batch) for batch in warm_up]
        if first_outputs is None:
            first_outputs = outputs
        elif args.as_bearwatch:
            diff = max(float(np.abs(a - b).max()) for x, y in zip(first_outputs, outputs) for a, b in zip(x, y))
            print(f"{label}: largest output difference from the first file {diff:g}")
    rates, cpu = [[] for _ in runs], [[] for _ in runs]
    for _ in range(args.rounds):
        for k, (_, s) in enumerate(runs):
            started, used = time.perf_counter(), time.process_time()
            for batch in batches:
                s.run(None, batch)
            rates[k].append(len(encoded) / (time.perf_counter() - started))
            cpu[k].append((time.process_time() - used) * 1e3 / len(encoded))
    first = np.array(rates[0])
    for (label, _), r, c in zip(runs, rates, cpu):
        ratio = np.array(r) / first
        print(f"{label}: median {np.median(r):.0f} items/s, {np.median(c):.2f} CPU ms/item; to the first: "
              f"median {np.median(ratio):.2f}× ({ratio.min():.2f}–{ratio.max():.2f})")


if __name__ == "__main__":
    main()

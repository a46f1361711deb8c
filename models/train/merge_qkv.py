"""An experiment, not part of the export: each layer's query, key and value projections as one
int8 `MatMulIntegerToFloat` (the three weight matrices side by side, per-column scales and zero
points, the biases joined) and a Split, on a file that `bias_into_matmul.py` wrote. The same
arithmetic column for column, so the outputs are bit for bit the same; one GEMM packs the
activations once instead of three times (docs/BENCHMARKS.md, issue 36: measured, not kept).
    .venv/bin/python models/train/bias_into_matmul.py models/model.onnx /tmp/bias.onnx
    .venv/bin/python models/train/merge_qkv.py /tmp/bias.onnx /tmp/qkv.onnx
    .venv/bin/python models/train/ort_speed.py /tmp/bias.onnx /tmp/qkv.onnx --as-bearwatch --rounds 8
"""
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fuse_attention import _constant, save_with_contrib_ops


def merge_qkv(src, dst):
    model = onnx.load(str(src))
    graph = model.graph
    value = lambda name: _constant(graph, name)
    by_name = {n.name: n for n in graph.node}
    layer = 0
    while f"/layers.{layer}/query/MatMul" in by_name:
        p = f"/layers.{layer}/"
        parts = [by_name[p + f"{x}/MatMul"] for x in ("query", "key", "value")]
        if any(n.op_type != "MatMulIntegerToFloat" or n.input[0] != parts[0].input[0] or n.input[2] != parts[0].input[2] for n in parts):
            raise SystemExit(f"layer {layer}: not three bias-folded int8 projections of one input (run bias_into_matmul.py first)")
        columns = [value(n.input[1]).shape[1] for n in parts]
        per_column = lambda i: np.concatenate([np.broadcast_to(value(n.input[i]).reshape(-1), (c,)) for n, c in zip(parts, columns)])
        joined = {
            p + "qkv_weight": np.concatenate([value(n.input[1]) for n in parts], axis=1),
            p + "qkv_scale": per_column(3).astype(np.float32),
            p + "qkv_zero_point": per_column(5).astype(value(parts[0].input[1]).dtype),
            p + "qkv_bias": np.concatenate([value(n.input[6]) for n in parts]).astype(np.float32),
            p + "qkv_sizes": np.array(columns, np.int64),
        }
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in joined.items())
        a = parts[0]
        merged = helper.make_node("MatMulIntegerToFloat", [a.input[0], p + "qkv_weight", a.input[2], p + "qkv_scale", a.input[4], p + "qkv_zero_point", p + "qkv_bias"],
                                  [p + "qkv"], name=p + "qkv/MatMul", domain="com.microsoft")
        split = helper.make_node("Split", [p + "qkv", p + "qkv_sizes"], [n.output[0] for n in parts], name=p + "qkv/Split", axis=-1)
        at = list(graph.node).index(parts[0])
        for n in parts:
            graph.node.remove(n)
        graph.node.insert(at, split)
        graph.node.insert(at, merged)
        layer += 1
    save_with_contrib_ops(model, graph, dst)
    return layer


if __name__ == "__main__":
    print(f"merged {merge_qkv(sys.argv[1], sys.argv[2])} layers")

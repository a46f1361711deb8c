"""Not part of the export: every int8 MatMul with its bias Add written as one
`com.microsoft.MatMulIntegerToFloat` node that adds the bias itself, into a file, to measure the
rewrite with Python onnxruntime (docs/BENCHMARKS.md, "One fusion left out on CPU": 3–8 % less CPU
in ONNX Runtime alone). bearwatch makes the same rewrite at load for CPU sessions
(`classify::onnx`); the shipped file stays without it, since the CUDA provider may not run the op.

ONNX Runtime turns DequantizeLinear → MatMul into MatMulIntegerToFloat at load but leaves the bias
Add after it (and fuses that Add with the GELU into BiasGelu, which is slower than GELU alone).
    .venv/bin/python models/train/bias_into_matmul.py models/model.onnx /tmp/bias.onnx
"""
import sys

import onnx
from onnx import helper

from fuse_attention import save_with_contrib_ops


def bias_into_matmul(src, dst):
    model = onnx.load(str(src))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    count = 0
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        dq_a, dq_w = (producer.get(i) for i in matmul.input)
        if not (dq_a and dq_w and dq_a.op_type == dq_w.op_type == "DequantizeLinear" and dq_w.input[0] in weights):
            continue
        out, bias, add = matmul.output[0], "", None
        users = readers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = next(i for i in users[0].input if i != out)
            if other in weights and len(weights[other].dims) == 1:
                add, bias, out = users[0], other, users[0].output[0]
        zero_point = lambda dq: dq.input[2] if len(dq.input) > 2 else ""
        node = helper.make_node("MatMulIntegerToFloat",
                                [dq_a.input[0], dq_w.input[0], dq_a.input[1], dq_w.input[1], zero_point(dq_a), zero_point(dq_w), bias],
                                [out], name=matmul.name, domain="com.microsoft")
        at = list(graph.node).index(matmul)
        graph.node.remove(matmul)
        graph.node.insert(at, node)
        if add is not None:
            graph.node.remove(add)
        count += 1
    save_with_contrib_ops(model, graph, dst)
    return count


if __name__ == "__main__":
    print(f"rewrote {bias_into_matmul(sys.argv[1], sys.argv[2])} MatMuls")

"""An experiment, not part of the export: each layer's self-attention as one ONNX Runtime
MultiHeadAttention node (docs/BENCHMARKS.md, "One fusion left out on CPU": bit-identical outputs,
level speed on the pipeline's batches, so not kept).

The exported graph spells attention out: per layer three Reshapes and Transposes, two fp32 MatMuls,
a Div, the mask's Add, a Softmax, a Transpose and Reshape back, and the shape arithmetic feeding
the Reshapes. ONNX Runtime's transformer optimizer finds no attention in the QDQ graph, so this
rewrite does it by node name: the int8 query/key/value projections and their bias Adds stay and
feed `com.microsoft.MultiHeadAttention`, which takes the padding mask as 0/1 per key (masked keys
get −10000 before the softmax, as in the export).
    .venv/bin/python models/train/fuse_attention.py models/model.onnx /tmp/fused.onnx
    .venv/bin/python models/train/ort_speed.py models/model.onnx /tmp/fused.onnx --threads 1
"""
import sys

import onnx
from onnx import helper, numpy_helper

MASK = "attention_mask_keys_int32"


def _constant(graph, name):
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    for i in graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    raise KeyError(name)


def drop_dead(graph):
    """Removes nodes whose outputs nothing reads, then initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def save_with_contrib_ops(model, graph, dst):
    """Drops what nothing reads, declares the com.microsoft domain and writes the file."""
    drop_dead(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))


def fuse_attention(src, dst):
    model = onnx.load(str(src))
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    layer, fused = 0, []
    while f"/layers.{layer}/query/MatMul" in by_name:
        p = f"/layers.{layer}/"
        heads = int(_constant(graph, by_name[p + "Div"].input[1]))
        root = float(_constant(graph, by_name[p + "Div_1"].input[1]))
        out = by_name[p + "Reshape_3"].output[0]
        for suffix in ("Reshape", "Reshape_1", "Reshape_2", "Transpose", "Transpose_1", "Transpose_2", "MatMul", "Div_1",
                       "Add", "Softmax", "MatMul_1", "Transpose_3", "Reshape_3"):
            graph.node.remove(by_name[p + suffix])
        fused.append(helper.make_node(
            "MultiHeadAttention",
            [by_name[p + f"{part}/Add"].output[0] for part in ("query", "key", "value")] + ["", MASK],
            [out], name=p + "MultiHeadAttention", domain="com.microsoft", num_heads=heads, scale=1.0 / root,
            mask_filter_value=-10000.0))
        layer += 1
    for node in fused:  # where its output's first reader was: the node list stays in order
        at = next(k for k, n in enumerate(graph.node) if node.output[0] in n.input)
        graph.node.insert(at, node)
    graph.node.insert(0, helper.make_node("Cast", ["attention_mask"], [MASK], name="/attention_mask_keys", to=onnx.TensorProto.INT32))
    save_with_contrib_ops(model, graph, dst)
    return layer


if __name__ == "__main__":
    print(f"fused {fuse_attention(sys.argv[1], sys.argv[2])} layers")

"""Batch-invariant int8 for the exported classifier.

ONNX Runtime's dynamic quantization picks one activation scale per batch, so a headline's scores
would move with its batch-mates (by up to 0.13 in probability on the golden headlines). Instead:

1. static int8 for every MatMul with a weight (per-channel int8 weights, activation scales fixed by
   calibration on training texts, one text per run so padding never enters a range); the attention
   MatMuls between two activations stay fp32;
2. weight-only int8 for the embedding tables (per-row scale, a DequantizeLinear before the Gather).

Every scale is a constant, so each row of a batch is computed exactly as it would be alone.
"""
import os
import random

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import calibrate
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)


def _flatten_runs(collect):
    """ORT's histogram calibrators stack a tensor's runs into one array before flattening it, which
    fails when texts differ in length (one text per run, no padding): flatten each run first."""
    def flat(self, name_to_arr):
        return collect(self, {name: np.concatenate([np.asarray(a).ravel() for a in arrs]) if isinstance(arrs, list) else arrs
                              for name, arrs in name_to_arr.items()})
    return flat


calibrate.HistogramCollector.collect = _flatten_runs(calibrate.HistogramCollector.collect)


class _Texts(CalibrationDataReader):
    def __init__(self, token_ids):
        self.feeds = iter([{"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
                           for ids in token_ids])

    def get_next(self):
        return next(self.feeds, None)


def quantize(src, dst, tokenizer, texts, seed, calibration_size=512, method="minmax", percentile=99.999,
             keep_fp32=(), smooth_alpha=None, int8_embeddings=True):
    """Static int8 MatMuls calibrated on `calibration_size` of `texts`, then int8 embeddings.
    `method`: how an activation's range is chosen ("minmax", "percentile" at `percentile`, "entropy");
    `keep_fp32`: name suffixes of weight MatMuls left in fp32 (e.g. "layers.5/out/MatMul")."""
    sample = random.Random(seed).sample(texts, min(calibration_size, len(texts)))
    token_ids = [e.ids for e in tokenizer.encode_batch(sample)]
    if smooth_alpha is not None:
        smooth(src, str(dst) + ".smooth.onnx", token_ids, smooth_alpha)
        src = str(dst) + ".smooth.onnx"
    model = onnx.load(str(src))
    weights = {i.name for i in model.graph.initializer}
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul"
                and (n.input[1] not in weights or any(n.name.endswith(k) for k in keep_fp32))]
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    tmp = str(dst) + ".static.onnx"
    quantize_static(str(src), tmp, _Texts(token_ids),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded,
                    calibrate_method=methods[method], extra_options={"CalibPercentile": percentile})
    quantize_weights(tmp, dst, gathers=int8_embeddings)
    os.remove(tmp)
    if smooth_alpha is not None:
        os.remove(src)


def smooth(src, dst, token_ids, alpha):
    """SmoothQuant (Xiao et al. 2023): a few input channels of a transformer's activations are far
    larger than the rest (BERT's LayerNorm outliers), and one int8 scale per tensor then leaves the
    others a handful of levels. Per input channel j of each weight MatMul, x_j is divided by
    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (a constant Mul, left in fp32) and the weight's row j
    multiplied by it: the same product, with ranges int8 can hold. MatMuls sharing an input (Q, K, V)
    share s. Channel maxima come from the fp32 model on `token_ids`, one text per run."""
    import onnxruntime as ort
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            groups.setdefault(node.input[0], []).append(node)
    probe = onnx.load(str(src))
    probe.graph.output.extend([helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in groups])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(groups)
    amax = {name: None for name in names}
    for ids in token_ids:
        outs = session.run(names, {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)})
        for name, out in zip(names, outs):
            m = np.abs(out).reshape(-1, out.shape[-1]).max(0)
            amax[name] = m if amax[name] is None else np.maximum(amax[name], m)
    for name, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
        scale = (np.maximum(amax[name], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        scale = np.clip(scale, 1e-2, 1e2)
        smoothed = name + "_smoothed"
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), name + "_smooth_scale"))
        graph.node.append(helper.make_node("Mul", [name, name + "_smooth_scale"], [smoothed], name=name + "_smooth"))
        for node, w in zip(nodes, weights):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(np.float32), node.input[1]))
            node.input[0] = smoothed
    _topological_sort(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _topological_sort(graph):
    """Reorders the nodes so that each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            (ordered.append(node), ready.update(node.output)) if all(i in ready for i in node.input) else rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("the graph has a cycle")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_weights(src, dst, min_elements=4096, gathers=True):
    """Weight-only int8 for the fp32 2-D weights still feeding a MatMul or a Gather."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    new_inits, new_nodes = [], []
    for name, init in list(inits.items()):
        w = numpy_helper.to_array(init)
        uses = consumers.get(name, [])
        if w.dtype != np.float32 or w.ndim != 2 or w.size < min_elements or not uses:
            continue
        ops = {(n.op_type, k) for n, k in uses}
        if ops <= {("MatMul", 1)}:
            axis = 1  # [in, out]: one scale per output column
        elif ops <= {("Gather", 0)} and gathers:
            axis = 0  # embeddings [vocab, hidden]: one scale per token row
        else:
            continue
        scale = np.abs(w).max(axis=1 - axis) / 127.0
        scale[scale == 0] = 1.0
        shape = (1, -1) if axis == 1 else (-1, 1)
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(init)
        new_inits += [numpy_helper.from_array(q, name + "_int8"),
                      numpy_helper.from_array(scale.astype(np.float32), name + "_scale"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), name + "_zero")]
        new_nodes.append(helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero"],
                                          [name], axis=axis, name=name + "_dequantize"))
    graph.initializer.extend(new_inits)
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))

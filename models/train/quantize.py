"""Batch-invariant int8 for the exported classifier.

ONNX Runtime's dynamic quantization picks one activation scale per batch, so a headline's scores
would move with its batch-mates (by up to 0.13 in probability on the golden headlines). Instead:

1. static int8 for every MatMul with a weight (per-channel int8 weights, activation scales fixed by
   calibration on training texts, one text per run so padding never enters a range), each giving
   its int32 sums straight to fp32 (float_outputs.py: no output rounding to uint8 and back); the
   attention MatMuls between two activations stay fp32;
2. weight-only int8 for the embedding tables (per-row scale), the int8 rows gathered first and
   dequantized after (gather_first.py: ONNX Runtime would dequantize the whole table every run);
3. the few outlier channels of each feed-forward output MatMul's input computed in fp32 on a side
   path (`split_ffn_outliers`), so that one int8 scale per tensor fits the other channels.

The other options (percentile ranges, SmoothQuant, fp32 MatMuls, masked outliers) are what
quant_ablation.py measured against it (model card, "Which int8").

Every scale is a constant, so each row of a batch is computed exactly as it would be alone.
"""
import os
import random

import numpy as np
import onnx
from onnx import helper, numpy_helper
from float_outputs import float_outputs
from gather_first import gather_first
from onnxruntime.quantization import calibrate
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)


def _flatten_runs(collect):
    """ORT's percentile calibrator stacks a tensor's runs into one array before flattening it, which
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
             keep_fp32=(), smooth_alpha=None, smooth_only=("MatMul",), int8_embeddings=True, outlier_channels=0,
             outlier_only=("out/MatMul",), ffn_outlier_channels=4):
    """Static int8 MatMuls calibrated on `calibration_size` of `texts`, then int8 embeddings.
    `method`: how an activation's range is chosen ("minmax", or "percentile" at `percentile`);
    `keep_fp32`: name suffixes of weight MatMuls left in fp32 (e.g. "layers.5/out/MatMul");
    `smooth_alpha`: SmoothQuant first, on the MatMuls named by `smooth_only`; `outlier_channels`:
    that many channels masked out to fp32 in the MatMuls named by `outlier_only`;
    `ffn_outlier_channels`: the shipped split (`split_ffn_outliers`); 0 = plain static int8."""
    sample = random.Random(seed).sample(texts, min(calibration_size, len(texts)))
    token_ids = [e.ids for e in tokenizer.encode_batch(sample)]
    rewrites = [(smooth, smooth_alpha is not None, (smooth_alpha, smooth_only)),
                (split_outliers, outlier_channels > 0, (outlier_channels, outlier_only)),
                (split_ffn_outliers, ffn_outlier_channels > 0, (ffn_outlier_channels,))]
    intermediate = []
    for rewrite, wanted, options in rewrites:
        if wanted:
            intermediate.append(f"{dst}.{rewrite.__name__}.onnx")
            rewrite(src, intermediate[-1], token_ids, *options)
            src = intermediate[-1]
    model = onnx.load(str(src))
    weights = {i.name for i in model.graph.initializer}
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul"
                and (n.input[1] not in weights or n.name.endswith(("_fp32", *keep_fp32)))]
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    tmp = str(dst) + ".static.onnx"
    quantize_static(str(src), tmp, _Texts(token_ids),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded,
                    calibrate_method=methods[method], extra_options={"CalibPercentile": percentile})
    quantize_weights(tmp, dst, gathers=int8_embeddings)
    for path in [tmp, *intermediate]:
        os.remove(path)


def smooth(src, dst, token_ids, alpha, only=("MatMul",)):
    """SmoothQuant (Xiao et al. 2023): a few input channels of a transformer's activations are far
    larger than the rest (BERT's LayerNorm outliers), and one int8 scale per tensor then leaves the
    others a handful of levels. Per input channel j of each weight MatMul, x_j is divided by
    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (a constant Mul, left in fp32) and the weight's row j
    multiplied by it: the same product, with ranges int8 can hold. MatMuls sharing an input (Q, K, V)
    share s. Channel maxima come from the fp32 model on `token_ids`, one text per run; `only`: name
    suffixes of the MatMuls smoothed."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups = {}
    for node in _weight_matmuls(graph, inits, only):
        groups.setdefault(node.input[0], []).append(node)
    amax = _channel_maxima(src, list(groups), token_ids)
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


def split_outliers(src, dst, token_ids, channels, only=("out/MatMul",)):
    """LLM.int8()-style decomposition (Dettmers et al. 2022): the `channels` input channels of each
    MatMul with the largest activations are multiplied in fp32 by their own small MatMul, and zeroed
    (a constant Mul) before the int8 one, whose activation range then spans the other channels only."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    targets = _weight_matmuls(graph, inits, only)
    amax = _channel_maxima(src, [n.input[0] for n in targets], token_ids)
    for node in targets:
        w = numpy_helper.to_array(inits[node.input[1]])
        top = np.argsort(amax[node.input[0]])[-channels:]
        mask = np.ones(w.shape[0], np.float32)
        mask[top] = 0
        base = node.name.strip("/").replace("/", "_")
        graph.initializer.extend([numpy_helper.from_array(mask, base + "_inlier_mask"),
                                  numpy_helper.from_array(top.astype(np.int64), base + "_outliers"),
                                  numpy_helper.from_array(w[top], base + "_outlier_weight")])
        x, y = node.input[0], node.output[0]
        node.input[0], node.output[0] = base + "_inliers", base + "_inlier_product"
        graph.node.extend([
            helper.make_node("Mul", [x, base + "_inlier_mask"], [base + "_inliers"], name=base + "_inlier_mask"),
            helper.make_node("Gather", [x, base + "_outliers"], [base + "_outlier_x"], axis=-1, name=base + "_outlier_gather"),
            helper.make_node("MatMul", [base + "_outlier_x", base + "_outlier_weight"], [base + "_outlier_product"],
                             name=base + "_outlier/MatMul_fp32"),
            helper.make_node("Add", [base + "_inlier_product", base + "_outlier_product"], [y], name=base + "_outlier_add"),
        ])
    _topological_sort(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def split_ffn_outliers(src, dst, token_ids, channels):
    """As `split_outliers` for each feed-forward output MatMul (its input is GELU(x W_inter + b)),
    without a mask over the wide activation: the outlier columns of W_inter and b are zeroed, so
    GELU gives 0 there, and a side path computes those `channels` columns in fp32 from the layer's
    input (x W_inter[:, top] + b[top], GELU, times W_out[top])."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outs = _weight_matmuls(graph, inits, ("/out/MatMul",))
    amax = _channel_maxima(src, [n.input[0] for n in outs], token_ids)
    for out in outs:
        layer = out.name.rsplit("/out/MatMul", 1)[0]
        inter = nodes[layer + "/inter/MatMul"]
        bias_add = next(n for n in consumers[inter.output[0]] if n.op_type == "Add")
        bias_name = next(i for i in bias_add.input if i in inits)
        w_in, b_in = numpy_helper.to_array(inits[inter.input[1]]).copy(), numpy_helper.to_array(inits[bias_name]).copy()
        w_out = numpy_helper.to_array(inits[out.input[1]])
        top = np.argsort(amax[out.input[0]])[-channels:]
        base = layer.strip("/").replace("/", "_") + "_outliers"
        graph.initializer.extend([numpy_helper.from_array(w_in[:, top], base + "_w_in"),
                                  numpy_helper.from_array(b_in[top], base + "_b_in"),
                                  numpy_helper.from_array(w_out[top], base + "_w_out"),
                                  numpy_helper.from_array(np.array(2 ** 0.5, np.float32), base + "_sqrt2"),
                                  numpy_helper.from_array(np.array(1.0, np.float32), base + "_one"),
                                  numpy_helper.from_array(np.array(0.5, np.float32), base + "_half")])
        w_in[:, top], b_in[top] = 0, 0
        inits[inter.input[1]].CopyFrom(numpy_helper.from_array(w_in, inter.input[1]))
        inits[bias_name].CopyFrom(numpy_helper.from_array(b_in, bias_name))
        y = out.output[0]
        out.output[0] = base + "_inlier_product"
        t = lambda k: f"{base}_{k}"
        graph.node.extend([
            helper.make_node("MatMul", [inter.input[0], t("w_in")], [t("h0")], name=t("in/MatMul_fp32")),
            helper.make_node("Add", [t("h0"), t("b_in")], [t("h")], name=t("in_bias")),
            helper.make_node("Div", [t("h"), t("sqrt2")], [t("h_scaled")], name=t("gelu_div")),
            helper.make_node("Erf", [t("h_scaled")], [t("erf")], name=t("gelu_erf")),
            helper.make_node("Add", [t("erf"), t("one")], [t("erf1")], name=t("gelu_add")),
            helper.make_node("Mul", [t("h"), t("erf1")], [t("g0")], name=t("gelu_mul")),
            helper.make_node("Mul", [t("g0"), t("half")], [t("g")], name=t("gelu_half")),
            helper.make_node("MatMul", [t("g"), t("w_out")], [t("product")], name=t("out/MatMul_fp32")),
            helper.make_node("Add", [base + "_inlier_product", t("product")], [y], name=t("add")),
        ])
    _topological_sort(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _weight_matmuls(graph, inits, suffixes):
    """The MatMuls with a constant weight whose names end with one of `suffixes`."""
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.name.endswith(tuple(suffixes))]


def _channel_maxima(src, tensors, token_ids):
    """max |x_j| per last-axis channel of each named tensor, over `token_ids` (one text per run)."""
    import onnxruntime as ort
    probe = onnx.load(str(src))
    probe.graph.output.extend([helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = {}
    for ids in token_ids:
        outs = session.run(tensors, {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)})
        for name, out in zip(tensors, outs):
            m = np.abs(out).reshape(-1, out.shape[-1]).max(0)
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


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
    # Embedding rows gathered before they are dequantized (gather_first.py: same scores, less work).
    gather_first(model)
    # Int8 MatMuls hand fp32 to the bias Add (float_outputs.py: fewer operations, one rounding fewer).
    float_outputs(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))

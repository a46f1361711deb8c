//! Just enough of the ONNX protobuf to read a model's weights and write them back: the graph's
//! nodes (name, op, inputs, outputs) and its initializers, decoded to little-endian bytes. Writing
//! replaces the named initializers and copies every other byte of the file as it was, so a
//! fine-tuned candidate is the champion's graph, op for op, with new numbers in it. One rewrite of
//! nodes, for CPU sessions: [`Model::for_cpu`].

use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// ONNX `TensorProto.DataType` values this module decodes.
pub const FLOAT: i32 = 1;
pub const UINT8: i32 = 2;
pub const INT8: i32 = 3;
pub const INT64: i32 = 7;

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
    /// The values, little-endian, whatever field the file kept them in.
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn floats(&self) -> Result<Vec<f32>, String> {
        if self.data_type != FLOAT {
            return Err(format!("{}: type {} is not float", self.name, self.data_type));
        }
        Ok(self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    pub fn int8s(&self) -> Result<Vec<i8>, String> {
        if self.data_type != INT8 {
            return Err(format!("{}: type {} is not int8", self.name, self.data_type));
        }
        Ok(self.data.iter().map(|&b| b as i8).collect())
    }

    pub fn from_floats(name: &str, dims: &[i64], values: &[f32]) -> Tensor {
        Tensor { name: name.into(), dims: dims.to_vec(), data_type: FLOAT, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    pub fn from_int8s(name: &str, dims: &[i64], values: &[i8]) -> Tensor {
        Tensor { name: name.into(), dims: dims.to_vec(), data_type: INT8, data: values.iter().map(|&v| v as u8).collect() }
    }

    /// `None` past `usize`: no file holds that many values.
    fn elements(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d.max(0) as usize))
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// The `axis` attribute (DequantizeLinear's), if the node has one.
    axis: Option<i64>,
}

/// A parsed model: its bytes, and where in them the graph and each initializer lie.
pub struct Model {
    bytes: Vec<u8>,
    graph: Range<usize>,
    pub nodes: Vec<Node>,
    /// Each node's field in the graph (key to end) and its message, in `nodes`' order.
    node_fields: Vec<(Range<usize>, Range<usize>)>,
    /// The graph's output names.
    outputs: Vec<String>,
    initializers: Vec<(Range<usize>, Tensor)>,
    by_name: HashMap<String, usize>,
}

const MODEL_GRAPH: u32 = 7;
const MODEL_OPSET_IMPORT: u32 = 8;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_OUTPUT: u32 = 12;
/// The domain of ONNX Runtime's own operators.
const MICROSOFT: &str = "com.microsoft";

impl Model {
    pub fn parse(bytes: Vec<u8>) -> Result<Model, String> {
        let mut graph = None;
        for field in Fields::new(&bytes, 0..bytes.len()) {
            let field = field?;
            if field.number == MODEL_GRAPH {
                graph = Some(field.value.clone());
            }
        }
        let graph = graph.ok_or("the file has no graph")?;
        let (mut nodes, mut node_fields, mut initializers, mut outputs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for field in Fields::new(&bytes, graph.clone()) {
            let field = field?;
            match field.number {
                GRAPH_NODE => {
                    nodes.push(node(&bytes[field.value.clone()])?);
                    node_fields.push((field.whole, field.value));
                }
                GRAPH_INITIALIZER => initializers.push((field.whole, tensor(&bytes[field.value])?)),
                GRAPH_OUTPUT => {
                    for inner in Fields::new(&bytes, field.value) {
                        let inner = inner?;
                        if inner.number == 1 {
                            outputs.push(string(&bytes[inner.value])?);
                        }
                    }
                }
                _ => {}
            }
        }
        let by_name = initializers.iter().enumerate().map(|(i, (_, t))| (t.name.clone(), i)).collect();
        Ok(Model { bytes, graph, nodes, node_fields, outputs, initializers, by_name })
    }

    pub fn initializer(&self, name: &str) -> Result<&Tensor, String> {
        self.by_name.get(name).map(|&i| &self.initializers[i].1).ok_or_else(|| format!("no initializer {name:?}"))
    }

    pub fn node(&self, name: &str) -> Result<&Node, String> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| format!("no node {name:?}"))
    }

    /// The node that writes `output`.
    pub fn producer(&self, output: &str) -> Result<&Node, String> {
        self.nodes.iter().find(|n| n.outputs.iter().any(|o| o == output)).ok_or_else(|| format!("nothing writes {output:?}"))
    }

    /// The model's bytes with each tensor of `replace` in place of the initializer of its name.
    /// Every replacement must name an initializer and keep its type and shape.
    pub fn with_initializers(&self, replace: &[Tensor]) -> Result<Vec<u8>, String> {
        let mut new: HashMap<&str, &Tensor> = HashMap::new();
        for t in replace {
            let old = self.initializer(&t.name)?;
            if old.dims != t.dims || old.data_type != t.data_type || t.data.len() != old.data.len() {
                return Err(format!("{}: a replacement must keep type {} and shape {:?}", t.name, old.data_type, old.dims));
            }
            new.insert(&t.name, t);
        }
        let edits = self.initializers.iter().filter_map(|(whole, tensor)| {
            let mut message = Vec::new();
            encode_tensor(new.get(tensor.name.as_str())?, &mut message);
            Some((whole, Some((GRAPH_INITIALIZER, message))))
        });
        self.with_graph(&self.graph_edited(edits), &[])
    }

    /// The graph's bytes with each field at `whole` replaced by `(number, message)` or, for
    /// `None`, left out; `edits` in file order, every other byte as it was.
    fn graph_edited<'a>(&self, edits: impl IntoIterator<Item = (&'a Range<usize>, Option<(u32, Vec<u8>)>)>) -> Vec<u8> {
        let mut graph = Vec::with_capacity(self.graph.len());
        let mut at = self.graph.start;
        for (whole, new) in edits {
            graph.extend_from_slice(&self.bytes[at..whole.start]);
            if let Some((number, message)) = new {
                length_delimited(number, &message, &mut graph);
            }
            at = whole.end;
        }
        graph.extend_from_slice(&self.bytes[at..self.graph.end]);
        graph
    }

    /// The model's bytes with `graph` as its graph and `fields` (encoded model fields) appended.
    fn with_graph(&self, graph: &[u8], fields: &[u8]) -> Result<Vec<u8>, String> {
        // The graph is the model's field 7: rewrite its length, copy all else.
        let mut out = Vec::with_capacity(self.bytes.len() + fields.len());
        let mut at = 0;
        for field in Fields::new(&self.bytes, 0..self.bytes.len()) {
            let field = field?;
            if field.number == MODEL_GRAPH {
                out.extend_from_slice(&self.bytes[at..field.whole.start]);
                length_delimited(MODEL_GRAPH, graph, &mut out);
                at = field.whole.end;
            }
        }
        out.extend_from_slice(&self.bytes[at..]);
        out.extend_from_slice(fields);
        Ok(out)
    }

    /// The model as a CPU session runs it fastest, and how many nodes changed; the arithmetic is
    /// the same. Each int8 MatMul of a quantized graph (DequantizeLinear of the activations and
    /// of a weight initializer into MatMul) and the bias Add after it become one
    /// `com.microsoft.MatMulIntegerToFloat` node: ONNX Runtime makes that node of the MatMul
    /// itself but leaves the Add beside it (and, before a GELU, fuses the Add into a BiasGelu
    /// slower than GELU alone); the node adds the bias as it writes its output. And a Shape that
    /// reads a DequantizeLinear's output reads its quantized input instead (the same shape):
    /// ONNX Runtime gives each reader its own copy of a DequantizeLinear, which would dequantize a
    /// whole activation for its shape alone. A CPU-only operator: only CPU sessions load this
    /// form. MatMuls of another shape (a per-row weight scale, a scale not in the file) stay.
    pub fn for_cpu(&self) -> Result<(Vec<u8>, usize), String> {
        let mut producer: HashMap<&str, usize> = HashMap::new();
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            n.outputs.iter().for_each(|o| _ = producer.insert(o, i));
            n.inputs.iter().for_each(|input| readers.entry(input).or_default().push(i));
        }
        // Node shapes are checked before indexing: the file may be anyone's.
        let dequantized_by = |name: &str| producer.get(name).copied().filter(|&i| self.nodes[i].op_type == "DequantizeLinear" && self.nodes[i].inputs.len() >= 2 && self.nodes[i].outputs.len() == 1);
        let scalar = |name: &str| self.initializer(name).is_ok_and(|t| t.elements() == Some(1));
        let graph_output = |name: &str| self.outputs.iter().any(|o| o == name);
        let mut replaced: HashMap<usize, Vec<u8>> = HashMap::new();
        let (mut dropped, mut dequantized) = (HashSet::new(), HashSet::new());
        for (m, matmul) in self.nodes.iter().enumerate().filter(|(_, n)| n.op_type == "MatMul" && n.inputs.len() == 2 && n.outputs.len() == 1) {
            let (Some(a), Some(w)) = (dequantized_by(&matmul.inputs[0]), dequantized_by(&matmul.inputs[1])) else { continue };
            let (dq_a, dq_w) = (&self.nodes[a], &self.nodes[w]);
            let Some(weight) = self.initializer(&dq_w.inputs[0]).ok().filter(|t| matches!(t.data_type, INT8 | UINT8)) else { continue };
            let Some(&columns) = weight.dims.get(1).filter(|_| weight.dims.len() == 2) else { continue };
            let per_column = self.initializer(&dq_w.inputs[1]).is_ok_and(|s| s.dims == [columns] && matches!(dq_w.axis, None | Some(1) | Some(-1)));
            if !scalar(&dq_a.inputs[1]) || !(scalar(&dq_w.inputs[1]) || per_column) {
                continue;
            }
            let mut output = matmul.outputs[0].as_str();
            let mut bias = "";
            // The product must have no reader but the Add, since the node then writes the sum.
            let add = readers
                .get(output)
                .filter(|r| r.len() == 1 && !graph_output(output))
                .map(|r| r[0])
                .filter(|&i| self.nodes[i].op_type == "Add" && self.nodes[i].inputs.len() == 2 && self.nodes[i].outputs.len() == 1);
            if let Some(add) = add {
                let other = self.nodes[add].inputs.iter().find(|i| *i != output).map(String::as_str).unwrap_or_default();
                if self.initializer(other).is_ok_and(|b| b.data_type == FLOAT && b.dims == [columns]) {
                    (bias, output) = (other, self.nodes[add].outputs[0].as_str());
                    dropped.insert(add);
                }
            }
            fn zero_point(dq: &Node) -> &str {
                dq.inputs.get(2).map_or("", String::as_str)
            }
            let mut inputs = vec![dq_a.inputs[0].as_str(), dq_w.inputs[0].as_str(), &dq_a.inputs[1], &dq_w.inputs[1], zero_point(dq_a), zero_point(dq_w), bias];
            while inputs.last() == Some(&"") {
                inputs.pop();
            }
            replaced.insert(m, encode_node(&matmul.name, "MatMulIntegerToFloat", MICROSOFT, &inputs, &[output]));
            dequantized.extend([a, w]);
        }
        for (i, shape) in self.nodes.iter().enumerate().filter(|(_, n)| n.op_type == "Shape" && n.inputs.len() == 1) {
            if let Some(dq) = dequantized_by(&shape.inputs[0]) {
                replaced.insert(i, self.with_input(i, &shape.inputs[0], &self.nodes[dq].inputs[0])?);
                dequantized.insert(dq);
            }
        }
        // A DequantizeLinear whose every reader was rewritten, and not a graph output, goes.
        for dq in dequantized {
            let output = self.nodes[dq].outputs[0].as_str();
            if readers.get(output).is_some_and(|r| r.iter().all(|n| replaced.contains_key(n))) && !graph_output(output) {
                dropped.insert(dq);
            }
        }
        if replaced.is_empty() {
            return Ok((self.bytes.clone(), 0));
        }
        let count = replaced.len();
        let edits = self.node_fields.iter().enumerate().filter_map(|(i, (whole, _))| match replaced.remove(&i) {
            Some(message) => Some((whole, Some((GRAPH_NODE, message)))),
            None => dropped.contains(&i).then_some((whole, None)),
        });
        let graph = self.graph_edited(edits);
        let mut opset = Vec::new();
        if !self.imports(MICROSOFT)? {
            let mut import = Vec::new();
            string_field(1, MICROSOFT, &mut import);
            key(2, 0, &mut import);
            varint(1, &mut import);
            length_delimited(MODEL_OPSET_IMPORT, &import, &mut opset);
        }
        Ok((self.with_graph(&graph, &opset)?, count))
    }

    /// Node `node`'s message with its input `from` read from `to`, every other field as it was.
    fn with_input(&self, node: usize, from: &str, to: &str) -> Result<Vec<u8>, String> {
        let message = self.node_fields[node].1.clone();
        let mut out = Vec::with_capacity(message.len() + to.len());
        for field in Fields::new(&self.bytes, message) {
            let field = field?;
            if field.number == 1 && &self.bytes[field.value.clone()] == from.as_bytes() {
                string_field(1, to, &mut out);
            } else {
                out.extend_from_slice(&self.bytes[field.whole]);
            }
        }
        Ok(out)
    }

    /// Whether the model imports an operator set of `domain`.
    fn imports(&self, domain: &str) -> Result<bool, String> {
        for field in Fields::new(&self.bytes, 0..self.bytes.len()) {
            let field = field?;
            if field.number == MODEL_OPSET_IMPORT {
                for inner in Fields::new(&self.bytes, field.value) {
                    let inner = inner?;
                    if inner.number == 1 && &self.bytes[inner.value] == domain.as_bytes() {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

struct Field {
    number: u32,
    wire: u8,
    /// The payload: a length-delimited field's bytes, or the varint/fixed value's bytes.
    value: Range<usize>,
    /// Key to end.
    whole: Range<usize>,
}

struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    end: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8], range: Range<usize>) -> Fields<'a> {
        Fields { bytes, at: range.start, end: range.end }
    }
}

fn read_varint(bytes: &[u8], at: &mut usize, end: usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let &b = bytes.get(*at).filter(|_| *at < end).ok_or("a number runs past its message")?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a number longer than 10 bytes".into())
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let start = self.at;
        let result = (|| {
            let k = read_varint(self.bytes, &mut self.at, self.end)?;
            let (number, wire) = ((k >> 3) as u32, (k & 7) as u8);
            let value = match wire {
                0 => {
                    let s = self.at;
                    read_varint(self.bytes, &mut self.at, self.end)?;
                    s..self.at
                }
                1 | 5 => {
                    let len = if wire == 1 { 8 } else { 4 };
                    (self.at + len <= self.end).then_some(self.at..self.at + len).ok_or("a fixed-width value runs past its message")?
                }
                2 => {
                    let len = read_varint(self.bytes, &mut self.at, self.end)? as usize;
                    let s = self.at;
                    (len <= self.end - s).then_some(s..s + len).ok_or("a field runs past its message")?
                }
                other => return Err(format!("wire type {other} is not one ONNX uses")),
            };
            self.at = value.end;
            Ok(Field { number, wire, value, whole: start..self.at })
        })();
        if result.is_err() {
            self.at = self.end;
        }
        Some(result)
    }
}

fn string(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
}

fn node(bytes: &[u8]) -> Result<Node, String> {
    let mut node = Node { name: String::new(), op_type: String::new(), inputs: Vec::new(), outputs: Vec::new(), axis: None };
    for field in Fields::new(bytes, 0..bytes.len()) {
        let field = field?;
        let value = &bytes[field.value.clone()];
        match field.number {
            1 => node.inputs.push(string(value)?),
            2 => node.outputs.push(string(value)?),
            3 => node.name = string(value)?,
            4 => node.op_type = string(value)?,
            5 => {
                if let Some(axis) = integer_attribute(value, "axis")? {
                    node.axis = Some(axis);
                }
            }
            _ => {}
        }
    }
    Ok(node)
}

/// An `AttributeProto`'s integer (field 3) if its name (field 1) is `name`.
fn integer_attribute(bytes: &[u8], name: &str) -> Result<Option<i64>, String> {
    let (mut named, mut value) = (false, None);
    for field in Fields::new(bytes, 0..bytes.len()) {
        let field = field?;
        match field.number {
            1 => named = &bytes[field.value] == name.as_bytes(),
            3 if field.wire == 0 => value = Some(read_varint(bytes, &mut field.value.start.clone(), field.value.end)? as i64),
            _ => {}
        }
    }
    Ok(value.filter(|_| named))
}

/// Repeated numbers, packed (wire 2) or one per field.
fn numbers(bytes: &[u8], field: &Field, out: &mut Vec<u64>) -> Result<(), String> {
    match field.wire {
        0 => out.push(read_varint(bytes, &mut field.value.start.clone(), field.value.end)?),
        2 => {
            let mut at = field.value.start;
            while at < field.value.end {
                out.push(read_varint(bytes, &mut at, field.value.end)?);
            }
        }
        _ => return Err("a repeated integer field with an unexpected encoding".into()),
    }
    Ok(())
}

fn tensor(bytes: &[u8]) -> Result<Tensor, String> {
    let mut t = Tensor { name: String::new(), dims: Vec::new(), data_type: 0, data: Vec::new() };
    let (mut dims, mut ints, mut floats, mut raw) = (Vec::new(), Vec::new(), Vec::new(), None);
    for field in Fields::new(bytes, 0..bytes.len()) {
        let field = field?;
        match field.number {
            1 => numbers(bytes, &field, &mut dims)?,
            2 => t.data_type = read_varint(bytes, &mut field.value.start.clone(), field.value.end)? as i32,
            // Packed, or one fixed32 per field: little-endian floats either way.
            4 => floats.extend_from_slice(&bytes[field.value]),
            5 | 7 => numbers(bytes, &field, &mut ints)?,
            8 => t.name = string(&bytes[field.value])?,
            9 => raw = Some(bytes[field.value].to_vec()),
            13 | 14 => return Err(format!("{}: tensors kept outside the file are not read", t.name)),
            _ => {}
        }
    }
    t.dims = dims.into_iter().map(|d| d as i64).collect();
    t.data = match (raw, t.data_type) {
        (Some(raw), _) => raw,
        (None, FLOAT) => floats,
        (None, INT8 | UINT8) => ints.iter().map(|&v| v as u8).collect(),
        (None, INT64) => ints.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        (None, other) => return Err(format!("{}: type {other} is not read", t.name)),
    };
    let width = match t.data_type {
        FLOAT => 4,
        INT8 | UINT8 => 1,
        INT64 => 8,
        _ => return Ok(t),
    };
    if t.elements().and_then(|n| n.checked_mul(width)) != Some(t.data.len()) {
        return Err(format!("{}: {} bytes for shape {:?}", t.name, t.data.len(), t.dims));
    }
    Ok(t)
}

fn key(number: u32, wire: u8, out: &mut Vec<u8>) {
    varint(u64::from(number) << 3 | u64::from(wire), out);
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `number` holding `bytes` (a string, bytes or a message: wire type 2).
fn length_delimited(number: u32, bytes: &[u8], out: &mut Vec<u8>) {
    key(number, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn string_field(number: u32, value: &str, out: &mut Vec<u8>) {
    length_delimited(number, value.as_bytes(), out);
}

fn encode_node(name: &str, op_type: &str, domain: &str, inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    inputs.iter().for_each(|i| string_field(1, i, &mut out));
    outputs.iter().for_each(|o| string_field(2, o, &mut out));
    string_field(3, name, &mut out);
    string_field(4, op_type, &mut out);
    string_field(7, domain, &mut out);
    out
}

fn encode_tensor(t: &Tensor, out: &mut Vec<u8>) {
    for &d in &t.dims {
        key(1, 0, out);
        varint(d as u64, out);
    }
    key(2, 0, out);
    varint(t.data_type as u64, out);
    string_field(8, &t.name, out);
    length_delimited(9, &t.data, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(fields: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        fields.iter().for_each(|(n, v)| length_delimited(*n, v, &mut out));
        out
    }

    /// A model whose graph has a node, a float tensor in `float_data` and an int8 one in
    /// `int32_data`, as exporters write small tensors.
    fn small_model() -> Vec<u8> {
        let node = message(&[(1, b"x".to_vec()), (1, b"w".to_vec()), (2, b"y".to_vec()), (3, b"mm".to_vec()), (4, b"MatMul".to_vec())]);
        let mut floats = Vec::new();
        key(1, 0, &mut floats);
        varint(2, &mut floats);
        key(2, 0, &mut floats);
        varint(FLOAT as u64, &mut floats);
        floats.extend(message(&[(4, [1.5f32, -2.0].iter().flat_map(|f| f.to_le_bytes()).collect()), (8, b"w".to_vec())]));
        let mut ints = Vec::new();
        key(1, 0, &mut ints);
        varint(3, &mut ints);
        key(2, 0, &mut ints);
        varint(INT8 as u64, &mut ints);
        let mut packed = Vec::new();
        for v in [1i64, -1, 127] {
            varint(v as u64, &mut packed);
        }
        ints.extend(message(&[(5, packed), (8, b"q".to_vec())]));
        let graph = message(&[(1, node), (2, b"g".to_vec()), (5, floats), (5, ints)]);
        let mut model = Vec::new();
        key(1, 0, &mut model);
        varint(8, &mut model);
        model.extend(message(&[(7, graph)]));
        model
    }

    #[test]
    fn reads_nodes_and_tensors_in_every_encoding() {
        let model = Model::parse(small_model()).unwrap();
        assert_eq!(model.nodes[0].op_type, "MatMul");
        assert_eq!(model.nodes[0].inputs, ["x", "w"]);
        assert_eq!(model.initializer("w").unwrap().floats().unwrap(), [1.5, -2.0]);
        assert_eq!(model.initializer("q").unwrap().int8s().unwrap(), [1, -1, 127]);
        assert_eq!(model.producer("y").unwrap().name, "mm");
    }

    #[test]
    fn a_replaced_initializer_reads_back_and_the_rest_is_unchanged() {
        let model = Model::parse(small_model()).unwrap();
        let bytes = model.with_initializers(&[Tensor::from_floats("w", &[2], &[0.25, 4.0])]).unwrap();
        let again = Model::parse(bytes.clone()).unwrap();
        assert_eq!(again.initializer("w").unwrap().floats().unwrap(), [0.25, 4.0]);
        assert_eq!(again.initializer("q").unwrap(), model.initializer("q").unwrap());
        assert_eq!(again.nodes.len(), 1);
        // Nothing replaced: the very same bytes.
        assert_eq!(model.with_initializers(&[]).unwrap(), small_model());
        assert!(model.with_initializers(&[Tensor::from_floats("w", &[3], &[0.0; 3])]).is_err(), "a shape change is refused");
        assert!(model.with_initializers(&[Tensor::from_floats("nope", &[1], &[0.0])]).is_err());
    }

    fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> Vec<u8> {
        let mut t = Vec::new();
        encode_tensor(&Tensor::from_floats(name, dims, values), &mut t);
        t
    }

    fn node_with(inputs: &[&str], output: &str, name: &str, op: &str, axis: Option<u64>) -> Vec<u8> {
        let mut fields: Vec<(u32, Vec<u8>)> = inputs.iter().map(|i| (1, i.as_bytes().to_vec())).collect();
        fields.extend([(2, output.as_bytes().to_vec()), (3, name.as_bytes().to_vec()), (4, op.as_bytes().to_vec())]);
        let mut node = message(&fields);
        if let Some(axis) = axis {
            let mut attribute = message(&[(1, b"axis".to_vec())]);
            key(3, 0, &mut attribute);
            varint(axis, &mut attribute);
            node.extend(message(&[(5, attribute)]));
        }
        node
    }

    /// x (quantized) × w (int8, per-column scales) + b, as a QDQ export writes it; `bias` names
    /// what the Add adds (an initializer, or a graph input); `outputs` the graph's outputs.
    fn quantized_linear(bias: &str, outputs: &[&str]) -> Vec<u8> {
        let nodes = [
            node_with(&["xq", "xs", "xz"], "x", "dq_x", "DequantizeLinear", None),
            node_with(&["wq", "ws"], "w", "dq_w", "DequantizeLinear", Some(1)),
            node_with(&["x", "w"], "y", "mm", "MatMul", None),
            node_with(&["y", bias], "z", "add", "Add", None),
            // An attribute (whatever its name) rides along when the node is rewired.
            node_with(&["x"], "s", "shape", "Shape", Some(1)),
        ];
        let mut weights = Vec::new();
        encode_tensor(&Tensor::from_int8s("wq", &[3, 2], &[1, 2, 3, 4, 5, 6]), &mut weights);
        let mut graph: Vec<(u32, Vec<u8>)> = nodes.into_iter().map(|n| (GRAPH_NODE, n)).collect();
        graph.extend([
            (GRAPH_INITIALIZER, weights),
            (GRAPH_INITIALIZER, float_tensor("ws", &[2], &[0.5, 0.25])),
            (GRAPH_INITIALIZER, float_tensor("xs", &[], &[0.1])),
            (GRAPH_INITIALIZER, float_tensor("b", &[2], &[1.0, -1.0])),
        ]);
        graph.extend(outputs.iter().map(|o| (GRAPH_OUTPUT, message(&[(1, o.as_bytes().to_vec())]))));
        let mut model = Vec::new();
        key(1, 0, &mut model);
        varint(8, &mut model);
        let mut onnx_opset = message(&[(1, Vec::new())]);
        key(2, 0, &mut onnx_opset);
        varint(17, &mut onnx_opset);
        model.extend(message(&[(MODEL_GRAPH, message(&graph)), (MODEL_OPSET_IMPORT, onnx_opset)]));
        model
    }

    #[test]
    fn an_int8_matmul_and_its_bias_become_one_node() {
        let model = Model::parse(quantized_linear("b", &["z"])).unwrap();
        let (bytes, folded) = model.for_cpu().unwrap();
        assert_eq!(folded, 2, "the MatMul and the Shape");
        let rewritten = Model::parse(bytes).unwrap();
        assert_eq!(rewritten.nodes.len(), 2, "{:?}", rewritten.nodes);
        let shape = &rewritten.nodes[1];
        assert_eq!((shape.op_type.as_str(), shape.inputs.as_slice(), shape.axis), ("Shape", &["xq".to_string()][..], Some(1)));
        let node = &rewritten.nodes[0];
        assert_eq!((node.name.as_str(), node.op_type.as_str()), ("mm", "MatMulIntegerToFloat"));
        assert_eq!(node.inputs, ["xq", "wq", "xs", "ws", "xz", "", "b"]);
        assert_eq!(node.outputs, ["z"]);
        assert!(rewritten.imports(MICROSOFT).unwrap() && !model.imports(MICROSOFT).unwrap());
        assert_eq!(rewritten.initializer("wq").unwrap(), model.initializer("wq").unwrap());
        assert_eq!(rewritten.for_cpu().unwrap().1, 0, "nothing left to fold");

        // A bias that is not a constant of the right width stays an Add after the fused MatMul.
        // So does one whose product is also a graph output; and a dequantized input that is one stays.
        for (bias, outputs, kept) in [
            ("other", vec!["z"], vec!["MatMulIntegerToFloat", "Add", "Shape"]),
            ("b", vec!["y", "z"], vec!["MatMulIntegerToFloat", "Add", "Shape"]),
            ("b", vec!["x", "z"], vec!["DequantizeLinear", "MatMulIntegerToFloat", "Shape"]),
        ] {
            let model = Model::parse(quantized_linear(bias, &outputs)).unwrap();
            let rewritten = Model::parse(model.for_cpu().unwrap().0).unwrap();
            let ops: Vec<&str> = rewritten.nodes.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, kept, "{bias} {outputs:?}");
            assert_eq!(rewritten.outputs, outputs);
        }
    }

    /// The shipped model: every int8 MatMul (6 layers × 6) becomes one node, with its bias in it
    /// but for the feed-forward outputs (whose Add brings the fp32 outlier columns' product), and
    /// no Shape reads a DequantizeLinear.
    #[test]
    fn the_bundled_models_cpu_form() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/model.onnx");
        let model = Model::parse(std::fs::read(path).unwrap()).unwrap();
        let (bytes, rewritten) = model.for_cpu().unwrap();
        assert_eq!(rewritten, 36 + 18, "36 MatMuls, 18 Shapes");
        let rewritten = Model::parse(bytes).unwrap();
        let dequantizes = |name: &String| rewritten.producer(name).is_ok_and(|p| p.op_type == "DequantizeLinear");
        assert!(!rewritten.nodes.iter().any(|n| n.op_type == "Shape" && dequantizes(&n.inputs[0])));
        let count = |m: &Model, op: &str| m.nodes.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count(&rewritten, "MatMulIntegerToFloat"), 36);
        let with_bias = rewritten.nodes.iter().filter(|n| n.op_type == "MatMulIntegerToFloat" && n.inputs.len() == 7 && n.inputs[6].ends_with(".bias")).count();
        assert_eq!(with_bias, 30);
        assert_eq!(count(&model, "Add") - count(&rewritten, "Add"), 30);
        assert_eq!(count(&model, "MatMul") - count(&rewritten, "MatMul"), 36);
        assert_eq!(rewritten.initializers.len(), model.initializers.len());
    }

    #[test]
    fn a_shape_past_the_address_space_is_an_error_not_a_panic() {
        let huge = float_tensor("w", &[i64::MAX, i64::MAX, 4], &[]);
        let graph = message(&[(2, b"g".to_vec()), (5, huge)]);
        let Err(error) = Model::parse(message(&[(7, graph)])) else { panic!("a shape past the address space was read") };
        assert!(error.contains("0 bytes for shape"), "{error}");
    }

    #[test]
    fn truncated_bytes_are_an_error_not_a_panic() {
        for bytes in [small_model(), quantized_linear("b", &["z"])] {
            for cut in 1..bytes.len() {
                if let Ok(model) = Model::parse(bytes[..cut].to_vec()) {
                    let _ = model.for_cpu();
                }
            }
        }
    }
}

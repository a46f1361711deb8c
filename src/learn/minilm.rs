//! The shipped encoder (6 BERT layers, 12 heads, mean pooling) rebuilt in candle from the champion's
//! int8 graph, so that it can be trained, and written back into that graph afterwards.
//!
//! Reading dequantizes each weight MatMul (per-column int8) and puts back the four feed-forward
//! channels that the export computes on an fp32 side path. Writing quantizes them again, per
//! column, splits the same channels off, and leaves everything else in the graph as it was: the
//! activation scales, the embeddings (frozen while training) and every node.

use candle_core::{D, DType, Device, Tensor, Var};

use crate::classify::onnx::{self, Model};

const PARTS: [&str; 6] = ["query", "key", "value", "attn_out", "inter", "out"];
const QUERY: usize = 0;
const KEY: usize = 1;
const VALUE: usize = 2;
const ATTN_OUT: usize = 3;
const INTER: usize = 4;
const OUT: usize = 5;
const HEADS: usize = 12;
/// What the graph adds to padded positions' attention scores.
const MASKED: f64 = -10000.0;
const EPSILON: f64 = 1e-12;

/// Where one int8 weight MatMul keeps its numbers in the graph.
struct Quantized {
    values: String,
    scale: String,
    rows: usize,
    columns: usize,
}

struct Layer {
    weight: [Var; 6],
    bias: [Var; 6],
    /// (attn_norm, out_norm), each (gain, bias).
    norms: [(Var, Var); 2],
    quantized: [Quantized; 6],
    /// The feed-forward channels computed in fp32 beside the int8 MatMuls, in the graph's order.
    outliers: Vec<usize>,
    /// 1 at those channels: the intermediate weights' columns `[1, inner]` and the output weights'
    /// rows `[inner, 1]` that stay fp32 in the graph.
    fp32_columns: Tensor,
    fp32_rows: Tensor,
}

/// The encoder's trainable layers and its frozen embeddings.
pub struct Minilm {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: (Tensor, Tensor),
    layers: Vec<Layer>,
    hidden: usize,
    device: Device,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn floats(model: &Model, name: &str) -> Result<Vec<f32>, String> {
    model.initializer(name)?.floats()
}

/// A per-row (axis 0) or per-column (axis 1) int8 matrix times its scales.
fn dequantize(model: &Model, values: &str, scale: &str, per_row: bool) -> Result<(Vec<f32>, usize, usize), String> {
    let t = model.initializer(values)?;
    let [rows, columns] = t.dims[..] else { return Err(format!("{values}: not a matrix")) };
    let (rows, columns) = (rows as usize, columns as usize);
    let q = t.int8s()?;
    let scale = floats(model, scale)?;
    if scale.len() != if per_row { rows } else { columns } {
        return Err(format!("{values}: {} scales for shape {rows}x{columns}", scale.len()));
    }
    let w = q.iter().enumerate().map(|(i, &v)| f32::from(v) * scale[if per_row { i / columns } else { i % columns }]).collect();
    Ok((w, rows, columns))
}

impl Minilm {
    pub fn from_graph(model: &Model, device: &Device) -> Result<Minilm, String> {
        let tensor = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, device).map_err(err);
        let (word, vocabulary, hidden) = dequantize(model, "model.word.weight_int8", "model.word.weight_scale", true)?;
        let (position, positions, _) = dequantize(model, "model.pos.weight_int8", "model.pos.weight_scale", true)?;
        let token_type = model.node("/Add_1")?.inputs.get(1).ok_or("/Add_1 has no second input")?.clone();
        let mut layers = Vec::new();
        while model.node(&format!("/layers.{}/query/MatMul", layers.len())).is_ok() {
            layers.push(Self::layer(model, layers.len(), device)?);
        }
        if layers.is_empty() {
            return Err("no `/layers.N/query/MatMul` nodes: not the graph that fine-tuning knows".into());
        }
        Ok(Minilm {
            word: tensor(word, &[vocabulary, hidden])?,
            position: tensor(position, &[positions, hidden])?,
            token_type: tensor(floats(model, &token_type)?, &[hidden])?,
            emb_norm: (tensor(floats(model, "model.emb_norm.weight")?, &[hidden])?, tensor(floats(model, "model.emb_norm.bias")?, &[hidden])?),
            layers,
            hidden,
            device: device.clone(),
        })
    }

    fn layer(model: &Model, l: usize, device: &Device) -> Result<Layer, String> {
        let var = |v: Vec<f32>, shape: &[usize]| Var::from_vec(v, shape, device).map_err(err);
        let mut quantized = Vec::new();
        let mut matrices = Vec::new();
        for part in PARTS {
            let matmul = model.node(&format!("/layers.{l}/{part}/MatMul"))?;
            let dq = model.producer(matmul.inputs.get(1).ok_or("a MatMul without a weight")?)?;
            let [values, scale, ..] = &dq.inputs[..] else { return Err(format!("{}: not a DequantizeLinear of a weight", dq.name)) };
            let (w, rows, columns) = dequantize(model, values, scale, false)?;
            matrices.push(w);
            quantized.push(Quantized { values: values.clone(), scale: scale.clone(), rows, columns });
        }
        let bias = |part: &str| floats(model, &format!("model.layers.{l}.{part}.bias"));
        let mut biases: Vec<Vec<f32>> = PARTS.iter().map(|p| bias(p)).collect::<Result<_, _>>()?;
        // The side path's channels: where the int8 input weights are all zero, ordered as the side
        // path's columns (each matched by its output row, which the int8 out weight still has).
        let (w_in, b_in, w_out) = Self::side(model, l)?;
        let hidden = quantized[INTER].rows;
        let inner = quantized[INTER].columns;
        let zero: Vec<usize> = (0..inner).filter(|&j| (0..hidden).all(|i| matrices[INTER][i * inner + j] == 0.0)).collect();
        let k = b_in.len();
        let mut outliers = Vec::with_capacity(k);
        for c in 0..k {
            let row = &w_out[c * hidden..(c + 1) * hidden];
            let distance = |j: usize| -> f32 { row.iter().zip(&matrices[OUT][j * hidden..(j + 1) * hidden]).map(|(a, b)| (a - b) * (a - b)).sum() };
            let best = zero.iter().copied().filter(|j| !outliers.contains(j)).min_by(|&a, &b| distance(a).total_cmp(&distance(b)));
            outliers.push(best.ok_or_else(|| format!("layer {l}: {k} side-path channels but only {} zeroed ones", zero.len()))?);
        }
        for (c, &j) in outliers.iter().enumerate() {
            for i in 0..hidden {
                matrices[INTER][i * inner + j] = w_in[i * k + c];
            }
            biases[INTER][j] = b_in[c];
            matrices[OUT][j * hidden..(j + 1) * hidden].copy_from_slice(&w_out[c * hidden..(c + 1) * hidden]);
        }
        let norm = |name: &str| -> Result<(Var, Var), String> {
            Ok((var(floats(model, &format!("model.layers.{l}.{name}.weight"))?, &[hidden])?, var(floats(model, &format!("model.layers.{l}.{name}.bias"))?, &[hidden])?))
        };
        let mut weight = Vec::new();
        for (w, q) in matrices.into_iter().zip(&quantized) {
            weight.push(var(w, &[q.rows, q.columns])?);
        }
        let bias: Vec<Var> = biases.into_iter().map(|b| { let n = b.len(); var(b, &[n]) }).collect::<Result<_, _>>()?;
        let mut mask = vec![0f32; inner];
        for &j in &outliers {
            mask[j] = 1.0;
        }
        Ok(Layer {
            fp32_columns: Tensor::from_vec(mask.clone(), (1, inner), device).map_err(err)?,
            fp32_rows: Tensor::from_vec(mask, (inner, 1), device).map_err(err)?,
            weight: weight.try_into().map_err(|_| "six weights")?,
            bias: bias.try_into().map_err(|_| "six biases")?,
            norms: [norm("attn_norm")?, norm("out_norm")?],
            quantized: quantized.try_into().map_err(|_| "six weights")?,
            outliers,
        })
    }

    fn side(model: &Model, l: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), String> {
        let name = |part: &str| format!("layers.{l}_outliers_{part}");
        Ok((floats(model, &name("w_in"))?, floats(model, &name("b_in"))?, floats(model, &name("w_out"))?))
    }

    /// Every trainable variable: the layers' weights, biases and norms (the embeddings stay).
    pub fn vars(&self) -> Vec<Var> {
        self.layers.iter().flat_map(|l| l.weight.iter().chain(&l.bias).chain(l.norms.iter().flat_map(|(g, b)| [g, b])).cloned()).collect()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Mean-pooled embeddings `[batch, hidden]` of `ids` `[batch, tokens]` (u32) under `mask`
    /// (f32, 1 for a token, 0 for padding), as the graph computes them in fp32.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, tokens) = ids.dims2()?;
        let h = self.hidden;
        let words = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((batch, tokens, h))?;
        let x = words.broadcast_add(&self.position.narrow(0, 0, tokens)?.unsqueeze(0)?)?.broadcast_add(&self.token_type)?;
        let mut x = layer_norm(&x.reshape((batch * tokens, h))?, &self.emb_norm.0, &self.emb_norm.1)?;
        // (1 − mask) × MASKED
        let scores_bias = mask.affine(-MASKED, MASKED)?.reshape((batch, 1, 1, tokens))?;
        let d = h / HEADS;
        for layer in &self.layers {
            let weights = layer.as_exported()?;
            let linear = |x: &Tensor, i: usize| x.matmul(&weights[i])?.broadcast_add(layer.bias[i].as_tensor());
            let split = |t: Tensor| t.reshape((batch, tokens, HEADS, d))?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (split(linear(&x, QUERY)?)?, split(linear(&x, KEY)?)?, split(linear(&x, VALUE)?)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(&scores_bias)?;
            let context = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch * tokens, h))?;
            let (g, b) = &layer.norms[0];
            x = layer_norm(&(x + linear(&context, ATTN_OUT)?)?, g.as_tensor(), b.as_tensor())?;
            let inner = linear(&x, INTER)?.gelu_erf()?;
            let (g, b) = &layer.norms[1];
            x = layer_norm(&(&x + linear(&inner, OUT)?)?, g.as_tensor(), b.as_tensor())?;
        }
        let mask3 = mask.unsqueeze(2)?;
        let summed = x.reshape((batch, tokens, h))?.broadcast_mul(&mask3)?.sum(1)?;
        summed.broadcast_div(&mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?)
    }

    /// The graph's initializers for the current weights: each MatMul quantized per column again
    /// (symmetric int8, scale = max |w| / 127), the side path's channels split off as in the export.
    pub fn to_initializers(&self) -> candle_core::Result<Vec<onnx::Tensor>> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut weights: Vec<Vec<f32>> = layer.weight.iter().map(|w| w.as_tensor().flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
            let mut biases: Vec<Vec<f32>> = layer.bias.iter().map(|b| b.as_tensor().to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
            let (hidden, inner) = (layer.quantized[INTER].rows, layer.quantized[INTER].columns);
            let k = layer.outliers.len();
            let (mut w_in, mut b_in, mut w_out) = (vec![0f32; hidden * k], vec![0f32; k], vec![0f32; k * hidden]);
            for (c, &j) in layer.outliers.iter().enumerate() {
                for i in 0..hidden {
                    w_in[i * k + c] = std::mem::take(&mut weights[INTER][i * inner + j]);
                }
                b_in[c] = std::mem::take(&mut biases[INTER][j]);
                w_out[c * hidden..(c + 1) * hidden].copy_from_slice(&weights[OUT][j * hidden..(j + 1) * hidden]);
            }
            let side = |part: &str| format!("layers.{l}_outliers_{part}");
            out.push(onnx::Tensor::from_floats(&side("w_in"), &[hidden as i64, k as i64], &w_in));
            out.push(onnx::Tensor::from_floats(&side("b_in"), &[k as i64], &b_in));
            out.push(onnx::Tensor::from_floats(&side("w_out"), &[k as i64, hidden as i64], &w_out));
            for ((part, w), (q, b)) in PARTS.iter().zip(&weights).zip(layer.quantized.iter().zip(&biases)) {
                let (values, scale) = quantize_columns(w, q.rows, q.columns);
                out.push(onnx::Tensor::from_int8s(&q.values, &[q.rows as i64, q.columns as i64], &values));
                out.push(onnx::Tensor::from_floats(&q.scale, &[q.columns as i64], &scale));
                out.push(onnx::Tensor::from_floats(&format!("model.layers.{l}.{part}.bias"), &[b.len() as i64], b));
            }
            for ((gain, bias), name) in layer.norms.iter().zip(["attn_norm", "out_norm"]) {
                out.push(onnx::Tensor::from_floats(&format!("model.layers.{l}.{name}.weight"), &[hidden as i64], &gain.as_tensor().to_vec1::<f32>()?));
                out.push(onnx::Tensor::from_floats(&format!("model.layers.{l}.{name}.bias"), &[hidden as i64], &bias.as_tensor().to_vec1::<f32>()?));
            }
        }
        Ok(out)
    }

    /// A copy of every trainable value, to go back to after an epoch that made things worse.
    pub fn snapshot(&self) -> candle_core::Result<Vec<Tensor>> {
        self.vars().iter().map(|v| v.as_tensor().copy()).collect()
    }

    pub fn restore(&self, snapshot: &[Tensor]) -> candle_core::Result<()> {
        for (v, t) in self.vars().iter().zip(snapshot) {
            v.set(t)?;
        }
        Ok(())
    }
}

impl Layer {
    /// The six weights as the int8 graph will hold them (quantization-aware training): each column
    /// rounded to its int8 grid (symmetric, max |w| / 127, as [`quantize_columns`] exports it), with
    /// the gradient passed straight through to the fp32 weights. Without it, the updates of a
    /// fine-tune are mostly smaller than half a grid step and the export rounds them away: at 8e-5
    /// the int8 candidate agreed with its own fp32 weights on 90 % of labels, every int8 value of
    /// most matrices unchanged. The side path's channels stay fp32, as in the graph.
    fn as_exported(&self) -> candle_core::Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(6);
        for (i, w) in self.weight.iter().enumerate() {
            let w = w.as_tensor();
            let rounded = fake_quantize(w)?;
            out.push(match i {
                INTER => (rounded.broadcast_mul(&self.fp32_columns.affine(-1.0, 1.0)?)? + w.broadcast_mul(&self.fp32_columns)?)?,
                OUT => (rounded.broadcast_mul(&self.fp32_rows.affine(-1.0, 1.0)?)? + w.broadcast_mul(&self.fp32_rows)?)?,
                _ => rounded,
            });
        }
        Ok(out)
    }
}

/// `w` on its per-column int8 grid in the forward pass, `w` itself to the gradient.
fn fake_quantize(w: &Tensor) -> candle_core::Result<Tensor> {
    let scale = (w.abs()?.max_keepdim(0)?.clamp(1e-12, f64::MAX)? / 127.0)?.detach();
    let rounded = w.broadcast_div(&scale)?.round()?.clamp(-127f64, 127f64)?.broadcast_mul(&scale)?;
    w + (rounded - w)?.detach()
}

/// Symmetric int8 per column of a row-major `rows × columns` matrix: (values, scales).
pub fn quantize_columns(w: &[f32], rows: usize, columns: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scale = vec![0f32; columns];
    for (i, v) in w.iter().enumerate() {
        scale[i % columns] = scale[i % columns].max(v.abs());
    }
    scale.iter_mut().for_each(|s| *s = if *s > 0.0 { *s / 127.0 } else { 1.0 });
    let values = (0..rows * columns).map(|i| (w[i] / scale[i % columns]).round().clamp(-127.0, 127.0) as i8).collect();
    (values, scale)
}

fn layer_norm(x: &Tensor, gain: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(variance + EPSILON)?.sqrt()?)?.broadcast_mul(gain)?.broadcast_add(bias)
}

/// Token ids and mask of a batch, padded to its longest item.
pub fn batch(items: &[&[u32]], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let tokens = items.iter().map(|i| i.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![0u32; items.len() * tokens];
    let mut mask = vec![0f32; items.len() * tokens];
    for (r, item) in items.iter().enumerate() {
        ids[r * tokens..r * tokens + item.len()].copy_from_slice(item);
        mask[r * tokens..r * tokens + item.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    Ok((Tensor::from_vec(ids, (items.len(), tokens), device)?, Tensor::from_vec(mask, (items.len(), tokens), device)?.to_dtype(DType::F32)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_column_int8_keeps_each_column_within_half_a_step() {
        let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * if i % 3 == 0 { 10.0 } else { 0.1 }).collect();
        let (q, scale) = quantize_columns(&w, 4, 3);
        for (i, v) in w.iter().enumerate() {
            assert!((f32::from(q[i]) * scale[i % 3] - v).abs() <= scale[i % 3] / 2.0 + 1e-6);
        }
        assert_eq!(quantize_columns(&[0.0; 4], 2, 2).1, [1.0, 1.0], "an all-zero column keeps a usable scale");
    }

    #[test]
    fn training_sees_the_exported_grid_and_its_gradient_passes_straight_through() {
        let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * if i % 3 == 0 { 10.0 } else { 0.013 }).collect();
        let var = Var::from_vec(w.clone(), (4, 3), &Device::Cpu).unwrap();
        let forward = fake_quantize(var.as_tensor()).unwrap();
        let (q, scale) = quantize_columns(&w, 4, 3);
        for (i, v) in forward.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().enumerate() {
            assert!((v - f32::from(q[i]) * scale[i % 3]).abs() < 1e-6, "{i}: {v} is not what the export holds");
        }
        let grads = (forward * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(grad.iter().all(|g| (g - 3.0).abs() < 1e-6), "{grad:?}");
    }
}

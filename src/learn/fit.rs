//! Multinomial logistic regression by mini-batch Adam on standardised features, started from a prior
//! head (the champion's) and held near it by an L2 penalty, so that it moves only as far as the data
//! asks; and a temperature fitted by golden-section search on held-out negative log-likelihood.

use crate::classify::heads::Head;
use crate::rng::Lcg;

/// One training row: an embedding, a class, a weight.
pub struct Row<'a> {
    pub x: &'a [f32],
    pub class: usize,
    pub weight: f32,
}

pub struct Settings {
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub l2: f32,
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { epochs: 15, batch: 128, learning_rate: 0.002, l2: 5.0, seed: 13 }
    }
}

fn softmax(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for l in logits.iter_mut() {
        *l = (*l - max).exp();
        sum += *l;
    }
    logits.iter_mut().for_each(|l| *l /= sum);
}

/// Fits `classes` linear outputs on `rows` (all of `dims` features), from `prior` (or zero) and
/// penalised by `l2` for moving away from it, and returns them as a [`Head`] over the raw features
/// (the standardisation folded in), temperature 1.
pub fn fit(rows: &[Row<'_>], dims: usize, classes: usize, settings: &Settings, prior: Option<&Head>) -> Head {
    let n = rows.len().max(1) as f32;
    let mut mean = vec![0f32; dims];
    for r in rows {
        mean.iter_mut().zip(r.x).for_each(|(m, x)| *m += x / n);
    }
    let mut scale = vec![0f32; dims];
    for r in rows {
        scale.iter_mut().zip(r.x.iter().zip(&mean)).for_each(|(s, (x, m))| *s += (x - m) * (x - m) / n);
    }
    scale.iter_mut().for_each(|s| *s = s.sqrt().max(1e-6));
    let standard: Vec<Vec<f32>> = rows.iter().map(|r| r.x.iter().zip(&mean).zip(&scale).map(|((x, m), s)| (x - m) / s).collect()).collect();

    let width = dims + 1; // the bias is the last column
    // The prior's calibrated logits (divided by its temperature, so that the start is already near
    // the likelihood's optimum) in standardised space: w·x + b = (w σ)·(x − μ)/σ + (b + w·μ).
    let mut anchor = vec![0f32; classes * width];
    if let Some(prior) = prior.filter(|p| p.weight.len() == classes && p.weight.iter().all(|r| r.len() == dims)) {
        let t = prior.temperature;
        for c in 0..classes {
            let row = &mut anchor[c * width..(c + 1) * width];
            for j in 0..dims {
                row[j] = prior.weight[c][j] * scale[j] / t;
            }
            row[dims] = (prior.bias[c] + prior.weight[c].iter().zip(&mean).map(|(w, m)| w * m).sum::<f32>()) / t;
        }
    }
    let mut w = anchor.clone();
    let (mut m1, mut m2) = (vec![0f32; w.len()], vec![0f32; w.len()]);
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = Lcg(settings.seed);
    let mut step = 0i32;
    let mut grad = vec![0f32; w.len()];
    let mut p = vec![0f32; classes];
    for _ in 0..settings.epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(settings.batch.max(1)) {
            grad.iter_mut().for_each(|g| *g = 0.0);
            let total: f32 = chunk.iter().map(|&i| rows[i].weight).sum::<f32>().max(1e-6);
            for &i in chunk {
                let x = &standard[i];
                for (c, pc) in p.iter_mut().enumerate() {
                    let row = &w[c * width..(c + 1) * width];
                    *pc = row[..dims].iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + row[dims];
                }
                softmax(&mut p);
                let weight = rows[i].weight / total;
                for (c, pc) in p.iter().enumerate() {
                    let error = (pc - if c == rows[i].class { 1.0 } else { 0.0 }) * weight;
                    let g = &mut grad[c * width..(c + 1) * width];
                    g[..dims].iter_mut().zip(x).for_each(|(g, x)| *g += error * x);
                    g[dims] += error;
                }
            }
            step += 1;
            let (c1, c2) = (1.0 - beta1.powi(step), 1.0 - beta2.powi(step));
            for j in 0..w.len() {
                // Biases too: one-sided feedback must not shift a whole class.
                let g = grad[j] + settings.l2 * (w[j] - anchor[j]);
                m1[j] = beta1 * m1[j] + (1.0 - beta1) * g;
                m2[j] = beta2 * m2[j] + (1.0 - beta2) * g * g;
                w[j] -= settings.learning_rate * (m1[j] / c1) / ((m2[j] / c2).sqrt() + eps);
            }
        }
    }
    // Back to raw features: w·(x − μ)/σ + b = (w/σ)·x + (b − Σ w μ/σ).
    let mut weight = Vec::with_capacity(classes);
    let mut bias = Vec::with_capacity(classes);
    for c in 0..classes {
        let row = &w[c * width..(c + 1) * width];
        let raw: Vec<f32> = row[..dims].iter().zip(&scale).map(|(w, s)| w / s).collect();
        bias.push(row[dims] - raw.iter().zip(&mean).map(|(w, m)| w * m).sum::<f32>());
        weight.push(raw);
    }
    Head { weight, bias, temperature: 1.0 }
}

/// Mean negative log-likelihood of `rows` under `head` at `temperature`.
fn nll(head: &Head, rows: &[Row<'_>], temperature: f32) -> f64 {
    let scaled = Head { temperature, ..head.clone() };
    let mut p = Vec::new();
    let mut total = 0.0;
    for r in rows {
        p.clear();
        scaled.probabilities(r.x, &mut p);
        total -= f64::from(p[r.class].max(1e-12)).ln();
    }
    total / rows.len().max(1) as f64
}

/// The temperature in [0.25, 8] that minimises held-out NLL (golden-section search; NLL in T is
/// unimodal for a fixed head).
pub fn temperature(head: &Head, held_out: &[Row<'_>]) -> f32 {
    if held_out.is_empty() {
        return 1.0;
    }
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (0.25f64.ln(), 8f64.ln());
    let f = |t: f64| nll(head, held_out, t.exp() as f32);
    let (mut c, mut d) = (b - phi * (b - a), a + phi * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..40 {
        if fc < fd {
            (b, d, fd) = (d, c, fc);
            c = b - phi * (b - a);
            fc = f(c);
        } else {
            (a, c, fc) = (c, d, fd);
            d = a + phi * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_classes_are_learned_and_the_temperature_is_finite() {
        let mut rng = Lcg(3);
        let points: Vec<(Vec<f32>, usize)> = (0..600)
            .map(|i| {
                let class = i % 3;
                let mut x: Vec<f32> = (0..8).map(|_| rng.next_f64() as f32 - 0.5).collect();
                x[class] += 2.0;
                (x, class)
            })
            .collect();
        let rows: Vec<Row<'_>> = points.iter().map(|(x, c)| Row { x, class: *c, weight: 1.0 }).collect();
        let head = fit(&rows[..500], 8, 3, &Settings::default(), None);
        let t = temperature(&head, &rows[500..]);
        assert!(t.is_finite() && (0.25..=8.0).contains(&t), "{t}");
        let head = Head { temperature: t, ..head };
        let mut p = Vec::new();
        let right = rows[500..]
            .iter()
            .filter(|r| {
                p.clear();
                head.probabilities(r.x, &mut p);
                p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 == r.class
            })
            .count();
        assert!(right >= 95, "{right} of 100 held-out points");
    }

    #[test]
    fn a_prior_with_no_data_to_move_it_stays_where_it_is() {
        let x = vec![vec![1.0f32, -1.0], vec![-1.0, 1.0], vec![0.5, 0.5]];
        let rows: Vec<Row<'_>> = x.iter().map(|x| Row { x, class: 0, weight: 0.0 }).collect();
        let prior = Head { weight: vec![vec![0.3, -0.2], vec![-0.1, 0.4]], bias: vec![0.05, -0.05], temperature: 1.0 };
        let head = fit(&rows, 2, 2, &Settings { l2: 1.0, ..Settings::default() }, Some(&prior));
        for (a, b) in head.weight.iter().flatten().chain(&head.bias).zip(prior.weight.iter().flatten().chain(&prior.bias)) {
            assert!((a - b).abs() < 1e-4, "{:?} vs {:?}", head, prior);
        }
    }
}

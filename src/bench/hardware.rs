//! The machine's int8 arithmetic, for `bench classify`'s GOP/s column: the vector and matrix
//! instruction sets the CPU reports (Linux `/proc/cpuinfo`), the int8 operations per cycle per core
//! each allows at most, and the operations the model does per item.
//!
//! Peaks count a multiply-add as 2 operations, per core per cycle, as Intel states them: AMX-INT8
//! 2,048 (one `TDPBUSD` tile product per 16 cycles), AVX-512 VNNI 256 (`VPDPBUSD`, 64 multiply-adds,
//! on two ports), AVX-VNNI 128 (the same on 256-bit registers), AVX-512BW 128 and AVX2 64
//! (`VPMADDUBSW` + `VPMADDWD`: two instructions where VNNI has one). Parts with one 512-bit port
//! reach half the AVX-512 figures. The clock is the one `/proc/cpuinfo` reports (turbo not counted).

use crate::classify::onnx::Model;

/// (cpuinfo flag, name, int8 operations per cycle per core), strongest first.
const INT8_PEAKS: [(&str, &str, f64); 5] = [
    ("amx_int8", "AMX-INT8", 2048.0),
    ("avx512_vnni", "AVX-512 VNNI", 256.0),
    ("avx_vnni", "AVX-VNNI", 128.0),
    ("avx512bw", "AVX-512BW", 128.0),
    ("avx2", "AVX2", 64.0),
];

pub struct Machine {
    pub cpu: String,
    pub mhz: Option<f64>,
    /// The instruction sets of [`INT8_PEAKS`] the CPU has, strongest first, with their peak.
    pub int8: Vec<(&'static str, f64)>,
}

impl Machine {
    pub fn read() -> Machine {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine::parse(&info)
    }

    fn parse(info: &str) -> Machine {
        let field = |name: &str| info.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()));
        let flags: Vec<String> = field("flags").unwrap_or_default().split_whitespace().map(str::to_string).collect();
        let int8 = INT8_PEAKS.iter().filter(|(flag, _, _)| flags.iter().any(|f| f == flag)).map(|(_, name, ops)| (*name, *ops)).collect();
        Machine { cpu: field("model name").unwrap_or_else(|| "unknown CPU".into()), mhz: field("cpu MHz").and_then(|m| m.parse().ok()), int8 }
    }

    /// Peak int8 GOP/s of one core with `isa` (one of [`Machine::int8`]).
    pub fn peak_gops(&self, ops_per_cycle: f64) -> Option<f64> {
        self.mhz.map(|mhz| ops_per_cycle * mhz / 1000.0)
    }

    pub fn describe(&self) -> String {
        let isa: Vec<String> = self.int8.iter().map(|(name, ops)| format!("{name} ({ops:.0} int8 ops/cycle/core)")).collect();
        format!(
            "{}, {}; int8: {}",
            self.cpu,
            self.mhz.map_or("clock unknown".to_string(), |m| format!("{m:.0} MHz")),
            if isa.is_empty() { "no vector int8 instructions known here".to_string() } else { isa.join(", ") }
        )
    }
}

/// What the encoder computes, from its graph: operations per token of its weight matrices (2 ×
/// the elements of every MatMul's constant operand, the int8 ones through their DequantizeLinear),
/// and per layer the hidden size that attention's two T × T products run over.
pub struct Work {
    pub ops_per_token: f64,
    pub layers: usize,
    pub hidden: usize,
}

impl Work {
    pub fn of(model: &Model) -> Work {
        let constant = |name: &str| -> Option<&crate::classify::onnx::Tensor> {
            model.initializer(name).ok().or_else(|| {
                let producer = model.producer(name).ok()?;
                (producer.op_type == "DequantizeLinear").then(|| model.initializer(producer.inputs.first()?).ok()).flatten()
            })
        };
        let mut elements = 0.0;
        let (mut layers, mut hidden) = (0, 0);
        for node in model.nodes.iter().filter(|n| n.op_type == "MatMul") {
            if let Some(weight) = node.inputs.get(1).and_then(|b| constant(b)).filter(|w| w.dims.len() == 2) {
                elements += weight.dims.iter().product::<i64>() as f64;
                if node.name.ends_with("/query/MatMul") {
                    layers += 1;
                    hidden = weight.dims[0] as usize;
                }
            }
        }
        Work { ops_per_token: 2.0 * elements, layers, hidden }
    }

    /// Operations for one batch of `rows` items padded to `cols` tokens.
    pub fn ops(&self, rows: usize, cols: usize) -> f64 {
        let tokens = (rows * cols) as f64;
        // Q·Kᵀ and attention·V: 2 × T × T × hidden multiply-adds per item and layer.
        tokens * self.ops_per_token + (rows * self.layers) as f64 * 4.0 * (cols * cols * self.hidden) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instruction_sets_and_their_peaks_come_from_cpuinfo() {
        let machine = Machine::parse("model name\t: Some Xeon\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu avx2 avx512bw avx512_vnni amx_tile amx_int8\n");
        assert_eq!(machine.int8.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["AMX-INT8", "AVX-512 VNNI", "AVX-512BW", "AVX2"]);
        assert_eq!(machine.peak_gops(256.0), Some(665.6));
        assert!(Machine::parse("").int8.is_empty());
    }

    #[test]
    fn the_bundled_encoder_does_about_half_a_gop_per_headline() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/model.onnx")).unwrap();
        let work = Work::of(&Model::parse(bytes).unwrap());
        assert_eq!((work.layers, work.hidden), (6, 384));
        // MiniLM-L6: per layer 4 · 384² + 2 · 384 · 1536 weights, and the heads' few more.
        let layers = 2.0 * 6.0 * (4.0 * 384.0 * 384.0 + 2.0 * 384.0 * 1536.0);
        assert!((layers..layers * 1.01).contains(&work.ops_per_token), "{}", work.ops_per_token);
        let per_item = work.ops(1, 22) / 1e9;
        assert!((0.45..0.49).contains(&per_item), "{per_item}");
    }
}

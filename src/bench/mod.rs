//! Everything `bearwatch bench …` runs (`scripts/bench.sh` writes docs/BENCHMARKS.md from it):
//! one file per subcommand, kept out of the component folders they measure.

pub mod alerts;
pub mod checkpoints;
pub mod classify;
pub mod detect;
pub mod e2e;
pub mod feedback_loop;
mod hardware;
pub mod instances;
pub mod sql;
pub mod windows;

use crate::news::News;
use crate::pipeline::PipelineError;

fn failed(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Internal(e.to_string())
}

/// Resident and peak memory of this process, in MiB.
fn memory_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok()).unwrap_or(0) / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The stories of a JSON-lines file (the bundled Reuters stories by default).
fn reuters(input: &std::path::Path) -> Result<Vec<News>, PipelineError> {
    let text = std::fs::read_to_string(crate::pipeline::bundled(input)).map_err(failed)?;
    let base: Vec<News> = text.lines().filter_map(|l| News::from_json(l.as_bytes()).ok()).collect();
    if base.is_empty() {
        return Err(failed("no stories in the input"));
    }
    Ok(base)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

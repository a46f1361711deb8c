//! `bearwatch bench checkpoints`: what a checkpoint writes once the state is big. The pipeline
//! (file source, the model, the demo's windows) first reads `--stories` distinct headlines at
//! 5,000 an hour of event time as fast as it goes, then `--then` more at the same event-time rate
//! replayed so that each `checkpoint_interval` holds `--per-checkpoint` stories (a busy feed in
//! real time). During the second part a watcher lists the storage folder and counts the bytes of
//! every checkpoint file and pack that appears: what reached the disk, against the state's size,
//! which a checkpoint written whole would write each time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::{failed, median, memory_mib, reuters};
use crate::news::News;
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::storage::{Location, Storage};

#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointBenchArgs {
    /// Stories read first, as fast as the model goes, to grow the state.
    #[arg(long, default_value_t = 30_000)]
    pub stories: usize,
    /// Stories read next, `--per-checkpoint` per checkpoint; their checkpoints are measured.
    #[arg(long, default_value_t = 420)]
    pub then: usize,
    /// Stories per checkpoint in the measured part (14: 5,000 stories an hour, a checkpoint every 10 s).
    #[arg(long, default_value_t = 14)]
    pub per_checkpoint: usize,
    /// Headlines to combine into distinct ones (the bundled Reuters stories by default).
    #[arg(long, default_value = "pipelines/data/reuters-1987.jsonl")]
    pub input: PathBuf,
}

/// Seconds of event time between two stories: 5,000 an hour.
const SPACING_MS: i64 = 720;

/// `n` distinct stories from the first `n`-th on: the first half of one bundled headline and the
/// second half of another, so that no two are copies (same words, or only words added, dropped or
/// renumbered) that the windows would fold into one.
fn stories(base: &[News], first: usize, n: usize) -> Vec<News> {
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-05T00:00:00Z").map(|t| t.timestamp_millis()).unwrap_or(0);
    (first..first + n)
        .map(|i| {
            let (a, b) = (&base[i % base.len()], &base[(i * 7 + i / base.len() + 1) % base.len()]);
            let (wa, wb): (Vec<&str>, Vec<&str>) = (a.headline.split_whitespace().collect(), b.headline.split_whitespace().collect());
            let headline = [&wa[..wa.len().div_ceil(2)], &wb[wb.len() / 2..]].concat().join(" ");
            let at = chrono::DateTime::from_timestamp_millis(start + i as i64 * SPACING_MS).unwrap_or_default();
            News { id: format!("bench-{i}"), published_at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), headline, ..a.clone() }
        })
        .collect()
}

fn write_stories(path: &Path, stories: &[News]) -> Result<(), PipelineError> {
    let mut text = String::new();
    for story in stories {
        text += &serde_json::to_string(story).map_err(failed)?;
        text.push('\n');
    }
    std::fs::write(path, text).map_err(failed)
}

/// Runs the pipeline over `file` into `storage` to the file's end.
fn replay(file: &Path, storage: &Path, speed: f64, interval: &str) -> Result<(), PipelineError> {
    let text = format!(
        "[source]\ntype = \"file\"\npath = \"{}\"\nspeed = {speed}\n\
         [window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\ngroup_by = [\"topic\"]\n\
         [storage]\npath = \"{}\"\ncheckpoint_interval = \"{interval}\"\n[run]\nsummary_interval = \"0s\"\n",
        file.display(),
        storage.display()
    );
    let config = PipelineConfig::parse(&text, "bench checkpoints")?;
    crate::pipeline::run(&config, Arc::new(AtomicBool::new(false)), Default::default()).map(drop)
}

/// What the watcher saw reach the storage folder: each checkpoint file version's size, and each
/// pack's.
#[derive(Default)]
struct Written {
    files: Vec<u64>,
    packs: BTreeMap<String, u64>,
}

/// Lists the checkpoint file and its packs every 10 ms until `stop` (a pack is deleted a checkpoint
/// after the next at the earliest, and a checkpoint file is replaced once an interval: none is
/// missed).
fn watch(storage: PathBuf, stop: Arc<AtomicBool>) -> Written {
    let file = storage.join("checkpoint.json");
    let packs = storage.join("checkpoint.packs");
    let version = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
    let mut last = version(&file);
    let mut known: std::collections::HashSet<String> = std::fs::read_dir(&packs).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let mut written = Written::default();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(now) = version(&file)
            && Some(now) != last
        {
            written.files.push(now.1);
            last = Some(now);
        }
        for entry in std::fs::read_dir(&packs).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Written under a temp name and renamed: a pack's name appears with its whole size.
            if !name.ends_with(".tmp") && known.insert(name.clone()) {
                written.packs.insert(name, entry.metadata().map_or(0, |m| m.len()));
            }
        }
    }
    written
}

pub fn run(args: &CheckpointBenchArgs) -> Result<String, PipelineError> {
    let base = reuters(&args.input)?;
    let dir = std::env::temp_dir().join(format!("bearwatch-bench-checkpoints-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let result = measure(args, &base, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(args: &CheckpointBenchArgs, base: &[News], dir: &Path) -> Result<String, PipelineError> {
    let (grow, measured, storage) = (dir.join("grow.jsonl"), dir.join("measured.jsonl"), dir.join("storage"));
    write_stories(&grow, &stories(base, 0, args.stories))?;
    write_stories(&measured, &stories(base, args.stories, args.then))?;
    let started = Instant::now();
    replay(&grow, &storage, 0.0, "2s")?;
    let grown = started.elapsed();

    // 1 s checkpoints, and event time replayed so that each holds `per_checkpoint` stories.
    let speed = (args.per_checkpoint as i64 * SPACING_MS) as f64 / 1000.0;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (storage, stop) = (storage.clone(), stop.clone());
        std::thread::spawn(move || watch(storage, stop))
    };
    let replayed = replay(&measured, &storage, speed, "1s");
    stop.store(true, Ordering::SeqCst);
    let written = watcher.join().map_err(|_| failed("the watcher panicked"))?;
    replayed?;

    let state = crate::storage::checkpoint(&Location::from(storage.as_path()), None).map_err(failed)?.map_or(0, |json| json.len() as u64);
    let mut opens = Vec::new();
    for _ in 0..3 {
        let opened = Instant::now();
        let (storage, _) = Storage::open::<serde::de::IgnoredAny>(&Location::from(storage.as_path()), None, false).map_err(failed)?;
        opens.push(opened.elapsed().as_secs_f64() * 1000.0);
        drop(storage);
    }
    let on_disk: u64 = std::fs::read_dir(storage.join("checkpoint.packs")).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    if written.files.is_empty() {
        return Err(failed(format!("no checkpoint was written while {} stories were read: give --then more", args.then)));
    }
    let checkpoints = written.files.len() as u64;
    let total = written.files.iter().sum::<u64>() + written.packs.values().sum::<u64>();
    let mut file_sizes: Vec<f64> = written.files.iter().map(|&f| f as f64).collect();
    let largest_pack = written.packs.values().copied().max().unwrap_or(0);
    let mb = |bytes: u64| bytes as f64 / 1e6;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} distinct stories read in {:.0} s to grow the state, then {} at {} per 1-s checkpoint; one run\n",
        args.stories,
        grown.as_secs_f64(),
        args.then,
        args.per_checkpoint
    );
    let _ = writeln!(out, "| state (JSON), MB | checkpoints measured | written per checkpoint, MB | of the state | checkpoint file (median), KB | largest pack, MB | packs on disk, MB | open and read the checkpoint (median of 3), ms | peak RSS MiB |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| {:.1} | {checkpoints} | {:.2} | {:.1} % | {:.0} | {:.2} | {:.1} | {:.0} | {} |",
        mb(state),
        mb(total) / checkpoints as f64,
        100.0 * total as f64 / (checkpoints * state.max(1)) as f64,
        median(&mut file_sizes) / 1e3,
        mb(largest_pack),
        mb(on_disk),
        median(&mut opens),
        memory_mib().1
    );
    let _ = writeln!(out, "\nWritten: every version of `checkpoint.json` and every pack that appeared in the measured part, over the checkpoints that wrote one; a state under 1 MiB, or one before packs, writes the whole state each time (100 %).");
    Ok(out)
}

//! `bearwatch bench e2e`: the whole pipeline from Kafka (source → classify → windows → Parquet with
//! checkpoints and commits) on a backlog, beside the classifier alone on the same stories, in the same
//! process and round. The ratio says what everything around the model costs; the goal is ≥ 90 %.
//! With `--object-store s3://…`, each round also runs the pipeline writing there, beside the local
//! folder: the goal is that object storage costs at most 10 % of the local throughput.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::{failed, median, memory_mib, reuters};
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::classify::{ClassifierConfig, Classifier};
use crate::news::News;
use crate::source::kafka::Output;

#[derive(Debug, Clone, clap::Args)]
pub struct E2eBenchArgs {
    #[arg(long, env = "BEARWATCH_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Stories in the backlog of each round (the bundled Reuters stories, repeated with new ids).
    #[arg(long, default_value_t = 24_000)]
    pub stories: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "pipelines/data/reuters-1987.jsonl")]
    pub input: PathBuf,
    /// Also run each round with `[storage] path` here (`s3://bucket/prefix`; the client from the
    /// `AWS_*` environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    pub object_store: Option<String>,
}

fn stories(args: &E2eBenchArgs) -> Result<Vec<News>, PipelineError> {
    let base = reuters(&args.input)?;
    Ok((0..args.stories)
        .map(|i| {
            let mut story = base[i % base.len()].clone();
            story.id = format!("{}-{}", story.id, i / base.len());
            story
        })
        .collect())
}

/// The classifier alone on the stories' texts, as fast as it goes: items/s.
fn classify_alone(stories: &[News], config: &ClassifierConfig) -> Result<f64, PipelineError> {
    let classifier = Classifier::start(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(failed)?;
    let started = Instant::now();
    runtime.block_on(async {
        let mut pending = Vec::with_capacity(stories.len());
        for story in stories {
            pending.push(classifier.submit(&story.classification_text(config.body_chars)).await?);
        }
        for p in pending {
            p.scores().await?;
        }
        Ok::<_, crate::classify::ClassifyError>(())
    })?;
    Ok(stories.len() as f64 / started.elapsed().as_secs_f64())
}

/// One pipeline run over a fresh topic holding the stories: stories/s between the first and the last
/// checkpoint that counted them, and the largest resident memory seen after the first quarter.
fn pipeline_once(args: &E2eBenchArgs, stories: &[News], round: usize, object_store: Option<&str>) -> Result<(f64, u64), PipelineError> {
    let topic = format!("bench-e2e-{}-{round}-{}", std::process::id(), chrono::Utc::now().timestamp_millis());
    let output = Output::connect(&args.brokers, &Default::default())?;
    for story in stories {
        let json = serde_json::to_vec(story).map_err(failed)?;
        output.send(&topic, story.id.as_bytes(), &json, None)?;
    }
    output.flush(Duration::from_secs(60))?;
    let local = std::env::temp_dir().join(&topic);
    // Each round writes under a prefix of its own.
    let path = object_store.map_or_else(|| local.display().to_string(), |url| format!("{}/{topic}", url.trim_end_matches('/')));
    let text = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{topic}\"\nmax_clock_skew = \"1h\"\n\
         [window]\nsize = \"1d\"\nallowed_lateness = \"30d\"\n[storage]\npath = \"{path}\"\nlocal_path = \"{}\"\ncheckpoint_interval = \"5s\"\n\
         [run]\nsummary_interval = \"0s\"\n",
        args.brokers,
        local.display()
    );
    let config = PipelineConfig::parse(&text, "bench e2e")?;
    let location = config.storage.location()?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, location, total) = (stop.clone(), location.clone(), stories.len() as u64);
        std::thread::spawn(move || {
            let (mut first, mut last, mut peak) = (None::<(Instant, u64)>, None::<(Instant, u64)>, 0u64);
            let started = Instant::now();
            loop {
                // Not more often: on object storage each look is a GET that the store's server
                // (on these same cores, in the tests' setup) must answer.
                std::thread::sleep(Duration::from_millis(200));
                let scored = crate::storage::checkpoint(&location, None)
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|c| c["counters"]["scored"].as_u64())
                    .unwrap_or(0);
                if scored > 0 && last.is_none_or(|(_, n)| scored > n) {
                    first.get_or_insert((Instant::now(), scored));
                    last = Some((Instant::now(), scored));
                }
                if scored * 4 >= total {
                    peak = peak.max(memory_mib().0);
                }
                if scored >= total || started.elapsed() > Duration::from_secs(3600) {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
            }
            match (first, last) {
                (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => ((n1 - n0) as f64 / (t1 - t0).as_secs_f64(), peak),
                // All within one checkpoint: from the start, model loading included.
                (_, Some((t1, n1))) => (n1 as f64 / (t1 - started).as_secs_f64(), peak),
                _ => (f64::NAN, peak),
            }
        })
    };
    let result = crate::pipeline::run(&config, stop, Default::default());
    let measured = watcher.join().map_err(|_| failed("watcher panicked"));
    let _ = std::fs::remove_dir_all(&local);
    result?;
    measured
}

pub fn run(args: &E2eBenchArgs) -> Result<String, PipelineError> {
    let stories = stories(args)?;
    let model = ClassifierConfig::default();
    let (mut alone, mut e2e, mut ratios, mut steady) = (Vec::new(), Vec::new(), Vec::new(), 0u64);
    let (mut remote, mut remote_ratios) = (Vec::new(), Vec::new());
    for round in 0..=args.repeats {
        let a = classify_alone(&stories, &model)?;
        let (p, rss) = pipeline_once(args, &stories, round, None)?;
        // Back to back with the local run, so that the machine's drift hits both alike.
        let object_store = args.object_store.as_deref().map(|url| pipeline_once(args, &stories, round, Some(url))).transpose()?;
        if round > 0 {
            alone.push(a);
            e2e.push(p);
            ratios.push(p / a);
            steady = steady.max(rss);
            if let Some((o, rss)) = object_store {
                remote.push(o);
                remote_ratios.push(o / p);
                steady = steady.max(rss);
            }
        }
    }
    let (alone, e2e, ratio) = (median(&mut alone), median(&mut e2e), median(&mut ratios));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} stories from Kafka ({}) per round; default [model] settings; median of {} rounds after 1 warm-up\n",
        args.stories, args.brokers, args.repeats
    );
    let _ = writeln!(out, "| classify alone, stories/s | pipeline from Kafka, stories/s | pipeline / classify | goal ≥ 90 % | steady-state RSS MiB | peak RSS MiB |");
    let _ = writeln!(out, "|---:|---:|---:|---|---:|---:|");
    let _ = writeln!(
        out,
        "| {alone:.0} | {e2e:.0} | {:.1} % | {} | {steady} | {} |",
        ratio * 100.0,
        if ratio >= 0.9 { "met" } else { "not met" },
        memory_mib().1
    );
    if let Some(url) = &args.object_store {
        let (remote, ratio) = (median(&mut remote), median(&mut remote_ratios));
        let _ = writeln!(out, "\n| storage | pipeline from Kafka, stories/s | against the local folder | goal ≥ 90 % |\n|---|---:|---:|---|");
        let _ = writeln!(out, "| local folder | {e2e:.0} | 100 % | |");
        let _ = writeln!(out, "| {url} | {remote:.0} | {:.1} % | {} |", ratio * 100.0, if ratio >= 0.9 { "met" } else { "not met" });
    }
    let _ = writeln!(out, "\nPipeline stories/s counts between its first and last checkpoint (5 s apart: each one drains the classifier, as in production), so model loading is left out of both.");
    Ok(out)
}

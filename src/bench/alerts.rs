//! `bearwatch bench alerts`: how long from the story that completes a spike entering Kafka to its
//! notification arriving at a webhook, through the whole pipeline (Kafka → classify → windows →
//! rules → outbox → webhook), while a steady background feed keeps the classifier busy.
//!
//! Each sample is its own ticker. Before timing, every ticker gets `threshold − 1` negative stories,
//! so one more completes its burst. Then the completing stories are sent one at a time, at random
//! gaps, so that they land at every phase of the checkpoint cycle. The rules see live windows each
//! `[alerts] evaluate_every` of event time (here set to the checkpoint interval; the stories carry
//! the wall clock's time) and a notification leaves once a checkpoint has made it durable, so the
//! latency is bounded by the interval by design; the bench shows by how much, at 10 s and at 1 s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{failed, median, memory_mib, reuters};
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::classify::{Classifier, ClassifierConfig};
use crate::news::News;
use crate::rng::Lcg;
use crate::source::kafka::Output;
use crate::sync::lock;

#[derive(Debug, Clone, clap::Args)]
pub struct AlertBenchArgs {
    #[arg(long, env = "BEARWATCH_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Spikes timed per checkpoint interval.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Mean gap between completing stories; each gap is drawn from 0.3–1.7 × this.
    #[arg(long, default_value = "1s", value_parser = crate::config::HumanDuration::parse)]
    pub gap: crate::config::HumanDuration,
    /// Background stories per second (Reuters stories with new ids), sent throughout.
    #[arg(long, default_value_t = 200)]
    pub background_rate: u32,
    /// The `[storage] checkpoint_interval` values to compare.
    #[arg(long, value_delimiter = ',', default_value = "10s,1s", value_parser = crate::config::HumanDuration::parse)]
    pub checkpoint_intervals: Vec<crate::config::HumanDuration>,
    #[arg(long, default_value = "pipelines/data/reuters-1987.jsonl")]
    pub input: std::path::PathBuf,
}

/// Negative stories per ticker that make a burst (`n_negative >= BURST` in the ticker's window).
const BURST: usize = 3;

/// The `n`th story of a ticker's burst: three different stories the model scores negative (checked
/// before timing starts), not one re-sent, which the windows would count once.
fn burst_headline(ticker: &str, n: usize) -> String {
    match n % BURST {
        1 => format!("{ticker} shares plunge after profit warning as losses widen and lenders cut credit lines"),
        2 => format!("{ticker} slashes outlook and warns of deeper losses as demand collapses"),
        _ => format!("{ticker} defaults on bond payment, ratings cut to junk, shares crash"),
    }
}

const RULES: &str = r#"
[[rules]]
name = "ticker-negative-burst"
severity = "critical"
group = "ticker"
metric = "n_negative"
[rules.condition]
kind = "threshold"
op = ">="
value = 3

[[routes]]
receivers = ["bench"]
group_wait = "0s"
send_resolved = false
"#;

/// Firing notifications as they arrive: the ticker of each, and when.
type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

/// A webhook receiver on 127.0.0.1 that timestamps each firing notification on arrival.
fn start_receiver(arrivals: Arrivals) -> Result<(u16, tokio::runtime::Runtime), PipelineError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(failed)?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).map_err(failed)?;
    let port = listener.local_addr().map_err(failed)?.port();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |body: axum::body::Bytes| {
            let at = Instant::now();
            let arrivals = arrivals.clone();
            async move {
                let alert: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if let (Some(ticker), Some("firing")) = (alert["group"]["ticker"].as_str(), alert["state"].as_str()) {
                    lock(&arrivals).push((ticker.to_string(), at));
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    runtime.spawn(async move { axum::serve(listener, app).await });
    Ok((port, runtime))
}

fn story(id: String, headline: String, published_at: &str, ticker: Option<&str>) -> News {
    News {
        id,
        published_at: published_at.to_string(),
        headline,
        body: None,
        source: Some("bench".into()),
        tickers: ticker.map(|t| vec![t.to_string()]),
        url: None,
        lang: None,
        extra: Default::default(),
    }
}

fn send(output: &Output, topic: &str, story: &News) -> Result<(), PipelineError> {
    let json = serde_json::to_vec(story).map_err(failed)?;
    output.send(topic, story.id.as_bytes(), &json, None)?;
    Ok(())
}

/// `counters.received` of the latest checkpoint under `storage`.
fn received(storage: &Path) -> u64 {
    crate::storage::checkpoint(&storage.into(), None)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c["counters"]["received"].as_u64())
        .unwrap_or(0)
}

/// Sends `rate` stories per second until `stop`; returns how many it sent.
fn background(brokers: String, topic: String, base: Vec<News>, rate: u32, stop: Arc<AtomicBool>) -> Result<u64, PipelineError> {
    let output = Output::connect(&brokers, &Default::default())?;
    let (started, mut sent) = (Instant::now(), 0u64);
    while !stop.load(Ordering::SeqCst) && rate > 0 {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let mut s = base[sent as usize % base.len()].clone();
            s.id = format!("background-{sent}");
            s.published_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            send(&output, &topic, &s)?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    output.flush(Duration::from_secs(30))?;
    Ok(sent)
}

struct Round {
    latencies_ms: Vec<f64>,
    missing: usize,
    background_sent: u64,
    seconds: f64,
}

fn round(args: &AlertBenchArgs, base: &[News], interval: crate::config::HumanDuration, rng: &mut Lcg) -> Result<Round, PipelineError> {
    let arrivals: Arrivals = Default::default();
    let (port, _receiver) = start_receiver(arrivals.clone())?;
    let run_id = format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_millis());
    let topic = format!("bench-alerts-{run_id}");
    let storage = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&storage).map_err(failed)?;
    let rules = storage.join("rules.toml");
    std::fs::write(&rules, RULES).map_err(failed)?;
    // The bursts' stories share one event time inside a day-long window that stays open (lateness
    // 1 d), so no window boundary or watermark splits a burst while the round runs.
    let burst_time = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let tickers: Vec<String> = (0..args.samples).map(|i| format!("LAT{i}")).collect();

    let output = Output::connect(&args.brokers, &Default::default())?;
    for ticker in &tickers {
        for n in 1..BURST {
            send(&output, &topic, &story(format!("{ticker}-{n}"), burst_headline(ticker, n), &burst_time, Some(ticker)))?;
        }
    }
    output.flush(Duration::from_secs(60))?;
    let prepared = (tickers.len() * (BURST - 1)) as u64;

    let text = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{topic}\"\nmax_clock_skew = \"1h\"\n\
         [window]\nsize = \"1d\"\nallowed_lateness = \"1d\"\ngroup_by = [\"topic\", \"ticker\"]\n\
         [storage]\npath = \"{storage}\"\ncheckpoint_interval = \"{interval}\"\n\
         [alerts]\nrules = [\"{rules}\"]\nevaluate_every = \"{evaluate_every}\"\n[run]\nsummary_interval = \"0s\"\n\
         [[receivers]]\nname = \"bench\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/\"\nrate_limit = 0\n",
        brokers = args.brokers,
        storage = storage.display(),
        rules = rules.display(),
        evaluate_every = interval,
    );
    let config = PipelineConfig::parse(&text, "bench alerts")?;
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = {
        let stop = stop.clone();
        std::thread::spawn(move || crate::pipeline::run(&config, stop, Default::default()))
    };
    let measured = (|| {
        // Every burst short of its last story is in the windows (the model is loaded by then).
        let ready_by = Instant::now() + Duration::from_secs(300);
        while received(&storage) < prepared {
            if Instant::now() > ready_by || pipeline.is_finished() {
                return Err(failed("the pipeline did not take in the prepared stories within 5 minutes"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let quiet = Arc::new(AtomicBool::new(false));
        let feed = {
            let (brokers, topic, base, rate, quiet) = (args.brokers.clone(), topic.clone(), base.to_vec(), args.background_rate, quiet.clone());
            std::thread::spawn(move || background(brokers, topic, base, rate, quiet))
        };
        let started = Instant::now();
        let mut sent_at = BTreeMap::new();
        for ticker in &tickers {
            std::thread::sleep(args.gap.0.mul_f64(0.3 + 1.4 * rng.next_f64()));
            let completing = story(format!("{ticker}-{BURST}"), burst_headline(ticker, BURST), &burst_time, Some(ticker));
            sent_at.insert(ticker.clone(), Instant::now());
            send(&output, &topic, &completing)?;
            output.flush(Duration::from_secs(30))?;
        }
        // Leave time for the last checkpoint, and for a retry after it.
        let deadline = Instant::now() + interval.0 * 3 + Duration::from_secs(15);
        while lock(&arrivals).len() < tickers.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let seconds = started.elapsed().as_secs_f64();
        quiet.store(true, Ordering::SeqCst);
        let background_sent = feed.join().map_err(|_| failed("background feed panicked"))??;
        let arrived: BTreeMap<String, Instant> = lock(&arrivals).iter().cloned().rev().collect();
        if arrived.iter().any(|(ticker, at)| sent_at.get(ticker).is_none_or(|sent| at < sent)) {
            return Err(failed("an alert fired before its burst was complete: the rule or the headline is wrong"));
        }
        let latencies_ms: Vec<f64> = sent_at
            .iter()
            .filter_map(|(ticker, sent)| arrived.get(ticker).map(|at| at.saturating_duration_since(*sent).as_secs_f64() * 1000.0))
            .collect();
        Ok(Round { missing: tickers.len() - latencies_ms.len(), latencies_ms, background_sent, seconds })
    })();
    stop.store(true, Ordering::SeqCst);
    let finished = pipeline.join().map_err(|_| failed("the pipeline thread panicked"))?;
    let _ = std::fs::remove_dir_all(&storage);
    finished?;
    measured
}

/// The `q`-quantile (0–1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Fails unless the model scores every burst headline negative: otherwise no alert could fire.
fn check_headline() -> Result<(), PipelineError> {
    let classifier = Classifier::start(&ClassifierConfig::default())?;
    for n in 1..=BURST {
        let headline = burst_headline("LAT0", n);
        let scores = classifier.submit_now(&headline)?.wait()?;
        if scores.sentiment != "negative" {
            return Err(failed(format!("the model scores the burst headline {headline:?} {} (p_negative {:.2})", scores.sentiment, scores.p_negative)));
        }
    }
    Ok(())
}

pub fn run(args: &AlertBenchArgs) -> Result<String, PipelineError> {
    if args.samples == 0 || args.checkpoint_intervals.is_empty() {
        return Err(failed("need at least one sample and one checkpoint interval"));
    }
    check_headline()?;
    let base = reuters(&args.input)?;
    let mut rng = Lcg(7);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} spikes per row, completing stories {:.1}–{:.1} s apart, beside {} background stories/s from Kafka ({}); \
         route `group_wait = \"0s\"`; webhook on 127.0.0.1\n",
        args.samples,
        args.gap.0.as_secs_f64() * 0.3,
        args.gap.0.as_secs_f64() * 1.7,
        args.background_rate,
        args.brokers
    );
    let _ = writeln!(out, "| checkpoint_interval | p50 ms | p99 ms | max ms | notifications arrived | background stories/s achieved | peak RSS MiB |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for interval in &args.checkpoint_intervals {
        let r = round(args, &base, *interval, &mut rng)?;
        let mut sorted = r.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let (p50, p99, max) =
            if sorted.is_empty() { (f64::NAN, f64::NAN, f64::NAN) } else { (median(&mut sorted.clone()), quantile(&sorted, 0.99), sorted[sorted.len() - 1]) };
        let _ = writeln!(
            out,
            "| {interval} | {p50:.0} | {p99:.0} | {max:.0} | {} of {} | {:.0} | {} |",
            r.latencies_ms.len(),
            r.latencies_ms.len() + r.missing,
            r.background_sent as f64 / r.seconds,
            memory_mib().1
        );
    }
    let _ = writeln!(out, "\nLatency: from just before the completing story is sent to Kafka to the webhook receiving its notification.");
    Ok(out)
}

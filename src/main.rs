use std::path::PathBuf;
use std::process::ExitCode;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use bearwatch::classify::{self, Classifier, ClassifierConfig, Device};
use bearwatch::config::{self, EnvString};
use bearwatch::error::{Classified, ErrorClass};
use bearwatch::feedback::{Channel, FeedbackError, LabelRequest};
use bearwatch::pipeline::{self, PipelineConfig, PipelineError};
use bearwatch::server::FeedbackService;
use bearwatch::server::feedback::{self, FeedbackFailure};
use bearwatch::source::{SourceError, produce};
use clap::{Args, CommandFactory, Parser, Subcommand};

/// `println!` that a closed stdout (`bearwatch … | head`) cannot turn into a panic
/// (`telemetry::say`).
macro_rules! outln {
    ($($arg:tt)*) => { bearwatch::telemetry::say(format_args!($($arg)*)) };
}

/// `print!` likewise.
macro_rules! out {
    ($($arg:tt)*) => { bearwatch::telemetry::say_part(format_args!($($arg)*)) };
}

/// Watches financial news for bursts of negative sentiment.
///
/// Example: bearwatch run   (the demo pipeline; dashboard at http://127.0.0.1:9464/)
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines on stderr: `text` for people, `json` (one object per line, with the span fields
    /// such as the story id) for log shippers. The level comes from BEARWATCH_LOG (default info).
    #[arg(long, global = true, value_enum, env = "BEARWATCH_LOG_FORMAT", default_value = "text")]
    log_format: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Shell completions on stdout, generated from the same definitions as --help.
    ///
    /// Example: bearwatch completions bash > ~/.local/share/bash-completion/completions/bearwatch
    Completions { shell: clap_complete::Shell },
    /// The manual page (roff) on stdout, generated from the same definitions as --help.
    ///
    /// Example: bearwatch man > bearwatch.1 && man ./bearwatch.1
    Man,
    /// Runs a pipeline: news in, scored, windowed, stored, checkpointed. Stops cleanly on SIGINT/SIGTERM;
    /// SIGHUP reads the alert rule files and the pipeline file's receivers and tokens again.
    ///
    /// Example: bearwatch run --pipeline pipelines/kafka.toml
    Run {
        /// Pipeline file; default: the embedded demo (`pipelines/demo.toml`), which needs no broker.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Which stages to run; overrides `[run] role` (all: everything; classify: news → [sink];
        /// aggregate: [sink] topic → windows, alerts and tables).
        #[arg(long, value_enum)]
        role: Option<pipeline::Role>,
        /// After a file input ends, keep serving the dashboard, SQL and metrics until Ctrl-C.
        #[arg(long)]
        keep_serving: bool,
    },
    /// Runs a read-only SQL query over a pipeline's tables (news, windows, late, alerts, notifications).
    ///
    /// Example: bearwatch sql "SELECT topic, count(*) FROM news GROUP BY topic"
    Sql {
        /// The storage folder of a pipeline (default: the demo's).
        #[arg(long, conflicts_with = "url")]
        storage: Option<PathBuf>,
        /// A running pipeline's HTTP API, e.g. http://127.0.0.1:9464.
        #[arg(long)]
        url: Option<String>,
        #[arg(long, value_enum, default_value_t = bearwatch::sql::Format::Table)]
        format: bearwatch::sql::Format,
        /// Bearer token for --url.
        #[arg(long, env = "BEARWATCH_TOKEN", hide_env_values = true)]
        token: Option<String>,
        query: String,
    },
    /// Alert rule files.
    ///
    /// Example: bearwatch rules check alerts/default.toml
    #[command(subcommand)]
    Rules(RulesCommand),
    /// A pipeline's storage folder.
    ///
    /// Example: bearwatch storage repair --storage data/kafka
    #[command(subcommand)]
    Storage(StorageCommand),
    /// Analysts' feedback (README, "People in the loop"): label judgements in, the training-ready set out.
    ///
    /// Example: bearwatch feedback export --storage data/demo --out feedback.jsonl
    #[command(subcommand)]
    Feedback(FeedbackCommand),
    /// Builds and judges candidate models from analysts' feedback.
    ///
    /// Example: bearwatch model retrain --storage data/demo --out candidates/1
    #[command(subcommand)]
    Model(ModelCommand),
    /// Loads a JSON-lines file into a Kafka topic, in event-time order.
    ///
    /// Example: bearwatch produce --brokers 127.0.0.1:9092 --topic news pipelines/data/reuters-1987.jsonl
    Produce {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// 0 = as fast as possible; N = N× the pace of the stories' own timestamps.
        #[arg(long, default_value_t = 0.0)]
        speed: f64,
        /// At a --speed: a longer quiet spell between two stories' timestamps is sent as this long (default 1d).
        #[arg(long, value_parser = bearwatch::config::HumanDuration::parse)]
        max_gap: Option<bearwatch::config::HumanDuration>,
        /// A librdkafka producer property, `key=value` (repeatable); `${ENV}` is expanded.
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        file: PathBuf,
    },
    /// Scores JSON lines (news objects or {"text": …}) from a file or stdin; one scored line out per line in.
    ///
    /// Example: bearwatch classify --explain pipelines/data/reuters-1987.jsonl
    Classify {
        /// Input file; stdin when absent or `-`.
        input: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Exit with status 1 if any line could not be scored.
        #[arg(long)]
        strict: bool,
        /// Add `why`: each word's effect on p_negative when it is left out (all of a text's variants
        /// in one model call), strongest push towards negative first.
        #[arg(long)]
        explain: bool,
    },
    /// Throughput benchmarks.
    ///
    /// Example: bearwatch bench classify --items 512
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum StorageCommand {
    /// Sets aside the Parquet parts that a start-up refuses (missing, or with a footer that does not
    /// read): unreadable ones move to `<storage>/damaged/`, the checkpoint records them as lost, and
    /// the pipeline starts again with the rest. Exits 0 with what it set aside.
    ///
    /// Example: bearwatch storage repair --storage data/kafka
    Repair {
        #[arg(long)]
        storage: PathBuf,
        /// The instance whose parts to check (`[storage] instance`), when several share the storage.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Merges the analysts' journals' files (labels, verdicts, missed events) by hour and by day
    /// now, until none is due: what a running pipeline does a few dozen merges a minute. For a
    /// backlog, or a storage that no pipeline writes. Safe beside running pipelines.
    ///
    /// Example: bearwatch storage merge --storage data/kafka
    Merge {
        #[arg(long)]
        storage: PathBuf,
    },
}

#[derive(Subcommand)]
enum FeedbackCommand {
    /// Records label judgements from a JSON-lines file, e.g. a review done in a spreadsheet: one
    /// {"text" or "story_id", "head": "sentiment"|"topic", "label", "action"?, "note"?} per line.
    /// Every line is checked first; one bad line writes nothing (exit 2, with its line number).
    ///
    /// Example: bearwatch feedback import --storage data/demo --analyst ana review.jsonl
    Import {
        #[arg(long)]
        storage: PathBuf,
        /// Recorded as the analyst of every row.
        #[arg(long)]
        analyst: String,
        /// The model whose topics labels may name; default: the bundled `models/`.
        #[arg(long)]
        model: Option<PathBuf>,
        file: PathBuf,
    },
    /// Lists the recent stories (the week before the newest, by default) whose label would be worth
    /// most: where the model is least sure (the margin between its two likeliest classes), weighted
    /// up to 3x where the story's window is near the count at which the topic's rule fires; near-
    /// duplicates of a listed story and stories already judged are left out. Label them with
    /// `feedback import` (by story_id), the dashboard's Review view or POST /api/feedback/labels.
    ///
    /// Example: bearwatch feedback queue --pipeline pipelines/demo.toml --limit 20
    Queue {
        /// The pipeline whose storage, rules and model to read; default: the demo's.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Read this storage instead of the pipeline's.
        #[arg(long)]
        storage: Option<PathBuf>,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
        /// Stories published within this many hours of the newest.
        #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u32).range(1..=8784))]
        hours: u32,
        /// `table` for people, `json` (one object per line) for scripts.
        #[arg(long, value_enum, default_value = "table")]
        format: QueueFormat,
    },
    /// Writes the label that won for each text and head, one JSON object per line:
    /// {"text", "head", "label", "analyst", "created_at", "feedback_id", "story_id"}.
    ///
    /// Example: bearwatch feedback export --storage data/demo --out feedback.jsonl
    Export {
        #[arg(long)]
        storage: PathBuf,
        /// Output file; stdout when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QueueFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Builds a candidate from the labels that won in STORAGE's label_feedback and the model's
    /// shipped examples (refit/anchors.jsonl). By default it refits both heads on the model's
    /// embeddings (seconds); with --encoder it fine-tunes the encoder itself with the heads, on the
    /// CPU, replaying the shipped examples so that it does not forget them and stopping when
    /// held-out loss rises (minutes). Either way it recalibrates the heads and writes a complete
    /// model folder to OUT with report.json and report.md: the candidate beside the champion, with
    /// paired 95 % intervals, on the frozen evaluation set (refit/eval.jsonl), on each of its
    /// domains and on the newest feedback, which it did not train on. No Python, no pipeline run.
    ///
    /// Example: bearwatch model retrain --storage data/demo --out candidates/1 --encoder
    Retrain {
        #[arg(long)]
        storage: PathBuf,
        /// A new or empty folder for the candidate.
        #[arg(long)]
        out: PathBuf,
        /// The champion to start from; default: the bundled `models/`.
        #[arg(long)]
        from: Option<PathBuf>,
        /// How many anchor examples one feedback label weighs (head refit).
        #[arg(long, default_value_t = bearwatch::learn::FEEDBACK_WEIGHT)]
        feedback_weight: f32,
        /// Fine-tune the encoder as well as the heads.
        #[arg(long)]
        encoder: bool,
        /// Fine-tuning: at most this many epochs (it stops earlier when held-out loss rises two epochs in a row).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().epochs, requires = "encoder")]
        epochs: usize,
        /// Fine-tuning: the seed of the shuffles and of the anchors replayed.
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().seed, requires = "encoder")]
        seed: u64,
        /// Fine-tuning: the encoder's learning rate (AdamW).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().learning_rate, requires = "encoder")]
        learning_rate: f64,
        /// Fine-tuning: the heads' learning rate (AdamW; they start from the champion's).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().head_learning_rate, requires = "encoder")]
        head_learning_rate: f64,
        /// Fine-tuning: shipped examples replayed per label each epoch (more forgets less, costs time).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().replay, requires = "encoder")]
        replay: f64,
        /// Fine-tuning: how strongly each example keeps the champion's probabilities on the head it
        /// does not label (0 lets that head drift with the encoder).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().distill, requires = "encoder")]
        distill: f64,
        /// Fine-tuning: how much each shipped example replayed aims at the champion's own answer
        /// rather than its label, 0 to 1 (more keeps the shipped domains as they were).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().keep, requires = "encoder")]
        keep: f64,
        /// Fine-tuning: the fine-tuned weights' share in the candidate, above 0 up to 1, the rest
        /// the champion's (less keeps the shipped domains closer to where they were).
        #[arg(long, default_value_t = bearwatch::learn::tune::TuneSettings::default().blend, requires = "encoder")]
        blend: f64,
    },
    /// Makes a candidate the champion (a `model_aliases` row, with the version in `models`). Refused
    /// (exit 2) when its report shows it worse than the champion beyond its interval on either
    /// set, unless --force gives a --reason, which is recorded. Pipelines started from then on serve it.
    ///
    /// Example: bearwatch model promote candidates/1 --storage data/demo --by ana
    Promote {
        dir: PathBuf,
        #[arg(long)]
        storage: PathBuf,
        /// Who promotes it (recorded as `set_by`).
        #[arg(long)]
        by: String,
        #[arg(long, requires = "reason")]
        force: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Runs DIR in shadow: every pipeline on STORAGE also scores each story with it (loaded and
    /// checked against its golden outputs first) and writes its scores to `shadow_news`, never to
    /// the windows or alerts. --stop ends the shadow. A second classification per story costs CPU.
    ///
    /// Example: bearwatch model shadow candidates/1 --storage data/demo --by ana
    Shadow {
        #[arg(required_unless_present = "stop", conflicts_with = "stop")]
        dir: Option<PathBuf>,
        #[arg(long)]
        storage: PathBuf,
        /// Who sets it (recorded as `set_by`).
        #[arg(long)]
        by: String,
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The alert episodes the challenger in shadow would have raised, next to the champion's, on the
    /// stories both scored: both replayed through the pipeline's [window] and [alerts] rules.
    ///
    /// Example: bearwatch model compare --pipeline pipelines/demo.toml
    Compare {
        /// The pipeline file whose windows and rules to replay (default: the demo's).
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Instead of the pipeline's `[storage] path`.
        #[arg(long)]
        storage: Option<PathBuf>,
        /// A model id in `shadow_news` (default: the newest).
        #[arg(long)]
        challenger: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Points the champion alias back at the model it named before, in one step.
    ///
    /// Example: bearwatch model rollback --storage data/demo --by ana --reason "too many false alarms"
    Rollback {
        #[arg(long)]
        storage: PathBuf,
        #[arg(long)]
        by: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validates rule files (rules, routes, silences); errors give file, line and field, exit 2.
    /// With --pipeline, checks them against that pipeline too, as its start and a reload (SIGHUP)
    /// do: routes name its receivers, ticker rules need its per-ticker windows. With --pipeline
    /// and no FILE, its own rule files.
    ///
    /// Example: bearwatch rules check alerts/default.toml alerts/market.toml
    Check {
        /// A pipeline file whose receivers and windows the rules must fit.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        #[arg(required_unless_present = "pipeline")]
        files: Vec<PathBuf>,
    },
    /// Runs unit tests of rule files (promtool-style): synthetic stories in, the alerts expected
    /// firing at given event times out; prints exp/got for each mismatch and exits 1 on any.
    ///
    /// Example: bearwatch rules test alerts/tests/default.test.toml
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Replays a pipeline's stored stories (`news`) through its windows and these rules, with the
    /// same lifecycle, and prints the episodes each rule would have raised, with precision from
    /// analysts' verdicts and recall against their missed events (Wilson 95 % intervals).
    ///
    /// Example: bearwatch rules backtest alerts/default.toml --pipeline pipelines/demo.toml --explain topic=earnings
    Backtest {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The pipeline file whose windows and storage to use (default: the demo's).
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Instead of the pipeline's `[storage] path`.
        #[arg(long)]
        storage: Option<PathBuf>,
        /// Only stories published at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Only stories published before this time (RFC 3339).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Every reading of this group, window by window: `topic=energy`, `ticker=XOM`, `all`.
        #[arg(long)]
        explain: Option<String>,
        /// Replays again with a condition field at each value and prints episodes per week, precision
        /// and recall for each: `[RULE.]condition.FIELD=FROM:TO:STEP`, e.g.
        /// topic-negative-burst.condition.p_value=0.001:0.005:0.002 (no RULE: every rule with FIELD);
        /// `condition.of.1.p_value` is the second test of a `kind = "any"` condition.
        #[arg(long)]
        sweep: Option<pipeline::backtest::Sweep>,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Headlines/s and batch latency of the classifier against bare ONNX Runtime and a Python pipeline.
    ///
    /// Example: bearwatch bench classify --items 512 --batch-sizes 1 32
    Classify(bearwatch::bench::classify::BenchArgs),
    /// Five representative queries on a generated 10 M-row `news` table, beside DuckDB.
    ///
    /// Example: bearwatch bench sql --rows 1000000
    Sql(bearwatch::bench::sql::SqlBenchArgs),
    /// Event-time windows and alert rules alone on pre-scored events: events/s on one core.
    ///
    /// Example: bearwatch bench windows --rules alerts/default.toml
    Windows(bearwatch::bench::windows::WindowsBenchArgs),
    /// The whole pipeline from a Kafka backlog beside the classifier alone: stories/s and memory.
    ///
    /// Example: bearwatch bench e2e --brokers "$(scripts/kafka.sh start)" --stories 6000
    E2e(bearwatch::bench::e2e::E2eBenchArgs),
    /// From the story that completes a spike entering Kafka to its webhook notification: p50, p99.
    ///
    /// Example: bearwatch bench alerts --brokers "$(scripts/kafka.sh start)" --samples 20
    Alerts(bearwatch::bench::alerts::AlertBenchArgs),
    /// Plays the analyst: labels part of an unseen set, retrains, promotes, swaps; accuracy before
    /// and after on the untouched part and elsewhere, and how long each step took.
    ///
    /// Example: bearwatch bench loop --set benches/data/loop/sentfin-dev.jsonl --splits 3
    Loop(bearwatch::bench::feedback_loop::LoopBenchArgs),
    /// Injects bursts of negative stories into a dense stream and measures what the pipeline's
    /// windows and rules catch: recall, event-time delay, episodes no burst explains.
    ///
    /// Example: bearwatch bench detect --seeds 1,2,3 --bursts 20 --rules alerts/default.toml
    Detect(bearwatch::bench::detect::DetectBenchArgs),
    /// The dashboard's queries over two aggregate instances' tables on object storage, against the
    /// same rows in one local folder: milliseconds per query and the ratio.
    ///
    /// Example: bearwatch bench instances --object-store s3://bearwatch/bench --stories 3000
    Instances(bearwatch::bench::instances::InstancesBenchArgs),
    /// What a checkpoint writes once the state is big: the pipeline grows it on distinct stories,
    /// then checkpoints a few stories at a time; bytes written per checkpoint against the state.
    ///
    /// Example: bearwatch bench checkpoints --stories 30000 --then 420
    Checkpoints(bearwatch::bench::checkpoints::CheckpointBenchArgs),
}

/// Classifier settings, the same as the `[model]` section of a pipeline.
#[derive(Args)]
struct ModelArgs {
    /// Model folder (model.onnx, tokenizer.json, labels.json); default: the bundled `models/`.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    #[arg(long)]
    max_batch_size: Option<usize>,
    #[arg(long)]
    max_wait_ms: Option<u64>,
    /// Model workers, each running one batch at a time; 0 = one per core on CPU (at most 8), one on CUDA.
    #[arg(long)]
    workers: Option<usize>,
    /// ONNX Runtime intra-op threads per worker; 0 = the cores shared out among the workers.
    #[arg(long)]
    threads: Option<usize>,
    /// Tokens kept per text.
    #[arg(long)]
    max_length: Option<usize>,
    /// Characters of each story's body to classify along with its headline (0 = headline only).
    #[arg(long)]
    body_chars: Option<usize>,
}

impl ModelArgs {
    fn config(&self) -> ClassifierConfig {
        let defaults = ClassifierConfig::default();
        ClassifierConfig {
            path: self.model.clone(),
            device: self.device,
            max_batch_tokens: self.max_batch_tokens.unwrap_or(defaults.max_batch_tokens),
            max_batch_size: self.max_batch_size.unwrap_or(defaults.max_batch_size),
            max_wait_ms: self.max_wait_ms.unwrap_or(defaults.max_wait_ms),
            workers: self.workers.unwrap_or(defaults.workers),
            threads: self.threads.unwrap_or(defaults.threads),
            max_length: self.max_length.unwrap_or(defaults.max_length),
            body_chars: self.body_chars.unwrap_or(defaults.body_chars),
            ..defaults
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BEARWATCH_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        OutputFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        OutputFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if error_class(&e) == Some(ErrorClass::User) { 2 } else { 1 })
        }
    }
}

/// The class of a component error inside `e`, if it is one.
fn error_class(e: &anyhow::Error) -> Option<ErrorClass> {
    e.downcast_ref::<classify::ClassifyError>()
        .map(Classified::class)
        .or_else(|| e.downcast_ref::<PipelineError>().map(Classified::class))
        .or_else(|| e.downcast_ref::<config::ConfigError>().map(Classified::class))
        .or_else(|| e.downcast_ref::<SourceError>().map(Classified::class))
        .or_else(|| e.downcast_ref::<bearwatch::sql::SqlError>().map(Classified::class))
        .or_else(|| e.downcast_ref::<FeedbackFailure>().map(Classified::class))
        .or_else(|| e.downcast_ref::<bearwatch::learn::LearnError>().map(Classified::class))
        .or_else(|| e.downcast_ref::<bearwatch::storage::StorageError>().map(Classified::class))
}

/// The most lines `feedback import` reads from one file.
const MAX_IMPORT_LINES: usize = 100_000;
/// The longest line `feedback import` reads: a 10,000-character text and a 2,000-character note of
/// four-byte characters, escaped, fit.
const MAX_IMPORT_LINE_BYTES: u64 = 128 << 10;
/// The largest file `feedback import` reads, refused before reading: 256 MiB.
const MAX_IMPORT_BYTES: u64 = 256 << 20;

fn import_feedback(storage: &std::path::Path, analyst: &str, model: Option<PathBuf>, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::BufRead as _;
    use std::io::Read as _;
    let opened = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let size = opened.metadata().map(|m| m.len()).unwrap_or(0);
    let bad = |line: usize, why: String| FeedbackFailure::from(FeedbackError::Invalid(format!("{}:{line}: {why}", file.display())));
    anyhow::ensure!(
        size <= MAX_IMPORT_BYTES,
        "{}: {size} bytes, over the {MAX_IMPORT_BYTES} bytes one import takes; split the file",
        file.display()
    );
    // Line by line, each read at most MAX_IMPORT_LINE_BYTES: a file is never held whole.
    let mut reader = std::io::BufReader::new(opened);
    let mut requests = Vec::new();
    let mut lines = Vec::new();
    let mut bytes = Vec::new();
    for number in 1.. {
        bytes.clear();
        let read = (&mut reader).take(MAX_IMPORT_LINE_BYTES + 1).read_until(b'\n', &mut bytes).with_context(|| format!("cannot read {}", file.display()))?;
        if read == 0 {
            break;
        }
        if bytes.len() as u64 > MAX_IMPORT_LINE_BYTES {
            return Err(bad(number, format!("the line is over {MAX_IMPORT_LINE_BYTES} bytes")).into());
        }
        let line = std::str::from_utf8(&bytes).map_err(|e| bad(number, format!("not UTF-8 ({e})")))?;
        if line.trim().is_empty() {
            continue;
        }
        anyhow::ensure!(requests.len() < MAX_IMPORT_LINES, "{}: more than {MAX_IMPORT_LINES} lines; split the file", file.display());
        let request: LabelRequest = serde_json::from_str(line).map_err(|e| bad(number, e.to_string()))?;
        requests.push(request);
        lines.push(number);
    }
    let model = ClassifierConfig { path: model, ..ClassifierConfig::default() }.model_dir();
    let topics = classify::ModelSpec::load(&model)?.topics;
    let storage = &location(storage)?;
    let service = FeedbackService::new(storage.clone(), topics, Default::default());
    let limits = bearwatch::server::ServerConfig::default().query_limits();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rows = runtime.block_on(async {
        let ctx = bearwatch::sql::context(storage, limits, None)?;
        feedback::record_labels(&ctx, &service, requests, analyst, Channel::Cli).await.map_err(|e| match e {
            FeedbackFailure::Item { item, source } => {
                FeedbackFailure::from(FeedbackError::Invalid(format!("{}:{}: {source}", file.display(), lines[item - 1])))
            }
            other => other,
        })
    })?;
    let corrected = rows.iter().filter(|r| r.action == bearwatch::feedback::Action::Correct).count();
    eprintln!("recorded {} judgements ({corrected} corrections) by {analyst} in {storage}/label_feedback", rows.len());
    Ok(ExitCode::SUCCESS)
}

/// One lookup over the tables under `storage`, with the server's default query limits.
fn lookup<T, F, Fut>(storage: &std::path::Path, query: F) -> anyhow::Result<T>
where
    F: FnOnce(datafusion::prelude::SessionContext) -> Fut,
    Fut: std::future::Future<Output = Result<T, bearwatch::sql::SqlError>>,
{
    let limits = bearwatch::server::ServerConfig::default().query_limits();
    let storage = location(storage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    Ok(runtime.block_on(async { query(bearwatch::sql::context(&storage, limits, None)?).await })?)
}

/// `--storage`: a folder or an `s3://bucket/prefix` (its client set by the `AWS_*` environment).
fn location(storage: &std::path::Path) -> anyhow::Result<bearwatch::storage::Location> {
    Ok(bearwatch::storage::Location::parse(&storage.to_string_lossy(), &bearwatch::storage::S3Config::default())?)
}

fn winning_labels(storage: &std::path::Path) -> anyhow::Result<Vec<bearwatch::feedback::TrainingLabel>> {
    lookup(storage, |ctx| async move { bearwatch::sql::lookup::winning_labels(&ctx).await })
}

/// The pipeline file `path` (the demo's by default), with its storage moved to `storage` if given.
fn pipeline_config(path: Option<&std::path::Path>, storage: Option<PathBuf>) -> anyhow::Result<PipelineConfig> {
    let mut config = match path {
        Some(path) => PipelineConfig::load(path)?,
        None => PipelineConfig::parse(pipeline::DEMO_PIPELINE, pipeline::DEMO_PIPELINE_NAME)?,
    };
    if let Some(storage) = storage {
        config.storage.path = storage;
    }
    Ok(config)
}

fn retrain(
    storage: &std::path::Path,
    out: &std::path::Path,
    from: Option<PathBuf>,
    feedback_weight: f32,
    encoder: Option<bearwatch::learn::tune::TuneSettings>,
) -> anyhow::Result<ExitCode> {
    let from = from.unwrap_or_else(|| pipeline::bundled(std::path::Path::new("models")));
    let feedback = winning_labels(storage)?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let storage = &location(storage)?;
    let report = bearwatch::learn::retrain(bearwatch::learn::RetrainOptions { storage, out, from: &from, feedback, feedback_weight, encoder, progress })?;
    out!("{}", report.markdown());
    eprintln!("candidate {} in {} (report.json, report.md)", report.candidate, out.display());
    Ok(ExitCode::SUCCESS)
}

fn export_feedback(storage: &std::path::Path, out: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let labels = winning_labels(storage)?;
    let mut text = String::new();
    for label in &labels {
        text.push_str(&serde_json::to_string(label)?);
        text.push('\n');
    }
    match out {
        Some(path) => std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?,
    }
    eprintln!("{} labels", labels.len());
    Ok(ExitCode::SUCCESS)
}

fn run_pipeline(path: Option<PathBuf>, role: Option<pipeline::Role>, keep_serving: bool) -> anyhow::Result<ExitCode> {
    let mut config = pipeline_config(path.as_deref(), None)?;
    config.run.keep_serving |= keep_serving;
    if let Some(role) = role {
        config.run.role = role;
        config.check_role().map_err(|(field, message)| config::ConfigError::Invalid {
            file: path.as_ref().map_or(pipeline::DEMO_PIPELINE_NAME.to_string(), |p| p.display().to_string()),
            line: 0,
            column: 0,
            field: format!("{field} (--role)"),
            message,
        })?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // A second signal while stopping exits at once (status 1), as people expect of Ctrl-C.
        signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    // SIGHUP reads the rule files and receivers again, as Prometheus and Alertmanager do, instead of ending the run.
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    // Where the dashboard is, said before the first progress line; a file replay ends, and its
    // dashboard with it, unless the run keeps serving.
    let dashboard = config.server.http.as_ref().map(|a| a.as_str().to_string()).filter(|a| !a.ends_with(":0"));
    let replay_ends = config.source.kind == bearwatch::source::SourceKind::File && !config.run.keep_serving;
    if let Some(addr) = &dashboard {
        let until = if replay_ends { " while the replay runs (add --keep-serving to keep it up afterwards)" } else { "" };
        outln!("dashboard: http://{addr}/{until}");
    }
    let started = std::time::Instant::now();
    let outcome = pipeline::run(&config, stop, reload)?;
    let c = &outcome.counters;
    outln!(
        "{}: {} stories read, {} scored, {} dead-lettered, {} late, {} duplicates, {} alert state changes in {:.1} s",
        if outcome.interrupted { "stopped" } else { "done" },
        c.received,
        c.scored,
        c.dead_lettered,
        c.late,
        c.duplicates,
        c.alerts,
        started.elapsed().as_secs_f64()
    );
    // Every table that holds parts, the people's journals too.
    let written: Vec<String> = bearwatch::storage::Table::ALL
        .iter()
        .filter(|t| bearwatch::storage::holds_parts(&outcome.storage, config.storage.instance(), **t).unwrap_or(false))
        .map(|t| format!("{}/", t.name()))
        .collect();
    outln!("tables (Parquet) and checkpoint in {}: {}", outcome.storage, written.join(", "));
    if let Some(addr) = dashboard.filter(|_| replay_ends && !outcome.interrupted) {
        outln!("the dashboard at http://{addr}/ closed with the replay: `bearwatch run --keep-serving` keeps it up");
    }
    if !outcome.topics.is_empty() {
        outln!("\n{}", outcome.topics);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_sql(
    storage: Option<PathBuf>,
    url: Option<String>,
    format: bearwatch::sql::Format,
    token: Option<String>,
    query: &str,
) -> anyhow::Result<ExitCode> {
    use bearwatch::sql::{self, Format, SqlError};
    use std::io::Write;
    let output = match url {
        Some(url) => {
            let accept = match format {
                Format::Csv => "text/csv",
                Format::Json => "application/json",
                Format::Table | Format::Arrow => "application/vnd.apache.arrow.stream",
            };
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let mut request = agent.post(format!("{}/sql", url.trim_end_matches('/'))).header("Accept", accept);
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let mut response = request.send(query).with_context(|| format!("cannot reach {url}"))?;
            let status = response.status();
            let body = response.body_mut().read_to_vec()?;
            if !status.is_success() {
                let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                eprintln!("error: {}", error["error"].as_str().unwrap_or(&String::from_utf8_lossy(&body)));
                return Ok(ExitCode::from(if status.is_client_error() { 2 } else { 1 }));
            }
            if format == Format::Table {
                let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)?;
                let batches = reader.collect::<Result<Vec<_>, _>>()?;
                sql::encode(&batches, Format::Table)?
            } else {
                body
            }
        }
        None => {
            let storage = location(&storage.unwrap_or_else(|| PathBuf::from("data/demo")))?;
            if let Some(folder) = storage.as_local() {
                anyhow::ensure!(folder.is_dir(), "{} is not a storage folder (run a pipeline first, or pass --storage)", folder.display());
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = runtime.block_on(async {
                let limits = sql::Limits { memory_bytes: 1 << 30, timeout: std::time::Duration::from_secs(300) };
                let ctx = sql::context(&storage, limits, None)?;
                let batches = sql::run(&ctx, query).await?;
                sql::encode(&batches, format)
            });
            match result {
                Ok(bytes) => bytes,
                Err(e @ (SqlError::Refused(_) | SqlError::Invalid { .. } | SqlError::Data(_) | SqlError::Timeout(_) | SqlError::Limit(_))) => {
                    eprintln!("error: {}", e.render(query));
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&output)?;
    if !output.ends_with(b"\n") {
        stdout.write_all(b"\n")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { pipeline, role, keep_serving } => run_pipeline(pipeline, role, keep_serving),
        Command::Sql { storage, url, format, token, query } => run_sql(storage, url, format, token, &query),
        Command::Storage(StorageCommand::Repair { storage, instance }) => {
            // A pipeline running on the folder would write its checkpoint over the repair's.
            let mut _hold = None;
            if storage.to_str().is_none_or(|s| !s.contains("://")) {
                let checkpoint = match &instance {
                    Some(name) => storage.join("checkpoints").join(format!("{name}.json")),
                    None => storage.join("checkpoint.json"),
                };
                anyhow::ensure!(checkpoint.is_file(), "{} is missing: not a pipeline's storage (or not that instance's)", checkpoint.display());
                _hold = match &instance {
                    None => Some(bearwatch::storage::hold(&storage)?),
                    Some(name) => bearwatch::storage::hold_instance(&bearwatch::storage::Location::Local(storage.clone()), name)?,
                };
            }
            let storage = location(&storage)?;
            let found = bearwatch::storage::Storage::repair(&storage, instance.as_deref())?;
            if found.is_empty() {
                outln!("{storage}: nothing to repair");
            }
            for damage in found {
                outln!("set aside: {damage}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Storage(StorageCommand::Merge { storage }) => {
            if storage.to_str().is_none_or(|s| !s.contains("://")) {
                anyhow::ensure!(storage.is_dir(), "{} is not a folder: not a storage", storage.display());
            }
            let storage = location(&storage)?;
            for table in bearwatch::storage::Table::JOURNALS {
                let (mut merges, mut deleted, mut rescued) = (0, 0, 0);
                loop {
                    let round = bearwatch::storage::merge_journal(&storage, table, chrono::Utc::now())?;
                    (merges, deleted, rescued) = (merges + round.merges, deleted + round.deleted, rescued + round.rescued);
                    for bucket in &round.refused {
                        eprintln!("{}: {bucket} not merged: its files' columns differ beyond added nullable ones", table.name());
                    }
                    // Nothing merged or deleted: nothing is due (or another process is merging).
                    if round.merges + round.deleted == 0 {
                        break;
                    }
                }
                if merges + deleted + rescued > 0 {
                    outln!("{}: {merges} merges, {deleted} files deleted, {rescued} written again", table.name());
                }
            }
            let visible = |table| -> anyhow::Result<usize> {
                let files = bearwatch::storage::journal_files(&storage, table)?;
                Ok(files.len() - bearwatch::storage::merged_journal_files(files.iter().map(String::as_str)).len())
            };
            let left = bearwatch::storage::Table::JOURNALS.into_iter().map(visible).sum::<anyhow::Result<usize>>()?;
            outln!("{storage}: {left} journal files");
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules(RulesCommand::Check { files, pipeline }) => {
            let config = pipeline.as_deref().map(|path| pipeline_config(Some(path), None)).transpose()?;
            let files = match &config {
                Some(config) if files.is_empty() => pipeline::rule_paths(config),
                _ => files,
            };
            for (file, rules) in files.iter().zip(bearwatch::detect::RuleFile::load_all(&files)?) {
                outln!(
                    "{}: ok ({} rules, {} routes, {} silences)",
                    file.display(),
                    rules.rules.len(),
                    rules.routes.len(),
                    rules.silences.len()
                );
            }
            if let (Some(mut config), Some(path)) = (config, pipeline) {
                config.alerts.rules = files;
                pipeline::check_rule_files(&config)?;
                outln!("{}: the rules fit its receivers and windows", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Feedback(FeedbackCommand::Import { storage, analyst, model, file }) => import_feedback(&storage, &analyst, model, &file),
        Command::Feedback(FeedbackCommand::Export { storage, out }) => export_feedback(&storage, out.as_deref()),
        Command::Feedback(FeedbackCommand::Queue { pipeline, storage, limit, hours, format }) => {
            let config = pipeline_config(pipeline.as_deref(), storage)?;
            let queue = pipeline::review_queue(&config, usize::from(limit), hours)?;
            match format {
                QueueFormat::Json => {
                    for item in &queue {
                        outln!("{}", serde_json::to_string(item)?);
                    }
                }
                QueueFormat::Table => {
                    outln!("| # | story | published | topic | sentiment | ask | uncertain | near alert | score | headline |\n|---:|---|---|---|---|---|---:|---:|---:|---|");
                    for i in &queue {
                        outln!(
                            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
                            i.rank, i.story_id, i.published_at, i.topic, i.sentiment, i.ask.name(), i.uncertainty, i.alert_closeness, i.score, bearwatch::telemetry::one_line(&i.headline).replace('|', "/")
                        );
                    }
                }
            }
            eprintln!("{} stories to review", queue.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Retrain { storage, out, from, feedback_weight, encoder, epochs, seed, learning_rate, head_learning_rate, replay, distill, keep, blend }) => {
            let tune = encoder.then(|| bearwatch::learn::tune::TuneSettings { epochs, seed, learning_rate, head_learning_rate, replay, distill, keep, blend, ..Default::default() });
            retrain(&storage, &out, from, feedback_weight, tune)
        }
        Command::Model(ModelCommand::Promote { dir, storage, by, force, reason }) => {
            let forced = reason.as_deref().filter(|_| force);
            let row = bearwatch::learn::registry::promote(&location(&storage)?, &dir, &by, forced)?;
            outln!("champion: {} ({})", row.model, row.reason);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Shadow { dir, storage, by, stop, reason }) => {
            let row = bearwatch::learn::registry::shadow(&location(&storage)?, dir.as_deref().filter(|_| !stop), &by, reason.as_deref())?;
            match row.model.as_str() {
                "" => outln!("shadow: none ({})", row.reason),
                model => outln!("shadow: {model} ({})", row.reason),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules(RulesCommand::Test { files }) => {
            let mut failed = 0;
            for file in &files {
                for outcome in bearwatch::detect::unit::run(file)? {
                    if outcome.failures.is_empty() {
                        outln!("ok    {}: {}", file.display(), outcome.name);
                    } else {
                        failed += 1;
                        outln!("FAIL  {}: {}", file.display(), outcome.name);
                        for failure in &outcome.failures {
                            outln!("  {failure}");
                        }
                    }
                }
            }
            Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Rules(RulesCommand::Backtest { files, pipeline: path, storage, from, to, explain, sweep, format }) => {
            let config = pipeline_config(path.as_deref(), storage)?;
            let options = pipeline::backtest::BacktestOptions { rules: &files, from, to, explain, sweep };
            let backtest = pipeline::backtest::backtest(&config, &options)?;
            match format {
                OutputFormat::Text => out!("{}", backtest.render(&files)),
                OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&backtest)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Compare { pipeline: path, storage, challenger, format }) => {
            let config = pipeline_config(path.as_deref(), storage)?;
            let comparison = pipeline::compare::compare(&config, challenger.as_deref())?;
            match format {
                OutputFormat::Text => out!("{}", comparison.render()),
                OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&comparison)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Rollback { storage, by, reason }) => {
            let row = bearwatch::learn::registry::rollback(&location(&storage)?, &by, reason.as_deref())?;
            outln!("champion: {} ({})", row.model, row.reason);
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce { brokers, topic, speed, max_gap, properties, file } => {
            let mut parsed = BTreeMap::new();
            for property in properties {
                let (key, value) = property
                    .split_once('=')
                    .ok_or_else(|| SourceError::KafkaConfig(format!("--property {property:?} is not KEY=VALUE")))?;
                let value = EnvString::expand(value).map_err(SourceError::KafkaConfig)?;
                parsed.insert(key.to_string(), value);
            }
            if let Err((setting, why)) = bearwatch::source::file::Pace::check(speed, max_gap) {
                anyhow::bail!("--{} {why}", setting.replace('_', "-"));
            }
            let produced = produce::produce(&brokers, &topic, &file, bearwatch::source::file::Pace::new(speed, max_gap), &parsed)?;
            eprintln!(
                "produced {} messages to {topic} in {:.1} s",
                produced.messages,
                produced.elapsed.as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Classify { input, model, strict, explain } => {
            let config = model.config();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let input: Box<dyn tokio::io::AsyncRead + Unpin> = match input.filter(|p| p.as_os_str() != "-") {
                    Some(path) => {
                        let unreadable = |reason: String| SourceError::File { path: path.display().to_string(), reason };
                        if path.is_dir() {
                            return Err(unreadable("is a directory, not a JSON-lines file".into()).into());
                        }
                        Box::new(tokio::fs::File::open(&path).await.map_err(|e| unreadable(e.to_string()))?)
                    }
                    None => Box::new(tokio::io::stdin()),
                };
                let classifier = Classifier::start(&config)?;
                let stdout = tokio::io::stdout();
                let reader = tokio::io::BufReader::new(input);
                let stats =
                    classify::classify_lines(&classifier, reader, stdout, config.max_queued, config.body_chars, explain).await?;
                tracing::info!(lines = stats.lines, errors = stats.errors, "classify done");
                Ok(if strict && stats.errors > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
            })
        }
        Command::Bench(BenchCommand::Classify(args)) => {
            let report = bearwatch::bench::classify::run(&args)?;
            outln!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::E2e(args)) => {
            outln!("{}", bearwatch::bench::e2e::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Alerts(args)) => {
            outln!("{}", bearwatch::bench::alerts::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Windows(args)) => {
            outln!("{}", bearwatch::bench::windows::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Sql(args)) => {
            outln!("{}", bearwatch::bench::sql::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Checkpoints(args)) => {
            outln!("{}", bearwatch::bench::checkpoints::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Instances(args)) => {
            outln!("{}", bearwatch::bench::instances::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Loop(args)) => {
            outln!("{}", bearwatch::bench::feedback_loop::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            // Into memory first: the generator panics on a closed stdout (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "bearwatch", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Detect(args)) => {
            let config = pipeline_config(args.pipeline.as_deref(), None)?;
            outln!("{}", bearwatch::bench::detect::run(&args, &config)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

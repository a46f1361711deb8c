use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bearwatch::classify::{self, Classifier, ClassifierConfig, Device};
use bearwatch::error::{Classified, ErrorClass};
use clap::{Args, Parser, Subcommand};

/// Watches financial news for bursts of negative sentiment.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scores JSON lines (news objects or {"text": …}) from a file or stdin; one scored line out per line in.
    Classify {
        /// Input file; stdin when absent or `-`.
        input: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Exit with status 1 if any line could not be scored.
        #[arg(long)]
        strict: bool,
    },
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Headlines/s and batch latency of the classifier against bare ONNX Runtime and a Python pipeline.
    Classify(bearwatch::classify::bench::BenchArgs),
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
    /// ONNX Runtime intra-op threads; 0 = one per core.
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
            threads: self.threads.unwrap_or(defaults.threads),
            max_length: self.max_length.unwrap_or(defaults.max_length),
            body_chars: self.body_chars.unwrap_or(defaults.body_chars),
            ..defaults
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEARWATCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let user_error = e
                .downcast_ref::<classify::ClassifyError>()
                .is_some_and(|e| e.class() == ErrorClass::User);
            ExitCode::from(if user_error { 2 } else { 1 })
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Classify { input, model, strict } => {
            let config = model.config();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let classifier = Classifier::start(&config)?;
                let stdout = tokio::io::stdout();
                let input: Box<dyn tokio::io::AsyncRead + Unpin> = match input.filter(|p| p.as_os_str() != "-") {
                    Some(path) => Box::new(
                        tokio::fs::File::open(&path)
                            .await
                            .with_context(|| format!("cannot open {}", path.display()))?,
                    ),
                    None => Box::new(tokio::io::stdin()),
                };
                let reader = tokio::io::BufReader::new(input);
                let stats =
                    classify::classify_lines(&classifier, reader, stdout, config.max_queued, config.body_chars).await?;
                tracing::info!(lines = stats.lines, errors = stats.errors, "classify done");
                Ok(if strict && stats.errors > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
            })
        }
        Command::Bench(BenchCommand::Classify(args)) => {
            let report = classify::bench::run(&args)?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

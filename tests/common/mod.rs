//! Helpers for end-to-end tests: running `bearwatch run` as a real process, reading the Parquet
//! tables back with DataFusion, and the real Kafka broker of `scripts/kafka.sh`.
#![allow(dead_code)] // each test binary uses a different subset

pub mod api;
pub mod pgwire;
pub mod servers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::util::display::array_value_to_string;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub const DEMO_DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/data/reuters-1987.jsonl");

/// Writes a review of stock splits to `file` as `feedback import` reads it: ten companies × each
/// of `ratios`, all labelled positive (the champion reads them as neutral or negative).
pub fn write_stock_split_review(file: &Path, ratios: &[&str]) {
    let companies = ["Midland", "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne", "Tyrell"];
    let lines: String = companies
        .iter()
        .flat_map(|c| {
            ratios.iter().map(move |r| serde_json::json!({"text": format!("{c} Corp sets {r} stock split"), "head": "sentiment", "label": "positive"}).to_string() + "\n")
        })
        .collect();
    std::fs::write(file, lines).unwrap();
}

/// A model's id as the tables record it: `name@version` of its labels.json.
pub fn model_id(labels: &serde_json::Value) -> String {
    format!("{}@{}", labels["name"].as_str().unwrap(), labels["version"].as_str().unwrap())
}

/// The bundled model's id (models/labels.json).
pub fn bundled_model() -> String {
    model_id(&serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/models/labels.json")).unwrap()).unwrap())
}

/// A `bearwatch run` child process with its output captured in files.
pub struct Pipeline {
    pub child: Child,
    pub storage: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Pipeline {
    /// Writes `config` to `<dir>/pipeline.toml` and starts `bearwatch run` on it, in `dir`.
    pub fn start(dir: &Path, name: &str, config: &str) -> Pipeline {
        Pipeline::start_with(dir, name, config, &[])
    }

    /// As [`Pipeline::start`], with more `bearwatch run` arguments (e.g. `--role classify`).
    pub fn start_with(dir: &Path, name: &str, config: &str, args: &[&str]) -> Pipeline {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, config).unwrap();
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
            .args(["run", "--pipeline"])
            .arg(&file)
            .args(args)
            .current_dir(dir)
            .env("BEARWATCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let storage = dir.join(storage_path(config));
        Pipeline { child, storage, stdout, stderr }
    }

    pub fn logs(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for exit; panics with the logs if it takes longer than `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("pipeline did not exit within {limit:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `check` holds for the checkpoint, or panics with the logs.
    pub fn wait_for_checkpoint(&mut self, limit: Duration, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(c) = checkpoint(&self.storage)
                && check(&c)
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("pipeline exited ({status}) before {what}\n{}", self.logs());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("timed out waiting for {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn storage_path(config: &str) -> String {
    let table: toml::Table = toml::from_str(config).unwrap();
    table["storage"]["path"].as_str().unwrap().to_string()
}

/// The shipped rule at p < 0.01 instead of 0.001, written to `dir/loose.toml`: on the demo's two
/// weeks it raises several alerts (the shipped one raises one), for tests that need a few.
/// Waits until every one of `members` has partitions of its consumer group, or panics with their logs.
pub fn wait_for_partitions(members: &[&Pipeline], limit: Duration) {
    let owns_partitions = |p: &Pipeline| std::fs::read_to_string(&p.stderr).unwrap_or_default().contains("partitions assigned partitions=[(");
    let deadline = Instant::now() + limit;
    while !members.iter().all(|p| owns_partitions(p)) {
        let logs: Vec<String> = members.iter().map(|p| p.logs()).collect();
        assert!(Instant::now() < deadline, "members never got partitions\n{}", logs.join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn loose_rules(dir: &Path) -> PathBuf {
    let shipped = std::fs::read_to_string(Path::new(ROOT).join("alerts/default.toml")).unwrap();
    let loose = shipped.replacen("p_value = 0.001 ", "p_value = 0.01 ", 1);
    assert_ne!(loose, shipped, "alerts/default.toml no longer says `p_value = 0.001 `");
    let path = dir.join("loose.toml");
    std::fs::write(&path, loose).unwrap();
    path
}

/// The value of sample `name` (with its labels as `/metrics` writes them) on the server at
/// 127.0.0.1:`port`; 0 while the server does not answer or has no such sample yet.
pub fn metric(port: u16, name: &str) -> u64 {
    let text = ureq::get(format!("http://127.0.0.1:{port}/metrics")).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok());
    text.unwrap_or_default().lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

/// The storage's checkpoint as JSON (joined from its pieces if it was written in pieces).
pub fn checkpoint(storage: &Path) -> Option<serde_json::Value> {
    let bytes = bearwatch::storage::checkpoint(&storage.into(), None).ok()??;
    serde_json::from_slice(&bytes).ok()
}

pub fn counter(checkpoint: &serde_json::Value, name: &str) -> u64 {
    checkpoint["counters"][name].as_u64().unwrap()
}

/// Runs `sql` over the Parquet tables under `storage` (each table that has files), rows as strings.
pub fn query(storage: &Path, sql: &str) -> Vec<Vec<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let ctx = SessionContext::new();
        for table in ["news", "windows", "late", "alerts", "notifications", "label_feedback", "alert_verdicts", "missed_events"] {
            let dir = storage.join(table);
            let has_parts = std::fs::read_dir(&dir)
                .map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "parquet")))
                .unwrap_or(false);
            if has_parts {
                ctx.register_parquet(table, dir.to_str().unwrap(), ParquetReadOptions::default()).await.unwrap();
            }
        }
        let batches = ctx.sql(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")).collect().await.unwrap();
        let mut rows = Vec::new();
        for batch in batches {
            for row in 0..batch.num_rows() {
                rows.push(batch.columns().iter().map(|c| array_value_to_string(c, row).unwrap()).collect());
            }
        }
        rows
    })
}

pub fn query_one(storage: &Path, sql: &str) -> String {
    let rows = query(storage, sql);
    assert_eq!(rows.len(), 1, "{sql} returned {rows:?}");
    rows[0][0].clone()
}

/// The newest row of every window (counts only grow, so that is the row with the largest `n`).
pub const LATEST_WINDOWS: &str = "SELECT window_start, topic, n, n_negative, n_neutral, n_positive, mean_sentiment \
     FROM (SELECT *, row_number() OVER (PARTITION BY window_start, topic, ticker ORDER BY n DESC, final DESC) AS rn FROM windows) \
     WHERE rn = 1 ORDER BY window_start, topic";

/// The first `n` stories of the bundled Reuters replay, as JSON lines.
pub fn stories(n: usize) -> String {
    let text = std::fs::read_to_string(DEMO_DATA).unwrap();
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// Creates `name` with `partitions` partitions on `brokers`.
pub fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    create_topic_with(brokers, name, partitions, &[]);
}

/// Creates `name` with `partitions` partitions and topic settings `configs` on `brokers`.
pub fn create_topic_with(brokers: &str, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let topic = configs.iter().fold(NewTopic::new(name, partitions, TopicReplication::Fixed(1)), |topic, (key, value)| topic.set(key, value));
    let results = runtime.block_on(admin.create_topics(&[topic], &AdminOptions::new())).unwrap();
    for result in results {
        result.unwrap();
    }
}

/// Sets topic settings `configs` of `name` on `brokers`.
pub fn alter_topic(brokers: &str, name: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let change = configs.iter().fold(AlterConfig::new(ResourceSpecifier::Topic(name)), |change, (key, value)| change.set(key, value));
    let results = runtime.block_on(admin.alter_configs(&[change], &AdminOptions::new())).unwrap();
    for result in results {
        result.unwrap();
    }
}

/// `bearwatch produce` of a JSON-lines file into `topic`.
pub fn produce_to(brokers: &str, topic: &str, file: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["produce", "--brokers", brokers, "--topic", topic]).arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A name no other test (or earlier run against the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The test broker: `BEARWATCH_TEST_BROKERS` if set, else the one `scripts/kafka.sh start` runs
/// (started now if needed; the script serializes concurrent callers).
pub fn brokers() -> &'static str {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS.get_or_init(|| {
        if let Ok(brokers) = std::env::var("BEARWATCH_TEST_BROKERS") {
            return brokers;
        }
        let out = Command::new("bash").arg(format!("{ROOT}/scripts/kafka.sh")).arg("start").output().unwrap();
        assert!(out.status.success(), "scripts/kafka.sh start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// A second broker (another cluster) on its own port and log dir, stopped when dropped.
pub struct Broker {
    port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let broker = Broker { port: servers::free_port(), dir: tempfile::tempdir().unwrap() };
        broker.run("start", false);
        broker
    }

    /// `scripts/kafka.sh COMMAND` for this broker; `keep_data` restarts on its log dir.
    pub fn run(&self, command: &str, keep_data: bool) {
        let out = Command::new("bash")
            .arg(format!("{ROOT}/scripts/kafka.sh"))
            .arg(command)
            .env("BEARWATCH_KAFKA_PORT", self.port.to_string())
            .env("BEARWATCH_KAFKA_DIR", self.dir.path())
            .env("BEARWATCH_KAFKA_KEEP_DATA", if keep_data { "1" } else { "0" })
            .output()
            .unwrap();
        assert!(out.status.success(), "kafka.sh {command}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.run("stop", false);
    }
}

/// The test broker's SASL_PLAINTEXT listener (`scripts/kafka.sh`: two ports above the plain one),
/// and the `[source.properties]` that log in to it.
pub fn sasl_brokers() -> (String, &'static str) {
    let (host, port) = brokers().rsplit_once(':').unwrap();
    let properties = "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"bearwatch\"\n\"sasl.password\" = \"bearwatch-secret\"\n";
    (format!("{host}:{}", port.parse::<u16>().unwrap() + 2), properties)
}

/// Row-by-row equality that reports only the first differences, not both tables. Counts and keys
/// must match exactly; fractional numbers to 1e-5, because ONNX Runtime's float results move in the
/// last bits with batch shape (a restart forms different batches), and one millionth in one story's
/// score shows up in a window's mean.
pub fn assert_same_rows(actual: &[Vec<String>], expected: &[Vec<String>], what: &str) {
    let same_cell = |a: &String, e: &String| {
        a == e
            || (a.contains('.') && e.contains('.'))
                && matches!((a.parse::<f64>(), e.parse::<f64>()), (Ok(x), Ok(y)) if (x - y).abs() <= 1e-5)
    };
    let differing: Vec<String> = actual
        .iter()
        .zip(expected)
        .enumerate()
        .filter(|(_, (a, e))| a.len() != e.len() || !a.iter().zip(e.iter()).all(|(x, y)| same_cell(x, y)))
        .take(5)
        .map(|(i, (a, e))| format!("row {i}: {a:?} != {e:?}"))
        .collect();
    assert!(
        differing.is_empty() && actual.len() == expected.len(),
        "{what}: {} rows vs {} expected; first differences:\n{}",
        actual.len(),
        expected.len(),
        differing.join("\n")
    );
}

/// Checks a `/metrics` text with Prometheus's own tools: `promtool check metrics` (its parser and
/// linter, built by scripts/go-tools.sh) must be silent, and Prometheus's Python client
/// (tests/metrics_check.py) must parse every metric of `bearwatch::telemetry::METRICS` but `absent`
/// with its type, help text and well-formed histogram buckets.
pub fn check_with_prometheus_tools(text: &str, absent: &[&str]) {
    use std::io::Write;
    let tool = Command::new("bash").arg(format!("{ROOT}/scripts/go-tools.sh")).arg("promtool").output().unwrap();
    assert!(tool.status.success(), "scripts/go-tools.sh promtool failed:\n{}", String::from_utf8_lossy(&tool.stderr));
    let promtool = String::from_utf8(tool.stdout).unwrap().trim().to_string();
    let run = |command: &mut Command| {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let lint = run(Command::new(&promtool).args(["check", "metrics"]));
    let complaints = format!("{}{}", String::from_utf8_lossy(&lint.stdout), String::from_utf8_lossy(&lint.stderr));
    assert!(lint.status.success() && complaints.trim().is_empty(), "promtool check metrics:\n{complaints}\n---\n{text}");

    let expected = bearwatch::telemetry::METRICS
        .iter()
        .filter(|(name, ..)| !absent.contains(name))
        .map(|(name, kind, ..)| format!("{name}={}", format!("{kind:?}").to_lowercase()));
    let parsed = run(Command::new(format!("{ROOT}/.venv/bin/python")).arg(format!("{ROOT}/tests/metrics_check.py")).args(expected));
    assert!(parsed.status.success(), "Prometheus's Python parser:\n{}{}", String::from_utf8_lossy(&parsed.stdout), String::from_utf8_lossy(&parsed.stderr));
}

/// Of a listing's keys, the parts that a merged part in the same folder holds
/// (`part-<first>-<last>.parquet` holds the parts numbered first..=last): what a plain glob would
/// read twice.
pub fn unmerged_inputs(keys: &[String]) -> Vec<String> {
    let span = |key: &str| -> Option<(String, u64, u64)> {
        let (folder, name) = key.rsplit_once('/')?;
        let digits = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        let (first, last) = digits.split_once('-').unwrap_or((digits, digits));
        Some((folder.to_string(), first.parse().ok()?, last.parse().ok()?))
    };
    let spans: Vec<(String, u64, u64)> = keys.iter().filter_map(|k| span(k)).collect();
    keys.iter()
        .filter(|k| {
            span(k).is_some_and(|(folder, first, last)| {
                spans.iter().any(|(f, a, b)| *f == folder && *a <= first && last <= *b && (*a, *b) != (first, last))
            })
        })
        .cloned()
        .collect()
}

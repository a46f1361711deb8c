//! Every Prometheus metric bearwatch exports, in one list (with its help text), and the per-stage
//! counters each component records. `/metrics` serves them; README's metrics table is checked
//! against [`METRICS`] by a test.
//!
//! Stages, in data-flow order: `source` (records read), `classify` (the model), `sink` (the scored
//! topic), `window`, `detect` (alert rules), `notify` (receivers); `producer` errors are failed Kafka
//! deliveries of any output (sink, dead letters, the alerts topic).

use metrics::{counter, describe_counter, describe_gauge, describe_histogram};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Name, kind, labels and help of every metric.
pub const METRICS: &[(&str, Kind, &str, &str)] = &[
    ("bearwatch_stage_received_total", Kind::Counter, "stage", "Items that entered a stage"),
    ("bearwatch_stage_sent_total", Kind::Counter, "stage", "Items a stage passed on"),
    ("bearwatch_stage_errors_total", Kind::Counter, "stage", "Failures inside a stage"),
    ("bearwatch_stage_dropped_total", Kind::Counter, "stage, reason", "Items a stage did not pass on, and why"),
    ("bearwatch_dead_letter_total", Kind::Counter, "kind", "Messages sent to the dead-letter output, by error kind"),
    ("bearwatch_window_late_total", Kind::Counter, "", "Stories behind the watermark (kept in table `late`)"),
    ("bearwatch_window_tickers_refused_total", Kind::Counter, "", "Per-ticker windows not opened because the bound on open windows was reached"),
    ("bearwatch_window_watermark_forced_total", Kind::Counter, "", "Times the watermark moved on by itself because 100,000 windows were open (a partition held event time back)"),
    ("bearwatch_source_paused", Kind::Gauge, "", "1 while reading waits because `max_queued` stories are in flight (back to 0 under half)"),
    ("bearwatch_kafka_consumer_lag", Kind::Gauge, "topic, partition", "Messages behind the high watermark, per assigned partition"),
    ("bearwatch_classify_queue_depth", Kind::Gauge, "", "Texts waiting for a batch"),
    ("bearwatch_classify_tokenize_seconds", Kind::Histogram, "", "Tokenizing one text"),
    ("bearwatch_classify_queue_wait_seconds", Kind::Histogram, "", "From submit to the start of the item's batch"),
    ("bearwatch_classify_batch_seconds", Kind::Histogram, "", "Model inference per batch"),
    ("bearwatch_classify_batch_size", Kind::Histogram, "", "Items per batch"),
    ("bearwatch_classify_batch_tokens", Kind::Histogram, "", "Padded tokens per batch"),
    ("bearwatch_windows_open", Kind::Gauge, "", "Windows not yet closed by the watermark"),
    ("bearwatch_alerts_firing", Kind::Gauge, "", "Alerts firing now"),
    ("bearwatch_alerts_total", Kind::Counter, "state", "Alert state changes (firing, resolved)"),
    ("bearwatch_rules_reloads_total", Kind::Counter, "outcome", "Reloads of the rule files (SIGHUP, POST /api/rules/reload): reloaded, or refused (the rules before stay in force)"),
    ("bearwatch_rules_last_reload_successful", Kind::Gauge, "", "0 while the last reload of the rule files was refused, else 1"),
    ("bearwatch_detect_groups_dropped_total", Kind::Counter, "", "Groups whose closed windows the detector dropped, past its bound on groups held"),
    ("bearwatch_alert_explain_seconds", Kind::Histogram, "", "Explaining the headlines of the alerts that fired in one round (one model call)"),
    ("bearwatch_alert_headlines_unexplained_total", Kind::Counter, "", "Alert headlines sent without their words: past the 100 a round explains"),
    ("bearwatch_notification_attempts_total", Kind::Counter, "receiver, outcome", "Delivery attempts by receiver and outcome (sent, failed)"),
    ("bearwatch_notifications_held_total", Kind::Counter, "receiver", "Notifications held back by the receiver's rate limit (summed up when its interval ends)"),
    ("bearwatch_feedback_rows_total", Kind::Counter, "table", "Rows people added to label_feedback, alert_verdicts or missed_events"),
    ("bearwatch_feedback_applied_total", Kind::Counter, "matched", "Stories that got an analyst's label, by how they matched (story, exact, near)"),
    ("bearwatch_feedback_memory_texts", Kind::Gauge, "", "Corrected texts the running pipeline remembers"),
    ("bearwatch_feedback_pending_texts", Kind::Gauge, "", "Judged texts whose stories are still being re-counted (2,000 stories a round)"),
    ("bearwatch_feedback_unreadable_files_total", Kind::Counter, "", "label_feedback files the pipeline could not read"),
    ("bearwatch_model_swaps_total", Kind::Counter, "outcome", "Switches to a newly promoted champion without a restart (swapped, failed)"),
    ("bearwatch_model_champion_unloadable", Kind::Gauge, "", "1 when the champion alias's folder could not load at start and an earlier model serves"),
    ("bearwatch_shadow_stories_total", Kind::Counter, "outcome", "Stories given to the challenger in shadow (scored, skipped while it lagged, failed)"),
    ("bearwatch_checkpoints_total", Kind::Counter, "", "Checkpoints written"),
    ("bearwatch_checkpoints_unchanged_total", Kind::Counter, "", "Checkpoints not written: no new rows and the same state as the last one"),
    ("bearwatch_http_connections_refused_total", Kind::Counter, "", "HTTP connections closed at once: 256 were open, each busy with a request"),
    ("bearwatch_http_connections_closed_idle_total", Kind::Counter, "", "HTTP connections idle the longest (between requests, or still sending a head or body), closed to make room for a new one when 256 were open"),
    ("bearwatch_postgres_connections_closed_total", Kind::Counter, "reason", "Postgres connections the server closed: too_many (64 were open and logged in), closed_logging_in (the one logging in the longest, to make room for a new one when 64 were open), message_too_large (over 1 MiB), malformed_message (fields running past the message's length), write_timeout (the client took no byte for 30 s)"),
    ("bearwatch_http_refused_total", Kind::Counter, "reason", "Requests refused before their token: origin (a foreign Host or Origin) or content_type (a write that is not JSON)"),
    ("bearwatch_checkpoint_seconds", Kind::Histogram, "", "Writing Parquet parts and the checkpoint"),
    ("bearwatch_checkpoint_written_bytes_total", Kind::Counter, "", "Bytes written for checkpoints: the file, and for a big state the pack of its changed pieces"),
    ("bearwatch_checkpoint_state_bytes", Kind::Gauge, "", "Size of the last checkpointed state as JSON (what a restart reads)"),
    ("bearwatch_storage_unavailable", Kind::Gauge, "", "1 while writes wait for the storage (object storage unreachable, a full disk); reading waits with them"),
    ("bearwatch_object_store_requests_total", Kind::Counter, "op", "Requests to object storage (an s3:// storage path) by operation: get, head, put, list, delete, rename"),
    ("bearwatch_object_store_errors_total", Kind::Counter, "op", "Object-storage requests that failed after the client's retries (not refused preconditions)"),
    ("bearwatch_object_store_request_seconds", Kind::Histogram, "op", "One object-storage request, its retries included"),
    ("bearwatch_storage_compactions_total", Kind::Counter, "", "Merges of a table's small Parquet parts into one (in the background, after checkpoints)"),
    ("bearwatch_storage_compacted_parts_total", Kind::Counter, "", "Parquet parts merged into bigger ones and deleted"),
    ("bearwatch_storage_compaction_errors_total", Kind::Counter, "", "Merges of parts or journal files that failed (tried again later; nothing is lost)"),
    ("bearwatch_storage_journal_merges_total", Kind::Counter, "", "Merges of a journal's files (analysts' labels, verdicts, missed events) by hour and by day"),
    ("bearwatch_storage_journal_files_merged_total", Kind::Counter, "", "Journal files deleted once a merge held their rows"),
    ("bearwatch_partitions_taken_over_total", Kind::Counter, "", "Partitions this instance took over from another instance's checkpoint (windows, alert state, offset)"),
];

/// Every (metric, stage) pair that is counted, and every (stage, reason) a stage drops for. They start
/// at 0, so that a rate over a counter that never moved reads 0 rather than "no data".
const STAGE_COUNTERS: [(&str, &[&str]); 3] = [
    ("bearwatch_stage_received_total", &["source", "classify", "window", "detect", "notify"]),
    ("bearwatch_stage_sent_total", &["source", "classify", "sink", "window", "detect", "notify"]),
    ("bearwatch_stage_errors_total", &["source", "classify", "producer", "notify"]),
];
const DROPS: [(&str, &str); 5] =
    [("source", "dead_letter"), ("source", "duplicate"), ("classify", "dead_letter"), ("classify", "abandoned"), ("notify", "silenced")];

/// Registers the help texts and zeroes the known series; called once the recorder is installed.
pub fn describe() {
    for (name, stages) in STAGE_COUNTERS {
        for stage in stages {
            counter!(name, "stage" => *stage).increment(0);
        }
    }
    for (stage, reason) in DROPS {
        dropped(stage, reason, 0);
    }
    for state in ["firing", "resolved"] {
        counter!("bearwatch_alerts_total", "state" => state).increment(0);
    }
    for outcome in ["swapped", "failed"] {
        counter!("bearwatch_model_swaps_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["scored", "skipped", "failed"] {
        counter!("bearwatch_shadow_stories_total", "outcome" => outcome).increment(0);
    }
    for reason in ["origin", "content_type"] {
        counter!("bearwatch_http_refused_total", "reason" => reason).increment(0);
    }
    for reason in ["too_many", "closed_logging_in", "message_too_large", "malformed_message", "write_timeout"] {
        counter!("bearwatch_postgres_connections_closed_total", "reason" => reason).increment(0);
    }
    for outcome in ["reloaded", "refused"] {
        counter!("bearwatch_rules_reloads_total", "outcome" => outcome).increment(0);
    }
    for matched in ["story", "exact", "near"] {
        counter!("bearwatch_feedback_applied_total", "matched" => matched).increment(0);
    }
    for name in ["bearwatch_window_late_total", "bearwatch_checkpoints_total", "bearwatch_checkpoints_unchanged_total", "bearwatch_checkpoint_written_bytes_total", "bearwatch_feedback_unreadable_files_total", "bearwatch_detect_groups_dropped_total", "bearwatch_alert_headlines_unexplained_total", "bearwatch_window_tickers_refused_total", "bearwatch_window_watermark_forced_total", "bearwatch_http_connections_refused_total", "bearwatch_http_connections_closed_idle_total", "bearwatch_partitions_taken_over_total", "bearwatch_storage_compactions_total", "bearwatch_storage_compacted_parts_total", "bearwatch_storage_compaction_errors_total", "bearwatch_storage_journal_merges_total", "bearwatch_storage_journal_files_merged_total"] {
        counter!(name).increment(0);
    }
    for name in [
        "bearwatch_source_paused",
        "bearwatch_classify_queue_depth",
        "bearwatch_windows_open",
        "bearwatch_alerts_firing",
        "bearwatch_feedback_memory_texts",
        "bearwatch_feedback_pending_texts",
        "bearwatch_model_champion_unloadable",
        "bearwatch_storage_unavailable",
        "bearwatch_checkpoint_state_bytes",
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    for (name, kind, _, help) in METRICS {
        match kind {
            Kind::Counter => describe_counter!(*name, *help),
            Kind::Gauge => describe_gauge!(*name, *help),
            Kind::Histogram if name.ends_with("_seconds") => describe_histogram!(*name, metrics::Unit::Seconds, *help),
            Kind::Histogram => describe_histogram!(*name, *help),
        }
    }
}

pub fn received(stage: &'static str, n: u64) {
    counter!("bearwatch_stage_received_total", "stage" => stage).increment(n);
}

pub fn sent(stage: &'static str, n: u64) {
    counter!("bearwatch_stage_sent_total", "stage" => stage).increment(n);
}

pub fn errors(stage: &'static str, n: u64) {
    counter!("bearwatch_stage_errors_total", "stage" => stage).increment(n);
}

pub fn dropped(stage: &'static str, reason: &'static str, n: u64) {
    counter!("bearwatch_stage_dropped_total", "stage" => stage, "reason" => reason).increment(n);
}

/// A line for people on stdout that a closed stdout cannot stop: `println!` panics when the reader
/// went away (`bearwatch run | head`), which ended a running pipeline. The line is dropped, the
/// work goes on, and the log on stderr still has everything. Written [`printable`].
pub fn say(text: std::fmt::Arguments) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{}", printable(&text.to_string()));
}

/// [`say`] without the newline.
pub fn say_part(text: std::fmt::Arguments) {
    use std::io::Write as _;
    let _ = write!(std::io::stdout().lock(), "{}", printable(&text.to_string()));
}

/// `text` on one line: a line break inside a headline would forge a line of a notice or a row of a
/// table printed around it.
pub fn one_line(text: &str) -> String {
    text.chars().map(|c| if matches!(c, '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}') { ' ' } else { c }).collect()
}

/// `text` as it may reach a terminal: control characters other than line feed and tab written as
/// `\u001b`-style escapes. Headlines come from the feed, and an escape sequence in one printed as
/// it is would be obeyed by the terminal showing it (recolour, hide or rewrite lines, set the
/// window title or the clipboard); tracing-subscriber escapes the log on stderr likewise. The form
/// is JSON's, so a JSON line printed here still reads as the same JSON.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars().map(|c| if escaped(c) { format!("\\u{:04x}", c as u32) } else { c.to_string() }).collect()
}

/// Repeats of a log line while its cause lasts: the first is logged, then at most one every
/// `every` (per line, digits aside), with how many were not. librdkafka hands over one error per
/// poll and per reconnect while the brokers are down, which logged some 30 lines a second.
pub struct Repeats {
    every: std::time::Duration,
    lines: std::sync::Mutex<std::collections::BTreeMap<String, (std::time::Instant, u64)>>,
}

/// Different lines [`Repeats`] keeps apart; past it, those not logged within `every` are forgotten.
const REPEATS_KEPT: usize = 64;

impl Repeats {
    pub const fn new(every: std::time::Duration) -> Repeats {
        Repeats { every, lines: std::sync::Mutex::new(std::collections::BTreeMap::new()) }
    }

    /// Whether to log `line` now: `Some(n)`, with the `n` repeats held back since it was last
    /// logged; `None` to hold this one back. Lines that differ only in their numbers (librdkafka's
    /// "584 identical error(s) suppressed", "after 0ms") are one line.
    pub fn admit(&self, line: &str) -> Option<u64> {
        self.admit_at(line, std::time::Instant::now())
    }

    fn admit_at(&self, line: &str, now: std::time::Instant) -> Option<u64> {
        let key: String = line.chars().take(300).map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
        let mut lines = crate::sync::lock(&self.lines);
        if lines.len() >= REPEATS_KEPT && !lines.contains_key(&key) {
            lines.retain(|_, (at, _)| now.duration_since(*at) < self.every);
            if lines.len() >= REPEATS_KEPT {
                lines.clear();
            }
        }
        match lines.get_mut(&key) {
            Some((at, held)) if now.duration_since(*at) < self.every => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                lines.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Half a minute between repeats: what a person reading the log needs to see that it goes on.
impl Default for Repeats {
    fn default() -> Repeats {
        Repeats::new(std::time::Duration::from_secs(30))
    }
}

/// What a line [`Repeats`] let through adds: how many like it were held back before it.
pub fn held_back(n: u64) -> String {
    if n == 0 { String::new() } else { format!(" ({n} more like it since the last one logged)") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_has_no_controls_and_json_stays_the_same_json() {
        let text = "a\u{1b}[31mb\u{7f}c\u{85}d\re\nf\tg";
        assert_eq!(printable(text), "a\\u001b[31mb\\u007fc\\u0085d\\u000de\nf\tg");
        assert!(matches!(printable("plain\ttext\n"), std::borrow::Cow::Borrowed(_)));
        // serde_json leaves DEL and C1 controls as they are; escaped here, the line is the same JSON.
        let json = serde_json::to_string(&text).unwrap();
        assert_eq!(serde_json::from_str::<String>(&printable(&json)).unwrap(), text);
        assert_eq!(one_line("a\r\nb\u{2028}c\td"), "a  b c\td");
    }

    #[test]
    fn a_repeating_line_is_let_through_once_per_interval_with_the_count_held_back() {
        let repeats = Repeats::new(std::time::Duration::from_secs(30));
        let start = std::time::Instant::now();
        let at = |s: u64| start + std::time::Duration::from_secs(s);
        assert_eq!(repeats.admit_at("AllBrokersDown: 1/1 brokers are down", at(0)), Some(0));
        assert_eq!(repeats.admit_at("AllBrokersDown: 1/1 brokers are down", at(1)), None);
        assert_eq!(repeats.admit_at("AllBrokersDown: 0/1 brokers are down", at(29)), None, "numbers aside, the same line");
        assert_eq!(repeats.admit_at("Authentication failed", at(29)), Some(0), "another line has its own count");
        assert_eq!(repeats.admit_at("AllBrokersDown: 1/1 brokers are down", at(30)), Some(2));
        assert_eq!(repeats.admit_at("AllBrokersDown: 1/1 brokers are down", at(31)), None);
        // Ever new lines (no digits to fold) keep the memory bounded and are each let through.
        for i in 0..10 * REPEATS_KEPT {
            let line: String = format!("{i:x}").chars().map(|c| (b'g' + c.to_digit(16).unwrap() as u8) as char).collect();
            assert_eq!(repeats.admit_at(&line, at(40)), Some(0));
        }
        assert!(crate::sync::lock(&repeats.lines).len() <= REPEATS_KEPT);
        assert_eq!(held_back(0), "");
        assert_eq!(held_back(3), " (3 more like it since the last one logged)");
    }
}

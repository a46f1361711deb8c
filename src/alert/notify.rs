//! Notifiers (email, webhook, Kafka, Alertmanager) and the thread that delivers the outbox with retries.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{Message, SmtpTransport, Transport};

use super::outbox::{Entry, Outbox, Status};
use super::silences::Silences;
use super::{ReceiverConfig, ReceiverKind, SmtpTls, headline_line, render_text};
use crate::config::EnvString;
use crate::detect::{Alert, AlertState};
use crate::source::kafka::{Output, output_connection};
use crate::sync::lock;

/// Sends one notification; the error text goes into the outbox and the `notifications` table.
pub trait Notify: Send {
    fn send(&mut self, alert: &Alert, key: &str) -> Result<(), String>;
}

pub struct Webhook {
    url: String,
    slack: bool,
    /// `bearer_token` or `username`/`password`, as the `Authorization` header.
    authorization: Option<String>,
    agent: ureq::Agent,
}

impl Notify for Webhook {
    fn send(&mut self, alert: &Alert, key: &str) -> Result<(), String> {
        let body = if self.slack {
            serde_json::json!({ "text": slack_escape(&render_text(alert)) })
        } else {
            serde_json::to_value(alert).map_err(|e| e.to_string())?
        };
        let mut request = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request
            // Receivers can drop a repeat after a crash between sending and recording it.
            .header("Idempotency-Key", key)
            .send(body.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        if response.status().is_success() { Ok(()) } else { Err(refusal(response)) }
    }
}

/// Why a notice was not taken, from a response that is not 2xx. A redirect is one: HTTP clients
/// follow 301, 302 and 303 with a GET that has no body (as curl does), so a POST redirected
/// from http:// to https:// would have been "delivered" to a page and the alert lost. Otherwise
/// the start of the answer's body, where receivers say why (Slack's `no_service`, a validation
/// error), as Alertmanager's errors show it.
fn refusal(mut response: ureq::http::Response<ureq::Body>) -> String {
    let status = response.status();
    if let Some(location) = response.headers().get("location").filter(|_| status.is_redirection()) {
        return format!(
            "HTTP {status}: redirected to {}; notices are not sent on to a redirect, set the receiver's url to where it points",
            String::from_utf8_lossy(location.as_bytes())
        );
    }
    let mut said = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(response.body_mut().as_reader(), REFUSAL_BYTES as u64), &mut said);
    let said: String = String::from_utf8_lossy(&said).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match said.split_whitespace().collect::<Vec<_>>().join(" ") {
        said if said.is_empty() => format!("HTTP {status}"),
        said => format!("HTTP {status}: {said}"),
    }
}

/// How much of a refusal's body goes into the error (`notifications.last_error`).
const REFUSAL_BYTES: usize = 300;

/// Text as Slack's `text` field must carry it: `&`, `<` and `>` escaped, so that a headline holding
/// `<!channel>` or `<http://x|click>` is shown as written, never as a mention or a link.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub struct Email {
    transport: SmtpTransport,
    from: Mailbox,
    to: Vec<Mailbox>,
}

impl Notify for Email {
    fn send(&mut self, alert: &Alert, key: &str) -> Result<(), String> {
        let state = alert.state.as_str().to_uppercase();
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(format!("[{state}] {}: {}", alert.rule, alert.summary))
            // The same key gives the same Message-ID, so mail clients fold a repeat into one.
            .message_id(Some(format!("<{key}@bearwatch>")));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let message = builder
            .multipart(MultiPart::alternative_plain_html(render_text(alert), render_html(alert)))
            .map_err(|e| e.to_string())?;
        self.transport.send(&message).map(|_| ()).map_err(|e| e.to_string())
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The headline with the words that explain its negativity in bold.
fn marked_html(headline: &crate::window::Headline) -> String {
    let strong: Vec<usize> = headline.why.iter().map(|w| w.position).collect();
    let words: Vec<String> = headline
        .headline
        .split_whitespace()
        .enumerate()
        .map(|(i, word)| if strong.contains(&i) { format!("<b>{}</b>", escape(word)) } else { escape(word) })
        .collect();
    words.join(" ")
}

fn render_html(alert: &Alert) -> String {
    let rows: String = alert
        .top_headlines
        .iter()
        .map(|h| format!("<tr><td>{:.2}</td><td>{}</td><td>{}</td></tr>", h.p_negative, marked_html(h), escape(&h.id)))
        .collect();
    format!(
        "<html><body><h3>{} ({})</h3><p>{}</p><table><tr><th>p_negative</th><th>headline</th><th>id</th></tr>{rows}</table>\
         <p>alert_id {} &middot; window {} to {}</p></body></html>",
        escape(&alert.rule),
        alert.severity.as_str(),
        escape(&alert.summary),
        alert.alert_id,
        alert.window_start,
        alert.window_end
    )
}

pub struct KafkaAlerts {
    output: Arc<Output>,
    topic: String,
}

impl Notify for KafkaAlerts {
    fn send(&mut self, alert: &Alert, _key: &str) -> Result<(), String> {
        let json = serde_json::to_vec(alert).map_err(|e| e.to_string())?;
        self.output.send(&self.topic, alert.alert_id.as_bytes(), &json, None).map_err(|e| e.to_string())?;
        // Only this alert is in flight: a failed flush is its failure, and the next send starts clean.
        self.output.flush(Duration::from_secs(30)).map_err(|e| e.to_string())
    }
}

/// Prometheus Alertmanager: every alert goes to each URL (Alertmanagers of an HA pair deduplicate
/// among themselves); a send counts when one of them took it, and the others catch up at the next
/// re-send.
pub struct Alertmanager {
    urls: Vec<String>,
    authorization: Option<String>,
    /// A firing alert stays valid this long after each post (4 × `resend_every`, as Prometheus does).
    valid_for: chrono::Duration,
    dashboard: Option<String>,
    agent: ureq::Agent,
}

impl Alertmanager {
    /// The alert as Alertmanager's `postableAlert`.
    fn postable(&self, alert: &Alert, now: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
        let mut labels: BTreeMap<String, String> = alert.labels.clone();
        labels.extend(alert.group.clone());
        labels.insert("alertname".into(), alert.rule.clone());
        labels.insert("severity".into(), alert.severity.as_str().into());
        // Alertmanager refuses an empty name and drops empty values; leave both out.
        labels.retain(|k, v| !k.is_empty() && !v.is_empty());
        let mut annotations = BTreeMap::from([
            ("summary".to_string(), alert.summary.clone()),
            ("description".to_string(), describe(alert)),
            ("alert_id".to_string(), alert.alert_id.clone()),
        ]);
        let mut body = serde_json::json!({ "labels": labels });
        if let Some(base) = &self.dashboard {
            annotations.insert("dashboard".into(), format!("{base}/?alert={}", alert.alert_id));
            let topic = alert.group.get("topic").map(|t| format!("&topic={t}")).unwrap_or_default();
            body["generatorURL"] = format!("{base}/?rule={}{topic}", alert.rule).into();
        }
        body["annotations"] = serde_json::json!(annotations);
        // Event times ahead of the clock (stories dated up to `max_clock_skew` ahead) would make
        // Alertmanager refuse the alert (start after end) or keep it firing: neither is after now.
        let instant = |t: Option<&str>| t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map_or(now, |t| t.with_timezone(&chrono::Utc).min(now));
        let starts = instant(Some(&alert.started_at));
        let ends = match alert.state {
            AlertState::Firing => now + self.valid_for,
            AlertState::Resolved => instant(alert.resolved_at.as_deref()).max(starts),
        };
        let format = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        body["startsAt"] = format(starts).into();
        body["endsAt"] = format(ends).into();
        body
    }
}

/// The `description` annotation: the numbers and the headlines behind them, as plain text.
fn describe(alert: &Alert) -> String {
    let baseline = alert.baseline.map_or("none".to_string(), |b| format!("{b:.3}"));
    let mut text = format!(
        "value {:.3} (threshold {:.3}, baseline {baseline}) over {} stories, window {} to {}",
        alert.value, alert.threshold, alert.count, alert.window_start, alert.window_end
    );
    for h in &alert.top_headlines {
        text.push_str("\n- ");
        text.push_str(&headline_line(h));
    }
    text
}

impl Notify for Alertmanager {
    fn send(&mut self, alert: &Alert, _key: &str) -> Result<(), String> {
        // Alertmanager deduplicates by label set: a repeat after a crash is harmless.
        let body = serde_json::json!([self.postable(alert, chrono::Utc::now())]).to_string();
        let mut errors = Vec::new();
        for url in &self.urls {
            let mut request = self.agent.post(format!("{url}/api/v2/alerts")).header("Content-Type", "application/json");
            if let Some(authorization) = &self.authorization {
                request = request.header("Authorization", authorization);
            }
            match request.send(body.as_bytes()) {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => errors.push(format!("{url}: {}", refusal(response))),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        if errors.len() == self.urls.len() {
            return Err(errors.join("; "));
        }
        for error in errors {
            tracing::warn!(alert_id = %alert.alert_id, %error, "one Alertmanager did not take the alert; it gets the next re-send");
        }
        Ok(())
    }
}

/// An HTTP client whose every request, connection included, ends within `timeout`, and which
/// follows no redirect ([`refusal`]).
fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).max_redirects(0).build().into()
}

/// Builds the notifier of one receiver (not for `log`, which prints on the spot).
/// `source_kafka` is the source's brokers and properties, for a kafka receiver that names no
/// brokers; `default_dashboard` is the dashboard's address when the receiver names none (from
/// `[server]`).
pub fn notifier(
    config: &ReceiverConfig,
    source_kafka: Option<(&str, &BTreeMap<String, EnvString>)>,
    default_dashboard: Option<&str>,
) -> Result<Box<dyn Notify>, String> {
    let timeout = config.timeout.0;
    match config.kind {
        ReceiverKind::Log => Err("the log receiver has no notifier".into()),
        ReceiverKind::Webhook => {
            let url = config.url.as_ref().map(|u| u.as_str().to_string()).unwrap_or_default();
            Ok(Box::new(Webhook { url, slack: config.slack, authorization: config.authorization(), agent: http_agent(timeout) }))
        }
        ReceiverKind::Alertmanager => {
            let urls = config.url.iter().chain(&config.urls).map(|u| u.as_str().trim_end_matches('/').to_string()).collect();
            let authorization = config.authorization();
            let valid_for = chrono::Duration::milliseconds(4 * config.resend_every.as_millis());
            let dashboard = config.dashboard_url.as_ref().map(|u| u.as_str()).or(default_dashboard).map(|u| u.trim_end_matches('/').to_string());
            Ok(Box::new(Alertmanager { urls, authorization, valid_for, dashboard, agent: http_agent(timeout) }))
        }
        ReceiverKind::Email => {
            let host = config.smtp_host.as_deref().unwrap_or_default();
            let builder = match config.tls {
                SmtpTls::None => SmtpTransport::builder_dangerous(host),
                SmtpTls::Starttls => SmtpTransport::starttls_relay(host).map_err(|e| e.to_string())?,
                SmtpTls::Tls => SmtpTransport::relay(host).map_err(|e| e.to_string())?,
            };
            let mut builder = builder.timeout(Some(timeout));
            if let Some(port) = config.smtp_port {
                builder = builder.port(port);
            }
            if let Some(user) = &config.username {
                let password = config.password.as_ref().map(|p| p.as_str().to_string()).unwrap_or_default();
                builder = builder.credentials(Credentials::new(user.as_str().to_string(), password));
            }
            let mailbox = |text: &str| text.parse::<Mailbox>().map_err(|e| format!("bad address {text:?}: {e}"));
            let from = mailbox(config.from.as_deref().unwrap_or_default())?;
            let to = config.to.iter().map(|t| mailbox(t)).collect::<Result<_, _>>()?;
            Ok(Box::new(Email { transport: builder.build(), from, to }))
        }
        ReceiverKind::Kafka => {
            let (brokers, properties) =
                output_connection(config.brokers.as_ref(), &config.properties, source_kafka).ok_or("no brokers for the kafka receiver")?;
            let output = Output::connect(&brokers, &properties).map_err(|e| e.to_string())?;
            Ok(Box::new(KafkaAlerts { output: Arc::new(output), topic: config.topic.clone().unwrap_or_default() }))
        }
    }
}

/// A notification to record in the outbox: idempotency key, receiver, the alert, when it is due,
/// when it expires, and its reminder interval (0: none).
#[derive(Debug, Clone)]
pub struct Queued {
    pub key: String,
    pub receiver: String,
    pub alert: Alert,
    pub due_ms: i64,
    pub expires_ms: i64,
    pub repeat_ms: i64,
}

/// A status change of one notification: a row of table `notifications`.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRow {
    pub key: String,
    pub alert_id: String,
    pub state: String,
    pub receiver: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub sent_ms: Option<i64>,
    pub recorded_ms: i64,
}

fn row(outbox: &Outbox, key: &str) -> Option<NotificationRow> {
    let e = outbox.get(key)?;
    Some(NotificationRow {
        key: e.key.clone(),
        alert_id: e.alert.alert_id.clone(),
        state: e.alert.state.as_str().into(),
        receiver: e.receiver.clone(),
        status: e.status.as_str().into(),
        attempts: e.attempts,
        last_error: e.last_error.clone(),
        sent_ms: e.sent_ms,
        recorded_ms: chrono::Utc::now().timestamp_millis(),
    })
}

/// Delay before retry number `attempts` (1-based): 0.5 s doubling up to a minute.
fn backoff_ms(attempts: u32) -> i64 {
    (500i64 << attempts.saturating_sub(1).min(7)).min(60_000)
}

struct Shared {
    outbox: Mutex<Outbox>,
    rows: Mutex<Vec<NotificationRow>>,
    stop: AtomicBool,
    /// Set by `enqueue` (and stop) so the thread delivers at once instead of at its next 100 ms tick.
    woken: Mutex<bool>,
    wake: Condvar,
    /// Receivers read again from the pipeline file, which the thread sends to from its next turn.
    replacement: Mutex<Option<Senders>>,
    /// Checked again when a notice falls due: a silence set since it was queued mutes it too.
    silences: Silences,
}

impl Shared {
    fn wake(&self) {
        *lock(&self.woken) = true;
        self.wake.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let mut woken = lock(&self.woken);
        if !*woken {
            woken = self.wake.wait_timeout(woken, timeout).unwrap_or_else(|p| p.into_inner()).0;
        }
        *woken = false;
    }
}

/// Delivers the outbox on its own thread, so a slow SMTP server never holds up the pipeline.
pub struct Notifier {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    pub fn start(outbox: Outbox, mut notifiers: Senders, silences: Silences) -> Notifier {
        let shared = Arc::new(Shared {
            outbox: Mutex::new(outbox),
            rows: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            woken: Mutex::new(false),
            wake: Condvar::new(),
            replacement: Mutex::new(None),
            silences,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("notifier".into())
            .spawn(move || {
                drop_unknown(&worker, &notifiers);
                while !worker.stop.load(Ordering::SeqCst) {
                    if let Some(replacement) = lock(&worker.replacement).take() {
                        notifiers = replacement;
                        drop_unknown(&worker, &notifiers);
                    }
                    deliver_due(&worker, &mut notifiers);
                    // Retries and reminders fall due with time, so wake at least every 100 ms.
                    worker.wait(Duration::from_millis(100));
                }
            })
            .expect("spawn the notifier thread");
        Notifier { shared, thread: Some(thread) }
    }

    /// Sends through `senders` from the thread's next turn on; pending notices for a receiver not
    /// among them are dropped then.
    pub fn replace_senders(&self, senders: Senders) {
        *lock(&self.shared.replacement) = Some(senders);
        self.shared.wake();
    }

    /// Records notifications durably; they are sent from the outbox by the notifier thread.
    pub fn enqueue(&self, items: Vec<Queued>) -> Result<(), super::AlertError> {
        let mut outbox = lock(&self.shared.outbox);
        for Queued { key, receiver, alert, due_ms, expires_ms, repeat_ms } in items {
            if outbox.enqueue(key.clone(), receiver.clone(), alert, due_ms, expires_ms, repeat_ms)? {
                lock(&self.shared.rows).extend(row(&outbox, &key));
            }
        }
        drop(outbox);
        self.shared.wake();
        Ok(())
    }

    /// Ends the reminders (and Alertmanager re-sends) of alerts that have resolved, at every
    /// receiver, whether or not it is told of the resolve (`send_resolved = false`).
    pub fn end_reminders(&self, alert_ids: &[String]) -> Result<(), super::AlertError> {
        if alert_ids.is_empty() {
            return Ok(());
        }
        let mut outbox = lock(&self.shared.outbox);
        let moot: Vec<String> = outbox
            .pending()
            .filter(|e| e.key.contains('#') && e.alert.state == AlertState::Firing && alert_ids.contains(&e.alert.alert_id))
            .map(|e| e.key.clone())
            .collect();
        for key in moot {
            outbox.drop_entry(&key, chrono::Utc::now().timestamp_millis(), "alert resolved".into())?;
            lock(&self.shared.rows).extend(row(&outbox, &key));
        }
        Ok(())
    }

    /// Status changes since the last call, for the `notifications` table.
    pub fn take_rows(&self) -> Vec<NotificationRow> {
        std::mem::take(&mut *lock(&self.shared.rows))
    }

    /// Waits until nothing due before `deadline` is pending; returns how many remain pending.
    pub fn settle(&self, deadline: Instant) -> usize {
        loop {
            let now = chrono::Utc::now().timestamp_millis();
            let left = deadline.saturating_duration_since(Instant::now()).as_millis() as i64;
            let (pending, due_soon) = {
                let outbox = lock(&self.shared.outbox);
                let pending: Vec<i64> = outbox.pending().filter(|e| e.repeat_ms == 0 || !e.key.contains('#')).map(|e| e.next_ms).collect();
                (pending.len(), pending.iter().any(|next| *next <= now + left))
            };
            if !due_soon || Instant::now() >= deadline {
                return pending;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Each receiver's sender, by name.
pub type Senders = BTreeMap<String, Box<dyn Notify>>;

/// Drops the pending notices of receivers the pipeline no longer has (a restart or a reload with
/// the receiver taken out): nothing could ever send them, and retrying them for a day only logs.
fn drop_unknown(shared: &Shared, notifiers: &Senders) {
    let mut outbox = lock(&shared.outbox);
    let orphans: Vec<(String, String)> =
        outbox.pending().filter(|e| !notifiers.contains_key(&e.receiver)).map(|e| (e.key.clone(), e.receiver.clone())).collect();
    let now = chrono::Utc::now().timestamp_millis();
    let mut per_receiver: BTreeMap<String, u64> = BTreeMap::new();
    for (key, receiver) in orphans {
        crate::telemetry::dropped("notify", "no_receiver", 1);
        if let Err(e) = outbox.drop_entry(&key, now, receiver_gone(&receiver)) {
            tracing::error!(error = %e, "cannot write the outbox");
        }
        lock(&shared.rows).extend(row(&outbox, &key));
        *per_receiver.entry(receiver).or_default() += 1;
    }
    for (receiver, dropped) in per_receiver {
        tracing::warn!(receiver, dropped, "pending notifications dropped: the pipeline has no receiver of that name now");
    }
}

fn receiver_gone(receiver: &str) -> String {
    format!("receiver `{receiver}` is no longer in the pipeline")
}

fn deliver_due(shared: &Shared, notifiers: &mut Senders) {
    let now = chrono::Utc::now().timestamp_millis();
    let due = lock(&shared.outbox).due(now);
    for key in due {
        let Some(entry) = lock(&shared.outbox).get(&key).cloned() else { continue };
        let now = chrono::Utc::now().timestamp_millis();
        // Sent without the outbox locked; what came of it is recorded under one lock with its row,
        // so that `settle` never sees the entry done before the `notifications` row is there.
        enum Outcome {
            Expired,
            /// Queued just before a reload took its receiver out.
            ReceiverGone,
            /// Muted by a silence that lasts until then.
            Silenced(chrono::DateTime<chrono::Utc>),
            Tried(Result<(), String>),
        }
        let outcome = if now > entry.expires_ms {
            Outcome::Expired
        } else if let Some(until) = shared.silences.mute_until(&entry.alert.match_labels(), chrono::Utc::now()) {
            Outcome::Silenced(until)
        } else if let Some(notifier) = notifiers.get_mut(&entry.receiver) {
            let _span = tracing::info_span!("notify", receiver = %entry.receiver, alert_id = %entry.alert.alert_id).entered();
            Outcome::Tried(notifier.send(&entry.alert, &key))
        } else {
            Outcome::ReceiverGone
        };
        let mut outbox = lock(&shared.outbox);
        // The alert resolved while this notice was on its way: its chain of reminders ends here.
        let ended = outbox.get(&key).is_some_and(|e| e.status == Status::Dropped);
        let result = match outcome {
            Outcome::Expired => outbox.drop_entry(&key, now, format!("expired after {} attempts", entry.attempts)),
            Outcome::ReceiverGone => {
                crate::telemetry::dropped("notify", "no_receiver", 1);
                outbox.drop_entry(&key, now, receiver_gone(&entry.receiver))
            }
            Outcome::Silenced(until) => {
                crate::telemetry::dropped("notify", "silenced", 1);
                tracing::info!(receiver = %entry.receiver, alert_id = %entry.alert.alert_id, until = %until.to_rfc3339(), "notification silenced");
                if ended {
                    Ok(())
                } else {
                    let dropped = outbox.drop_entry(&key, now, format!("silenced until {}", until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
                    // A firing alert is told of once the silence ends if it still fires then (or
                    // at its next reminder, if that comes first): its resolve ends the chain before.
                    if dropped.is_ok() && entry.alert.state == AlertState::Firing {
                        // The first millisecond after the silence.
                        let after = (until.timestamp_millis() + 1).max(now);
                        let due = if entry.repeat_ms > 0 { after.min(now + entry.repeat_ms) } else { after };
                        queue_next(shared, &mut outbox, &key, &entry, now, due);
                    }
                    dropped
                }
            }
            Outcome::Tried(Ok(())) => {
                metrics::counter!("bearwatch_notification_attempts_total", "receiver" => entry.receiver.clone(), "outcome" => "sent").increment(1);
                crate::telemetry::sent("notify", 1);
                tracing::info!(receiver = %entry.receiver, alert_id = %entry.alert.alert_id, "notification sent");
                let sent = outbox.sent(&key, now);
                // A firing alert is repeated every repeat interval until it resolves.
                if sent.is_ok() && !ended && entry.alert.state == AlertState::Firing && entry.repeat_ms > 0 {
                    queue_next(shared, &mut outbox, &key, &entry, now, now + entry.repeat_ms);
                }
                sent
            }
            Outcome::Tried(Err(error)) => {
                metrics::counter!("bearwatch_notification_attempts_total", "receiver" => entry.receiver.clone(), "outcome" => "failed").increment(1);
                crate::telemetry::errors("notify", 1);
                tracing::warn!(receiver = %entry.receiver, alert_id = %entry.alert.alert_id, attempt = entry.attempts + 1, %error, "notification failed; will retry");
                outbox.failed(&key, now, error, now + backoff_ms(entry.attempts + 1))
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write the outbox");
        }
        if outbox.get(&key).is_some_and(|e| e.status != Status::Pending || e.attempts > 0) {
            lock(&shared.rows).extend(row(&outbox, &key));
        }
        if let Err(e) = outbox.compact_when_due() {
            tracing::error!(error = %e, "cannot compact the outbox");
        }
    }
}

/// Queues the next notice of `key`'s chain (`<key>#<n + 1>`), due at `due`, its expiry moved on
/// as far as its due time.
fn queue_next(shared: &Shared, outbox: &mut Outbox, key: &str, entry: &Entry, now: i64, due: i64) {
    let (base, n) = key.split_once('#').map_or((key, 0), |(b, n)| (b, n.parse::<u32>().unwrap_or(0)));
    let next = format!("{base}#{}", n + 1);
    let queued = outbox.enqueue(next.clone(), entry.receiver.clone(), entry.alert.clone(), due, entry.expires_ms + (due - now), entry.repeat_ms);
    if queued.is_ok_and(|q| q) {
        lock(&shared.rows).extend(row(outbox, &next));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::detect::rules::{Severity, Silence};

    /// Records what it was asked to send.
    struct Recorder(Arc<Mutex<Vec<(String, AlertState)>>>);

    impl Notify for Recorder {
        fn send(&mut self, alert: &Alert, key: &str) -> Result<(), String> {
            lock(&self.0).push((key.to_string(), alert.state));
            Ok(())
        }
    }

    /// A small alert of rule `r`, for the outbox's tests too.
    pub(crate) fn alert(state: AlertState) -> Alert {
        Alert {
            alert_id: "a1".into(),
            rule: "r".into(),
            severity: Severity::Warning,
            state,
            group: BTreeMap::new(),
            labels: BTreeMap::new(),
            started_at: String::new(),
            resolved_at: None,
            window_start: String::new(),
            window_end: String::new(),
            value: 1.0,
            baseline: None,
            threshold: 0.5,
            count: 3,
            summary: String::new(),
            top_headlines: vec![],
        }
    }

    #[test]
    fn slack_text_carries_no_mentions_or_links_from_headlines() {
        let mut firing = alert(AlertState::Firing);
        firing.top_headlines = vec![crate::window::Headline {
            id: "s1".into(),
            headline: "<!channel> AT&T <http://x|click> falls".into(),
            p_negative: 0.9,
            why: vec![],
        }];
        let text = slack_escape(&render_text(&firing));
        assert!(text.contains("&lt;!channel&gt; AT&amp;T &lt;http://x|click&gt; falls"), "{text}");
        assert!(!text.contains('<') && !text.contains('>'));
    }

    /// Waits (up to 30 s) until `done` holds.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A receiver taken out of the pipeline (at a restart, or a reload) has nothing to send its
    /// pending notices: they are dropped with the reason, and the receivers in force send theirs.
    #[test]
    fn notices_of_receivers_gone_are_dropped_and_replaced_senders_send() {
        let dir = tempfile::tempdir().unwrap();
        let (sent_r, sent_s) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let mut outbox = Outbox::open(&dir.path().join("outbox.jsonl")).unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let hour = 3_600_000;
        outbox.enqueue("a1/firing/gone".into(), "gone".into(), alert(AlertState::Firing), now, now + hour, 0).unwrap();
        // Due in an hour: still pending when the senders are replaced.
        outbox.enqueue("a1/firing/r".into(), "r".into(), alert(AlertState::Firing), now + hour, now + 2 * hour, 0).unwrap();
        let notifier = Notifier::start(outbox, Senders::from([("r".to_string(), Box::new(Recorder(sent_r.clone())) as Box<dyn Notify>)]), Silences::default());
        let status = |key: &str| lock(&notifier.shared.outbox).get(key).map(|e| (e.status, e.last_error.clone()));
        eventually("the notice of a receiver gone was not dropped", || status("a1/firing/gone").is_some_and(|(s, _)| s == Status::Dropped));
        assert_eq!(status("a1/firing/r").map(|(s, _)| s), Some(Status::Pending));

        notifier.replace_senders(Senders::from([("s".to_string(), Box::new(Recorder(sent_s.clone())) as Box<dyn Notify>)]));
        eventually("r's notice was not dropped after the replacement", || status("a1/firing/r").is_some_and(|(s, _)| s == Status::Dropped));
        notifier.enqueue(vec![Queued { key: "a1/firing/s".into(), receiver: "s".into(), alert: alert(AlertState::Firing), due_ms: now, expires_ms: now + hour, repeat_ms: 0 }]).unwrap();
        eventually("the new receiver did not send", || !lock(&sent_s).is_empty());
        assert!(lock(&sent_r).is_empty(), "nothing went to the receiver taken out");
        let rows = notifier.take_rows();
        let dropped: Vec<&NotificationRow> = rows.iter().filter(|r| r.status == "dropped").collect();
        assert_eq!(dropped.len(), 2, "{rows:?}");
        assert!(dropped.iter().any(|r| r.last_error.as_deref() == Some("receiver `gone` is no longer in the pipeline")), "{rows:?}");
    }

    #[test]
    fn group_wait_delays_repeat_interval_reminds_until_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let outbox = Outbox::open(&dir.path().join("outbox.jsonl")).unwrap();
        let notifier = Notifier::start(outbox, BTreeMap::from([("r".to_string(), Box::new(Recorder(sent.clone())) as Box<dyn Notify>)]), Silences::default());
        let now = chrono::Utc::now().timestamp_millis();
        // Due in 400 ms (group_wait), then a reminder every 300 ms.
        let queued = |key: &str, state, due_ms, repeat_ms| Queued {
            key: key.into(),
            receiver: "r".into(),
            alert: alert(state),
            due_ms,
            expires_ms: due_ms + 60_000,
            repeat_ms,
        };
        notifier.enqueue(vec![queued("a1/firing/r", AlertState::Firing, now + 400, 300)]).unwrap();
        // Judged by when each notice was recorded sent, not by how long this thread slept: on a
        // loaded machine a sleep of 250 ms may last longer than the group_wait.
        eventually("no first notice and reminder", || lock(&sent).len() >= 2);
        assert_eq!(lock(&sent)[1].0, "a1/firing/r#1");
        let sent_at = |key: &str| lock(&notifier.shared.outbox).get(key).and_then(|e| e.sent_ms).unwrap();
        assert!(sent_at("a1/firing/r") >= now + 400, "sent before group_wait");
        assert!(sent_at("a1/firing/r#1") >= sent_at("a1/firing/r") + 300, "a reminder before its interval");

        let now = chrono::Utc::now().timestamp_millis();
        notifier.enqueue(vec![queued("a1/resolved/r", AlertState::Resolved, now, 0)]).unwrap();
        notifier.end_reminders(&["a1".to_string()]).unwrap();
        eventually("the resolved notice was not sent", || lock(&sent).iter().any(|(_, state)| *state == AlertState::Resolved));
        assert!(lock(&notifier.shared.outbox).pending().next().is_none(), "no reminder left to come after the resolved notice");
        let rows = notifier.take_rows();
        assert!(rows.iter().any(|r| r.status == "dropped" && r.last_error.as_deref() == Some("alert resolved")));
    }

    #[test]
    fn alertmanager_alerts_stay_valid_for_four_resends_and_never_resolve_ahead_of_the_clock() {
        let am = Alertmanager {
            urls: vec![],
            authorization: None,
            valid_for: chrono::Duration::minutes(4),
            dashboard: Some("https://bw.example".into()),
            agent: http_agent(Duration::from_secs(1)),
        };
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let mut firing = alert(AlertState::Firing);
        firing.group = BTreeMap::from([("topic".into(), "energy".into()), ("ticker".into(), String::new())]);
        firing.labels = BTreeMap::from([("team".into(), "desk".into()), ("severity".into(), "ignored".into())]);
        let body = am.postable(&firing, now);
        assert_eq!(body["labels"], serde_json::json!({"alertname": "r", "severity": "warning", "team": "desk", "topic": "energy"}));
        assert_eq!(body["endsAt"], "2026-12-02T10:04:00Z");
        assert_eq!(body["annotations"]["dashboard"], "https://bw.example/?alert=a1");
        assert_eq!(body["generatorURL"], "https://bw.example/?rule=r&topic=energy");

        let mut resolved = alert(AlertState::Resolved);
        resolved.started_at = "2026-12-02T09:00:00Z".into();
        resolved.resolved_at = Some("2026-12-02T09:30:00Z".into());
        assert_eq!(am.postable(&resolved, now)["endsAt"], "2026-12-02T09:30:00Z");
        resolved.resolved_at = Some("2026-12-03T00:00:00Z".into());
        assert_eq!(am.postable(&resolved, now)["endsAt"], "2026-12-02T10:00:00Z", "a resolve dated ahead ends now");
        // Stories dated ahead of the clock: it never starts after now, nor ends before it starts.
        resolved.started_at = "2026-12-02T10:30:00Z".into();
        let ahead = am.postable(&resolved, now);
        assert_eq!((ahead["startsAt"].as_str(), ahead["endsAt"].as_str()), (Some("2026-12-02T10:00:00Z"), Some("2026-12-02T10:00:00Z")));
    }

    #[test]
    fn a_resolve_ends_the_reminders_even_where_it_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let outbox = Outbox::open(&dir.path().join("outbox.jsonl")).unwrap();
        let notifier = Notifier::start(outbox, BTreeMap::from([("r".to_string(), Box::new(Recorder(sent.clone())) as Box<dyn Notify>)]), Silences::default());
        let now = chrono::Utc::now().timestamp_millis();
        let firing = Queued { key: "a1/firing/r".into(), receiver: "r".into(), alert: alert(AlertState::Firing), due_ms: now, expires_ms: now + 60_000, repeat_ms: 50 };
        notifier.enqueue(vec![firing]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lock(&sent).len() < 3 {
            assert!(Instant::now() < deadline, "no reminders");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A route with send_resolved = false: no resolved notice, only the end of the reminders.
        notifier.end_reminders(&["a1".to_string()]).unwrap();
        let ended = lock(&sent).len();
        std::thread::sleep(Duration::from_millis(500));
        assert!(lock(&sent).len() <= ended + 1, "reminders went on after the resolve: {:?}", lock(&sent));
        let outbox = lock(&notifier.shared.outbox);
        assert_eq!(outbox.pending().count(), 0, "nothing left to send");
    }

    /// A silence set while an alert fires mutes its reminders; once it is lifted they resume. An
    /// alert that fires under a silence is told of when the silence ends, and its resolve under the
    /// silence is not sent.
    #[test]
    fn a_silence_mutes_reminders_of_an_alert_already_firing_and_it_is_told_of_after() {
        let dir = tempfile::tempdir().unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let silences = Silences::default();
        let outbox = Outbox::open(&dir.path().join("outbox.jsonl")).unwrap();
        let notifier = Notifier::start(outbox, BTreeMap::from([("r".to_string(), Box::new(Recorder(sent.clone())) as Box<dyn Notify>)]), silences.clone());
        let now = chrono::Utc::now();
        let firing = Queued { key: "a1/firing/r".into(), receiver: "r".into(), alert: alert(AlertState::Firing), due_ms: now.timestamp_millis(), expires_ms: now.timestamp_millis() + 60_000, repeat_ms: 50 };
        notifier.enqueue(vec![firing]).unwrap();
        eventually("no reminders", || lock(&sent).len() >= 3);
        let silence = |ends_at| Silence { matchers: BTreeMap::from([("rule".into(), "r".into())]), starts_at: now - chrono::Duration::hours(1), ends_at, comment: String::new() };
        silences.replace_fixed(vec![silence(now + chrono::Duration::hours(1))]);
        let muted = lock(&sent).len();
        let rows = || notifier.take_rows();
        let mut seen = Vec::new();
        eventually("no reminder was silenced", || {
            seen.extend(rows());
            seen.iter().filter(|r| r.status == "dropped" && r.last_error.as_deref().is_some_and(|e| e.starts_with("silenced until"))).count() >= 3
        });
        assert!(lock(&sent).len() <= muted + 1, "reminders went on under the silence: {:?}", lock(&sent));
        silences.replace_fixed(Vec::new());
        eventually("the reminders did not resume once the silence was lifted", || lock(&sent).len() >= muted + 3);
        notifier.end_reminders(&["a1".to_string()]).unwrap();

        // Another alert fires under a silence ending soon: told of when it ends, not before.
        let ends = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
        silences.replace_fixed(vec![silence(ends)]);
        let mut other = alert(AlertState::Firing);
        other.alert_id = "a2".into();
        let at = chrono::Utc::now().timestamp_millis();
        notifier.enqueue(vec![Queued { key: "a2/firing/r".into(), receiver: "r".into(), alert: other.clone(), due_ms: at, expires_ms: at + 60_000, repeat_ms: 0 }]).unwrap();
        eventually("the notice under the silence was not deferred", || lock(&notifier.shared.outbox).get("a2/firing/r#1").is_some());
        assert_eq!(lock(&notifier.shared.outbox).get("a2/firing/r#1").unwrap().next_ms, ends.timestamp_millis() + 1, "due when the silence ends");
        assert!(!lock(&sent).iter().any(|(key, _)| key.starts_with("a2/")), "sent under the silence");
        eventually("the alert was not told of after the silence", || lock(&sent).iter().any(|(key, _)| key == "a2/firing/r#1"));

        // Its resolve under a silence is dropped, and nothing follows it.
        silences.replace_fixed(vec![silence(chrono::Utc::now() + chrono::Duration::hours(1))]);
        other.state = AlertState::Resolved;
        let at = chrono::Utc::now().timestamp_millis();
        notifier.enqueue(vec![Queued { key: "a2/resolved/r".into(), receiver: "r".into(), alert: other, due_ms: at, expires_ms: at + 60_000, repeat_ms: 0 }]).unwrap();
        eventually("the resolve was not dropped", || lock(&notifier.shared.outbox).get("a2/resolved/r").is_some_and(|e| e.status == Status::Dropped));
        assert!(lock(&notifier.shared.outbox).get("a2/resolved/r#1").is_none());
        assert!(!lock(&sent).iter().any(|(key, _)| key.starts_with("a2/resolved")));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!((1..=9).map(backoff_ms).collect::<Vec<_>>(), [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
    }
}

//! Where alerts go: routes pick receivers by labels, silences mute, and each receiver is a
//! notifier (the log here; email, webhook, Kafka and Alertmanager through the outbox).

mod error;
pub mod notify;
pub mod outbox;
mod rate;
pub mod silences;
mod table;

pub use error::AlertError;
pub use rate::Interval as RateInterval;
pub use table::{notifications_batch, notifications_schema};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use serde::Deserialize;

use crate::config::{EnvString, HumanDuration};
use crate::detect::rules::{Route, RuleFile, matches};
use crate::detect::{Alert, AlertState, Detector};
use crate::news::Why;
use crate::window::WindowRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverKind {
    /// A readable block on standard output and a structured log event.
    Log,
    Webhook,
    Email,
    Kafka,
    /// Prometheus Alertmanager's `POST /api/v2/alerts`, re-sent while firing.
    Alertmanager,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

/// `[[receivers]]` in a pipeline. One struct for all kinds so that errors point at exact lines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ReceiverKind,
    /// webhook: where the Alert JSON is POSTed; alertmanager: the Alertmanager's base URL.
    pub url: Option<EnvString>,
    /// alertmanager: several base URLs (an HA pair); each gets every alert.
    #[serde(default)]
    pub urls: Vec<EnvString>,
    /// webhook, alertmanager: `Authorization: Bearer …` (or `username`/`password` for basic auth).
    pub bearer_token: Option<EnvString>,
    /// alertmanager: how often a firing alert is posted again. Alertmanager resolves an alert that
    /// is not re-sent before its `endsAt` (4 × this), as it does for Prometheus.
    #[serde(default = "one_minute")]
    pub resend_every: HumanDuration,
    /// alertmanager: the dashboard's address as people reach it (e.g. "https://bearwatch.example"),
    /// for the `dashboard` annotation and `generatorURL`; default: `[server] http`.
    pub dashboard_url: Option<EnvString>,
    /// webhook: a Slack-compatible `{"text": …}` body instead of the Alert.
    #[serde(default)]
    pub slack: bool,
    /// webhook, email: per attempt.
    #[serde(default = "ten_seconds")]
    pub timeout: HumanDuration,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    #[serde(default = "starttls")]
    pub tls: SmtpTls,
    pub username: Option<EnvString>,
    pub password: Option<EnvString>,
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    /// kafka: the alerts topic; brokers default to the source's.
    pub topic: Option<String>,
    pub brokers: Option<EnvString>,
    /// kafka: librdkafka producer properties (`security.protocol`, `sasl.*`, `ssl.*`...). Where
    /// `brokers` is left out, the source's `[source.properties]` come first (the same cluster
    /// takes the same credentials), and these on top.
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
    /// How long a notification is retried before it is given up as expired.
    #[serde(default = "one_day")]
    pub expire_after: HumanDuration,
    /// At most this many notifications every `rate_interval`; past it, alerts are held back and
    /// summed up in one notification when the interval ends (0: no limit). Default: 30 for email
    /// and webhooks, which people read; no limit for log, kafka and alertmanager (which groups).
    pub rate_limit: Option<usize>,
    #[serde(default = "ten_minutes")]
    pub rate_interval: HumanDuration,
}

/// The most a `rate_limit` may be.
const MAX_RATE_LIMIT: usize = 1_000_000;

fn ten_seconds() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn one_minute() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn ten_minutes() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(600))
}
fn one_day() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(86_400))
}
fn starttls() -> SmtpTls {
    SmtpTls::Starttls
}

impl ReceiverConfig {
    /// `rate_limit`, or its default for the kind; `None` for no limit.
    pub fn rate_limit(&self) -> Option<usize> {
        let default = match self.kind {
            ReceiverKind::Email | ReceiverKind::Webhook => 30,
            ReceiverKind::Log | ReceiverKind::Kafka | ReceiverKind::Alertmanager => 0,
        };
        Some(self.rate_limit.unwrap_or(default)).filter(|&n| n > 0)
    }

    /// What each kind needs, as (field, message) for the config error.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let need = |present: bool, field: &'static str| {
            if present { Ok(()) } else { Err((field, format!("receiver `{}` ({:?}) needs `{field}`", self.name, self.kind))) }
        };
        if self.password.as_ref().is_some_and(|p| p.as_str().is_empty()) {
            return Err(("password", format!("receiver `{}`: `password` is empty (check the environment variable it names)", self.name)));
        }
        // A URL without its scheme would only fail at the first send, and then be retried for a day.
        let web = |field: &'static str, url: &EnvString| {
            let url = url.as_str();
            if url.starts_with("http://") || url.starts_with("https://") {
                Ok(())
            } else {
                Err((field, format!("receiver `{}`: `{field}` must be an http:// or https:// URL (it is not shown here: its path may be a secret)", self.name)))
            }
        };
        if self.rate_limit.is_some_and(|n| n > MAX_RATE_LIMIT) {
            return Err(("rate_limit", format!("receiver `{}`: `rate_limit` is at most {MAX_RATE_LIMIT} (0: no limit)", self.name)));
        }
        if self.rate_interval.0.is_zero() || self.rate_interval.0 > std::time::Duration::from_secs(86_400) {
            return Err(("rate_interval", format!("receiver `{}`: `rate_interval` must be more than 0s and at most 1d", self.name)));
        }
        if matches!(self.kind, ReceiverKind::Webhook | ReceiverKind::Alertmanager) {
            self.url.iter().try_for_each(|u| web("url", u))?;
            self.urls.iter().try_for_each(|u| web("urls", u))?;
            self.dashboard_url.iter().try_for_each(|u| web("dashboard_url", u))?;
        }
        // One struct holds every kind's fields: one a kind does not use would be ignored silently
        // (a webhook's `bearer_token` was, and every POST was refused).
        use ReceiverKind::{Alertmanager, Email, Kafka, Webhook};
        let fields: [(&str, bool, &[ReceiverKind]); 14] = [
            ("url", self.url.is_some(), &[Webhook, Alertmanager]),
            ("urls", !self.urls.is_empty(), &[Alertmanager]),
            ("bearer_token", self.bearer_token.is_some(), &[Webhook, Alertmanager]),
            ("username", self.username.is_some(), &[Webhook, Alertmanager, Email]),
            ("password", self.password.is_some(), &[Webhook, Alertmanager, Email]),
            ("dashboard_url", self.dashboard_url.is_some(), &[Alertmanager]),
            ("slack", self.slack, &[Webhook]),
            ("smtp_host", self.smtp_host.is_some(), &[Email]),
            ("smtp_port", self.smtp_port.is_some(), &[Email]),
            ("from", self.from.is_some(), &[Email]),
            ("to", !self.to.is_empty(), &[Email]),
            ("topic", self.topic.is_some(), &[Kafka]),
            ("brokers", self.brokers.is_some(), &[Kafka]),
            ("properties", !self.properties.is_empty(), &[Kafka]),
        ];
        if let Some((field, _, kinds)) = fields.iter().find(|(_, set, kinds)| *set && !kinds.contains(&self.kind)) {
            let name = |kind: &ReceiverKind| format!("{kind:?}").to_lowercase();
            let kinds: Vec<String> = kinds.iter().map(name).collect();
            return Err((field, format!("receiver `{}`: `{field}` is for {} receivers, not {}", self.name, kinds.join(" and "), name(&self.kind))));
        }
        match self.kind {
            ReceiverKind::Log => Ok(()),
            ReceiverKind::Webhook => {
                need(self.url.is_some(), "url")?;
                self.check_authorization()
            }
            ReceiverKind::Email => {
                need(self.smtp_host.is_some(), "smtp_host")?;
                need(self.from.is_some(), "from")?;
                need(!self.to.is_empty(), "to")?;
                // The SMTP client sends a password as asked; Go's net/smtp (Alertmanager's) sends
                // one only over TLS or to this machine, and so does this check.
                let host = self.smtp_host.as_deref().unwrap_or_default();
                if self.tls == SmtpTls::None && self.username.is_some() && !crate::net::is_loopback(host) {
                    return Err((
                        "tls",
                        format!("receiver `{}`: `tls = \"none\"` with `username` would send the password to {host} in clear text; use `starttls` or `tls` (none is for a relay on this machine)", self.name),
                    ));
                }
                Ok(())
            }
            ReceiverKind::Kafka => need(self.topic.is_some(), "topic"),
            ReceiverKind::Alertmanager => {
                need(self.url.is_some() || !self.urls.is_empty(), "urls")?;
                self.check_authorization()?;
                if self.resend_every.0.is_zero() {
                    return Err(("resend_every", format!("receiver `{}`: `resend_every` must be more than 0s", self.name)));
                }
                Ok(())
            }
        }
    }

    /// An HTTP receiver's credentials: a bearer token, or a user with a password, not both.
    fn check_authorization(&self) -> Result<(), (&'static str, String)> {
        if self.bearer_token.is_some() && self.username.is_some() {
            return Err(("bearer_token", format!("receiver `{}`: give `bearer_token` or `username`/`password`, not both", self.name)));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(("username", format!("receiver `{}`: `password` without `username`", self.name)));
        }
        Ok(())
    }

    /// The `Authorization` header an HTTP receiver sends, if it has credentials.
    pub fn authorization(&self) -> Option<String> {
        match (&self.bearer_token, &self.username) {
            (Some(token), _) => Some(format!("Bearer {}", token.as_str())),
            (None, Some(user)) => {
                use base64::Engine;
                let password = self.password.as_ref().map_or("", |p| p.as_str());
                Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", user.as_str()))))
            }
            (None, None) => None,
        }
    }
}

/// Who should hear about an alert, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub receiver: String,
    pub silenced: bool,
    pub group_wait_ms: i64,
    pub repeat_interval_ms: i64,
}

pub struct Router {
    routes: Vec<Route>,
    silences: silences::Silences,
}

impl Router {
    pub fn new(routes: Vec<Route>, silences: silences::Silences) -> Router {
        Router { routes, silences }
    }

    /// The silences it consults, which the notifier shares.
    pub fn silences(&self) -> &silences::Silences {
        &self.silences
    }

    /// Receivers of every matching route (each once; the first matching route's timing wins).
    /// Resolved notices go only where `send_resolved` is on.
    pub fn deliveries(&self, alert: &Alert, now: chrono::DateTime<chrono::Utc>) -> Vec<Delivery> {
        let labels = alert.match_labels();
        let silenced = self.silenced(&labels, now);
        let mut out: Vec<Delivery> = Vec::new();
        for route in &self.routes {
            if !matches(&route.matchers, &labels) || (alert.state == AlertState::Resolved && !route.send_resolved) {
                continue;
            }
            for receiver in &route.receivers {
                if !out.iter().any(|d| &d.receiver == receiver) {
                    out.push(Delivery {
                        receiver: receiver.clone(),
                        silenced,
                        group_wait_ms: route.group_wait.as_millis(),
                        repeat_interval_ms: route.repeat_interval.as_millis(),
                    });
                }
            }
        }
        out
    }

    /// Whether a silence (of the rule files or set over the API) matches `labels` at `now`.
    pub fn silenced(&self, labels: &BTreeMap<String, String>, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.silences.mute_until(labels, now).is_some()
    }
}

/// Replaces `path` with `bytes` whole (`files::replace`).
fn replace_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), AlertError> {
    crate::files::replace(path, bytes).map_err(AlertError::io(path))
}

/// Finds the words behind texts, each text's strongest push towards negative first (the pipeline
/// makes one from its classifier; see `classify --explain`).
pub type Explainer = Box<dyn FnMut(&[&str]) -> Vec<Vec<Why>> + Send>;

/// How many words an alert shows for each of its headlines.
pub const WHY_WORDS: usize = 3;

/// Distinct headlines explained in one round of alert changes, at most: each is a model call of
/// one row per word (some 20 ms of CPU for a headline of 20 words), on the pipeline's thread.
pub const MAX_EXPLAINED_PER_ROUND: usize = 100;

/// How a receiver's notifications are scheduled in the outbox.
#[derive(Debug, Clone, Copy)]
struct Timing {
    kind: ReceiverKind,
    expire_ms: i64,
    /// Alertmanager groups, waits and repeats by itself, and needs a firing alert re-sent on its own
    /// interval: it gets each change at once and a re-send every `resend_every`, whatever the route says.
    resend_ms: Option<i64>,
}

/// The alerting stage of a pipeline: rules on window rows, then routing to receivers.
pub struct Alerting {
    pub detector: Detector,
    router: Router,
    receivers: BTreeMap<String, Timing>,
    /// State changes since the last checkpoint, with the wall-clock time they were recorded.
    pub changes: Vec<(Alert, i64)>,
    /// Notifications for the outbox, written at the next checkpoint (before it, so none is lost).
    queued: Vec<notify::Queued>,
    /// Alerts resolved since the last checkpoint, whose reminders end then.
    resolved: Vec<String>,
    /// Receivers with a rate limit, by name.
    limits: BTreeMap<String, rate::RateLimit>,
    pub notifier: Option<notify::Notifier>,
    /// Explains each new alert's headlines before it is recorded or sent; none in role `aggregate`,
    /// which loads no model.
    explainer: Option<Explainer>,
    /// What it found for recent headlines, by text: a story behind alerts of several rounds is
    /// explained once (per-ticker alerts fire round after round over the same stories).
    explained: Explained,
}

/// Headlines whose explanations are kept for later rounds, at most (the newest).
const EXPLAINED_KEPT: usize = 2_000;

/// Recent headlines' words, by text, oldest forgotten first beyond [`EXPLAINED_KEPT`].
#[derive(Default)]
struct Explained {
    why: HashMap<String, Vec<Why>>,
    order: std::collections::VecDeque<String>,
}

impl Explained {
    fn keep(&mut self, text: &str, why: Vec<Why>) {
        if self.why.insert(text.to_string(), why).is_none() {
            self.order.push_back(text.to_string());
        }
        while self.order.len() > EXPLAINED_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.why.remove(&oldest);
            }
        }
    }
}

impl Alerting {
    pub fn new(detector: Detector, router: Router, receivers: &[ReceiverConfig], notifier: Option<notify::Notifier>) -> Alerting {
        let (receivers, limits) = in_force(receivers);
        Alerting {
            detector,
            router,
            receivers,
            changes: Vec::new(),
            queued: Vec::new(),
            resolved: Vec::new(),
            limits,
            notifier,
            explainer: None,
            explained: Explained::default(),
        }
    }

    /// Sends to `receivers` from now on (the pipeline file was read again): their timings and rate
    /// limits here, their senders in the notifier thread. A receiver that keeps its rate limit keeps
    /// its interval's count. `start` opens the notifier where none ran (no receiver needed one before).
    pub fn replace_receivers(
        &mut self,
        receivers: &[ReceiverConfig],
        senders: notify::Senders,
        start: impl FnOnce(notify::Senders, silences::Silences) -> Result<notify::Notifier, AlertError>,
    ) -> Result<(), AlertError> {
        match &self.notifier {
            Some(notifier) => notifier.replace_senders(senders),
            None if senders.is_empty() => {}
            None => self.notifier = Some(start(senders, self.router.silences().clone())?),
        }
        let intervals = self.rate_intervals();
        (self.receivers, self.limits) = in_force(receivers);
        self.resume_rate_intervals(intervals);
        Ok(())
    }

    pub fn with_explainer(mut self, explainer: Explainer) -> Alerting {
        self.explainer = Some(explainer);
        self
    }

    /// Explains with another model from now on (the pipeline swapped its classifier): what the
    /// one before found is forgotten.
    pub fn replace_explainer(&mut self, explainer: Explainer) {
        self.explainer = Some(explainer);
        self.explained = Explained::default();
    }

    /// Hands this checkpoint's notifications to the outbox (durably) for the notifier thread. What
    /// could not be written (a full disk) stays queued for the next call; the outbox skips what it
    /// already holds.
    pub fn flush_queue(&mut self) -> Result<(), AlertError> {
        self.sum_up_held(false);
        let Some(notifier) = &self.notifier else {
            self.queued.clear();
            self.resolved.clear();
            return Ok(());
        };
        if !self.queued.is_empty() {
            notifier.enqueue(self.queued.clone())?;
            self.queued.clear();
        }
        notifier.end_reminders(&self.resolved)?;
        self.resolved.clear();
        Ok(())
    }

    /// Each rate-limited receiver's interval, for the checkpoint.
    pub fn rate_intervals(&self) -> BTreeMap<String, RateInterval> {
        self.limits.iter().map(|(receiver, limit)| (receiver.clone(), limit.interval().clone())).collect()
    }

    /// Goes on with the intervals of a checkpoint, for the receivers that still have a limit.
    pub fn resume_rate_intervals(&mut self, saved: BTreeMap<String, RateInterval>) {
        for (receiver, interval) in saved {
            if let Some(limit) = self.limits.get_mut(&receiver) {
                limit.resume(interval);
            }
        }
    }

    /// Queues a summary for each receiver that held notifications back, once its interval has
    /// ended, or at once (`now`: the pipeline stops).
    pub fn sum_up_held(&mut self, now: bool) {
        let at = chrono::Utc::now().timestamp_millis();
        let summaries: Vec<(String, Alert)> =
            self.limits.iter_mut().filter_map(|(receiver, limit)| Some((receiver.clone(), limit.summary(receiver, at, now)?))).collect();
        for (receiver, summary) in summaries {
            tracing::warn!(receiver, "{}", summary.summary);
            if let Some(&timing) = self.receivers.get(&receiver) {
                self.queue(&summary, &receiver, timing, 0, 0);
            }
        }
    }

    /// Evaluates the rules on new rows at event time `watermark_ms` and notifies.
    pub fn observe(&mut self, rows: &[WindowRow], watermark_ms: i64) -> usize {
        crate::telemetry::received("detect", rows.len() as u64);
        let alerts = self.detector.evaluate(rows, watermark_ms);
        crate::telemetry::sent("detect", alerts.len() as u64);
        self.record(alerts)
    }

    /// Goes on from a checkpoint's detector under the configured rules: alerts still firing under
    /// rules no longer configured resolve now (event time `watermark_ms`).
    pub fn restore(&mut self, saved: Detector, watermark_ms: i64) -> usize {
        let rules = std::mem::replace(&mut self.detector, saved).into_rules();
        let resolved = self.detector.replace_rules(rules, watermark_ms);
        self.record(resolved)
    }

    /// Evaluates and routes by `rules` from now on (the rule files were read again); alerts
    /// firing under rules that are gone resolve, routed as before the change.
    pub fn reload(&mut self, rules: RuleFile, watermark_ms: i64) -> usize {
        let resolved = self.detector.replace_rules(rules.rules, watermark_ms);
        let count = self.record(resolved);
        self.router.routes = rules.routes;
        self.router.silences.replace_fixed(rules.silences);
        count
    }

    /// Explains, notifies and records alerts that changed state; returns how many.
    fn record(&mut self, mut alerts: Vec<Alert>) -> usize {
        let count = alerts.len();
        metrics::gauge!("bearwatch_alerts_firing").set(self.detector.firing() as f64);
        self.explain(&mut alerts);
        for alert in alerts {
            self.notify(&alert);
            self.changes.push((alert, chrono::Utc::now().timestamp_millis()));
        }
        count
    }

    /// Gives the headlines of the alerts that fire their strongest words towards negative (at most
    /// [`WHY_WORDS`], only words that push that way): only an alert's few headlines are explained,
    /// never every story. One model call for the round, each headline once (per-ticker alerts share
    /// their stories, and what earlier rounds found is kept), and at most
    /// [`MAX_EXPLAINED_PER_ROUND`] new ones: 2,000 stories naming 64 of 3,000 tickers each fired
    /// 3,000 alerts, whose 15,000 headlines held the pipeline thread for 2 minutes, one call per
    /// alert. Resolutions show no headlines.
    fn explain(&mut self, alerts: &mut [Alert]) {
        let Some(explainer) = self.explainer.as_mut() else { return };
        let firing = |a: &&mut Alert| a.state == AlertState::Firing;
        let mut wanted: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for headline in alerts.iter_mut().filter(firing).flat_map(|a| a.top_headlines.iter()) {
            if !self.explained.why.contains_key(&headline.headline) && seen.insert(headline.headline.as_str()) {
                wanted.push(headline.headline.clone());
            }
        }
        let skipped = wanted.len().saturating_sub(MAX_EXPLAINED_PER_ROUND);
        wanted.truncate(MAX_EXPLAINED_PER_ROUND);
        if !wanted.is_empty() {
            let started = std::time::Instant::now();
            let texts: Vec<&str> = wanted.iter().map(String::as_str).collect();
            for (text, why) in texts.iter().zip(explainer(&texts)) {
                self.explained.keep(text, why.into_iter().filter(|w| w.effect > 0.0).take(WHY_WORDS).collect());
            }
            metrics::histogram!("bearwatch_alert_explain_seconds").record(started.elapsed().as_secs_f64());
        }
        for headline in alerts.iter_mut().filter(firing).flat_map(|a| a.top_headlines.iter_mut()) {
            if let Some(why) = self.explained.why.get(&headline.headline) {
                headline.why.clone_from(why);
            }
        }
        if skipped > 0 {
            metrics::counter!("bearwatch_alert_headlines_unexplained_total").increment(skipped as u64);
            tracing::warn!(
                explained = wanted.len(),
                skipped,
                "more alert headlines at once than one round explains; the rest are sent with their scores, without their words"
            );
        }
    }

    fn notify(&mut self, alert: &Alert) {
        metrics::counter!("bearwatch_alerts_total", "state" => alert.state.as_str())
            .increment(1);
        if alert.state == AlertState::Resolved {
            self.resolved.push(alert.alert_id.clone());
        }
        // An interval that ended is summed up before this alert counts in the next.
        self.sum_up_held(false);
        for delivery in self.router.deliveries(alert, chrono::Utc::now()) {
            crate::telemetry::received("notify", 1);
            let Some(&timing) = self.receivers.get(&delivery.receiver) else {
                tracing::error!(receiver = %delivery.receiver, "route names an unknown receiver");
                continue;
            };
            let now = chrono::Utc::now().timestamp_millis();
            let mut limit = self.limits.get_mut(&delivery.receiver);
            // A firing alert under a silence is queued all the same, taking its place in the rate
            // limit: the notifier drops the notice while the silence lasts and tells of the alert
            // once it ends, if it still fires. A resolve, a firing alert the limit has no place
            // for, or a log line (printed now or never) has nothing to say after the silence.
            let kind = timing.kind;
            if delivery.silenced && (kind == ReceiverKind::Log || alert.state != AlertState::Firing || limit.as_mut().is_some_and(|l| !l.take_place(now))) {
                tracing::info!(alert_id = %alert.alert_id, receiver = %delivery.receiver, "silenced");
                crate::telemetry::dropped("notify", "silenced", 1);
                continue;
            }
            if kind == ReceiverKind::Log {
                tracing::warn!(alert_id = %alert.alert_id, rule = %alert.rule, state = ?alert.state, "{}", alert.summary);
                crate::telemetry::say(format_args!("{}", render_text(alert)));
                continue;
            }
            if !delivery.silenced && limit.is_some_and(|l| !l.admit(alert, now)) {
                metrics::counter!("bearwatch_notifications_held_total", "receiver" => delivery.receiver.clone()).increment(1);
                crate::telemetry::dropped("notify", "rate_limit", 1);
                tracing::debug!(alert_id = %alert.alert_id, receiver = %delivery.receiver, "held back by the receiver's rate limit");
                continue;
            }
            let (wait, repeat) = timing.resend_ms.map_or((delivery.group_wait_ms, delivery.repeat_interval_ms), |resend| (0, resend));
            let repeat = if alert.state == AlertState::Firing { repeat } else { 0 };
            self.queue(alert, &delivery.receiver, timing, wait, repeat);
        }
    }

    /// Queues a notice of `alert` for `receiver`, due in `wait_ms`, repeated every `repeat_ms` while firing (0: never).
    fn queue(&mut self, alert: &Alert, receiver: &str, timing: Timing, wait_ms: i64, repeat_ms: i64) {
        let due = chrono::Utc::now().timestamp_millis() + wait_ms;
        self.queued.push(notify::Queued {
            key: format!("{}/{}/{receiver}", alert.alert_id, alert.state.as_str()),
            receiver: receiver.to_string(),
            alert: alert.clone(),
            due_ms: due,
            expires_ms: due + timing.expire_ms,
            repeat_ms,
        });
    }
}

/// Each receiver's timing, and the rate limits of those that have one.
fn in_force(receivers: &[ReceiverConfig]) -> (BTreeMap<String, Timing>, BTreeMap<String, rate::RateLimit>) {
    let timing = |r: &ReceiverConfig| Timing {
        kind: r.kind,
        expire_ms: r.expire_after.as_millis(),
        resend_ms: (r.kind == ReceiverKind::Alertmanager).then(|| r.resend_every.as_millis()),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let limits = receivers
        .iter()
        .filter(|r| r.kind != ReceiverKind::Log)
        .filter_map(|r| Some((r.name.clone(), rate::RateLimit::new(r.rate_limit()?, r.rate_interval.as_millis(), now))))
        .collect::<BTreeMap<_, _>>();
    for receiver in limits.keys() {
        metrics::counter!("bearwatch_notifications_held_total", "receiver" => receiver.clone()).increment(0);
    }
    (receivers.iter().map(|r| (r.name.clone(), timing(r))).collect(), limits)
}

/// One headline behind an alert: its score, its text and id, and the words that make it negative.
fn headline_line(h: &crate::window::Headline) -> String {
    let mut line = format!("p_negative {:.2}  {}  ({})", h.p_negative, crate::telemetry::one_line(&h.headline), h.id);
    if !h.why.is_empty() {
        let words: Vec<&str> = h.why.iter().map(|w| w.word.as_str()).collect();
        let _ = write!(line, "  why: {}", words.join(", "));
    }
    line
}

/// The alert as a person reads it: the summary, then the most negative headlines behind it.
pub fn render_text(alert: &Alert) -> String {
    let state = alert.state.as_str().to_uppercase();
    let mut text = format!("[{state}] {} ({}) {}\n", alert.rule, alert.severity.as_str(), alert.summary);
    if alert.state == AlertState::Firing {
        for h in &alert.top_headlines {
            let _ = writeln!(text, "    {}", headline_line(h));
        }
    }
    let _ = write!(text, "    alert_id {}  window {} to {}", alert.alert_id, alert.window_start, alert.window_end);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::rules::{Severity, Silence};

    fn alert(state: AlertState, topic: &str) -> Alert {
        Alert {
            alert_id: "a1".into(),
            rule: "spike".into(),
            severity: Severity::Critical,
            state,
            group: BTreeMap::from([("topic".into(), topic.into())]),
            labels: BTreeMap::from([("team".into(), "markets".into())]),
            started_at: "1987-03-02T00:00:00Z".into(),
            resolved_at: None,
            window_start: "1987-03-02T00:00:00Z".into(),
            window_end: "1987-03-03T00:00:00Z".into(),
            value: 0.5,
            baseline: Some(0.2),
            threshold: 0.4,
            count: 30,
            summary: "energy: negative share 0.50".into(),
            top_headlines: vec![],
        }
    }

    /// 300 per-ticker alerts fire at once over 150 stories (five headlines each), and one resolves:
    /// one model call for the round, each distinct headline once, at most the round's bound; the
    /// next round explains only what was left out.
    #[test]
    fn a_round_of_alerts_explains_each_headline_once_within_its_bound() {
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let explainer: Explainer = Box::new(move |texts: &[&str]| {
            seen.lock().unwrap().push(texts.len());
            texts.iter().map(|t| vec![crate::news::Why { word: t.to_string(), position: 0, effect: 0.5 }]).collect()
        });
        let mut alerting = Alerting::new(Detector::new(Vec::new()), Router::new(Vec::new(), silences::Silences::default()), &[], None).with_explainer(explainer);
        let headline = |i: usize| crate::window::Headline { id: format!("s{i}"), headline: format!("story {i}"), p_negative: 0.9, why: vec![] };
        let mut alerts: Vec<Alert> = (0..300)
            .map(|i| Alert { top_headlines: (0..5).map(|k| headline((i + k * 30) % 150)).collect(), ..alert(AlertState::Firing, &format!("T{i}")) })
            .collect();
        alerts.push(Alert { top_headlines: vec![headline(0)], ..alert(AlertState::Resolved, "T0") });
        assert_eq!(alerting.record(alerts), 301);
        assert_eq!(*calls.lock().unwrap(), vec![MAX_EXPLAINED_PER_ROUND], "one call, each text once, at most the bound");
        let explained: std::collections::BTreeSet<&str> =
            alerting.changes.iter().flat_map(|(a, _)| &a.top_headlines).filter(|h| !h.why.is_empty()).map(|h| h.headline.as_str()).collect();
        assert_eq!(explained.len(), MAX_EXPLAINED_PER_ROUND);
        assert!(alerting.changes.iter().flat_map(|(a, _)| &a.top_headlines).all(|h| h.why.is_empty() || h.why[0].word == h.headline));
        assert!(alerting.changes[0].0.top_headlines.iter().all(|h| !h.why.is_empty()), "the first alert's headlines are among them");
        assert!(alerting.changes[300].0.top_headlines[0].why.is_empty(), "a resolution is not explained");

        // The next round fires the same alerts again: only the headlines left out are explained.
        let again: Vec<Alert> = alerting.changes.iter().take(300).map(|(a, _)| a.clone()).collect();
        alerting.record(again);
        assert_eq!(*calls.lock().unwrap(), vec![MAX_EXPLAINED_PER_ROUND, 150 - MAX_EXPLAINED_PER_ROUND]);
        assert!(alerting.changes[301..].iter().flat_map(|(a, _)| &a.top_headlines).all(|h| !h.why.is_empty()));
        // Another model: what the one before found is forgotten.
        alerting.replace_explainer(Box::new(|texts: &[&str]| vec![Vec::new(); texts.len()]));
        alerting.record(vec![alert(AlertState::Firing, "T0")].into_iter().map(|a| Alert { top_headlines: vec![headline(0)], ..a }).collect());
        assert!(alerting.changes.last().unwrap().0.top_headlines[0].why.is_empty());
    }

    fn route(receivers: &[&str], matchers: &[(&str, &str)], send_resolved: bool) -> Route {
        Route {
            receivers: receivers.iter().map(|r| r.to_string()).collect(),
            matchers: matchers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            group_wait: HumanDuration::parse("30s").unwrap(),
            repeat_interval: HumanDuration::parse("4h").unwrap(),
            send_resolved,
        }
    }

    #[test]
    fn routes_match_on_rule_severity_group_and_labels() {
        let router = Router::new(
            vec![
                route(&["pager"], &[("severity", "critical"), ("topic", "energy")], false),
                route(&["mail", "pager"], &[("team", "markets")], true),
                route(&["other"], &[("topic", "trade")], true),
            ],
            silences::Silences::default(),
        );
        let now = chrono::Utc::now();
        let names = |a: &Alert| router.deliveries(a, now).into_iter().map(|d| d.receiver).collect::<Vec<_>>();
        assert_eq!(names(&alert(AlertState::Firing, "energy")), ["pager", "mail"]);
        assert_eq!(names(&alert(AlertState::Resolved, "energy")), ["mail", "pager"], "the first route does not send resolved");
        assert_eq!(names(&alert(AlertState::Firing, "metals")), ["mail", "pager"]);
    }

    /// Under a silence a firing alert's notice is queued (to be told of after it) if the receiver's
    /// rate limit has a place for it, and holds nothing back if not; a resolve is not queued.
    #[test]
    fn under_a_silence_a_firing_alert_is_queued_within_the_rate_limit_and_a_resolve_is_not() {
        let now = chrono::Utc::now();
        let silence = Silence {
            matchers: BTreeMap::from([("topic".into(), "energy".into())]),
            starts_at: now - chrono::Duration::hours(1),
            ends_at: now + chrono::Duration::hours(1),
            comment: String::new(),
        };
        let hook: ReceiverConfig = toml::from_str("name = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"\nrate_limit = 1").unwrap();
        let router = Router::new(vec![route(&["hook"], &[], true)], silences::Silences::new(vec![silence], None));
        let mut alerting = Alerting::new(Detector::new(Vec::new()), router, &[hook], None);
        let firing = |id: &str, topic: &str| Alert { alert_id: id.into(), ..alert(AlertState::Firing, topic) };
        alerting.record(vec![firing("a1", "energy")]);
        assert_eq!(alerting.queued.iter().map(|q| q.key.as_str()).collect::<Vec<_>>(), ["a1/firing/hook"]);
        alerting.record(vec![firing("a2", "energy"), alert(AlertState::Resolved, "energy")]);
        assert_eq!(alerting.queued.len(), 1, "no place left in the limit, and a resolve under the silence");
        alerting.sum_up_held(true);
        assert_eq!(alerting.queued.len(), 1, "nothing held back to sum up");
        // Unsilenced, the next alert meets the full limit: held back and summed up.
        alerting.record(vec![firing("a3", "metals")]);
        alerting.sum_up_held(true);
        assert_eq!(alerting.queued.iter().map(|q| q.alert.rule.as_str()).collect::<Vec<_>>(), ["spike", rate::HELD_RULE]);
    }

    #[test]
    fn silences_mute_matching_alerts_while_they_last() {
        let now = chrono::Utc::now();
        let silence = Silence {
            matchers: BTreeMap::from([("topic".into(), "energy".into())]),
            starts_at: now - chrono::Duration::hours(1),
            ends_at: now + chrono::Duration::hours(1),
            comment: "known event".into(),
        };
        let router = Router::new(vec![route(&["mail"], &[], true)], silences::Silences::new(vec![silence], None));
        assert!(router.deliveries(&alert(AlertState::Firing, "energy"), now)[0].silenced);
        assert!(!router.deliveries(&alert(AlertState::Firing, "metals"), now)[0].silenced);
        assert!(!router.deliveries(&alert(AlertState::Firing, "energy"), now + chrono::Duration::hours(2))[0].silenced);
    }
}

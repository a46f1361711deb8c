//! A receiver's rate limit. Stories come from outside, and a per-ticker rule fires once per ticker:
//! a feed naming ever new tickers made one pipeline post 6,711 webhooks in 69 s (19,200 stories,
//! 6,400 tickers), and would have sent as many emails. Past `rate_limit` notifications in a
//! `rate_interval`, a receiver's alerts are held back and counted; when the interval ends (or the
//! pipeline stops) one notification sums them up, as Alertmanager groups many alerts into one
//! notice. Every alert is still recorded in the `alerts` table and shown on the dashboard.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detect::rules::Severity;
use crate::detect::{Alert, AlertState};

/// The rule name of a summary of held-back notifications.
pub const HELD_RULE: &str = "bearwatch_notifications_held";
/// How many held-back groups a summary names.
const EXAMPLES: usize = 10;

pub struct RateLimit {
    limit: usize,
    interval_ms: i64,
    current: Interval,
}

/// Where a receiver's current interval stands: part of the checkpoint, so that a crash loses no
/// summary and a restart grants no second `rate_limit` in the same interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Its start (wall clock).
    since_ms: i64,
    sent: usize,
    held: Held,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Held {
    count: u64,
    /// Per rule: (firing, resolved) notices held back.
    by_rule: BTreeMap<String, (u64, u64)>,
    examples: Vec<String>,
}

impl RateLimit {
    pub fn new(limit: usize, interval_ms: i64, now_ms: i64) -> RateLimit {
        RateLimit { limit, interval_ms, current: Interval { since_ms: now_ms, ..Interval::default() } }
    }

    pub fn interval(&self) -> &Interval {
        &self.current
    }

    /// Goes on with an interval from a checkpoint (this limit and length may have changed since).
    pub fn resume(&mut self, saved: Interval) {
        self.current = saved;
    }

    /// Whether a notice of `alert` may go at `now_ms`; if not, it is counted as held back. Take the
    /// [`RateLimit::summary`] first, so that an interval that ended is summed up before the next.
    pub fn admit(&mut self, alert: &Alert, now_ms: i64) -> bool {
        if self.take_place(now_ms) {
            return true;
        }
        let held = &mut self.current.held;
        held.count += 1;
        let (firing, resolved) = held.by_rule.entry(alert.rule.clone()).or_default();
        *if alert.state == AlertState::Firing { firing } else { resolved } += 1;
        if held.examples.len() < EXAMPLES {
            let group: Vec<&str> = alert.group.values().map(String::as_str).collect();
            let example = format!("{} {}", alert.rule, group.join("/"));
            if !held.examples.contains(&example) {
                held.examples.push(example);
            }
        }
        false
    }

    /// Takes one of this interval's places if one is left; holds nothing back when none is (a
    /// notice under a silence, which would only be sent after it).
    pub fn take_place(&mut self, now_ms: i64) -> bool {
        if now_ms - self.current.since_ms >= self.interval_ms && self.current.held.count == 0 {
            (self.current.since_ms, self.current.sent) = (now_ms, 0);
        }
        if self.current.sent < self.limit {
            self.current.sent += 1;
            return true;
        }
        false
    }

    /// What was held back, as one alert to send to `receiver`, once the interval has ended (or
    /// at once with `now`, when the pipeline stops). A new interval starts with it.
    pub fn summary(&mut self, receiver: &str, now_ms: i64, now: bool) -> Option<Alert> {
        if self.current.held.count == 0 || (!now && now_ms - self.current.since_ms < self.interval_ms) {
            return None;
        }
        let held = std::mem::take(&mut self.current.held);
        let rules: Vec<String> =
            held.by_rule.iter().map(|(rule, (firing, resolved))| format!("{rule} {} ({firing} firing, {resolved} resolved)", firing + resolved)).collect();
        let minutes = self.interval_ms as f64 / 60_000.0;
        let summary = format!(
            "{} notifications held back after {} in {minutes} min: {}; for example {}. Every alert is in the alerts table and on the dashboard",
            held.count,
            self.limit,
            rules.join(", "),
            held.examples.join(", "),
        );
        let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let alert = Alert {
            alert_id: format!("held-{receiver}-{}", self.current.since_ms),
            rule: HELD_RULE.into(),
            severity: Severity::Warning,
            state: AlertState::Firing,
            group: BTreeMap::from([("receiver".to_string(), receiver.to_string())]),
            labels: BTreeMap::new(),
            started_at: time(self.current.since_ms),
            resolved_at: None,
            window_start: time(self.current.since_ms),
            window_end: time(now_ms),
            value: held.count as f64,
            baseline: None,
            threshold: self.limit as f64,
            count: held.count,
            summary,
            top_headlines: Vec::new(),
        };
        (self.current.since_ms, self.current.sent) = (now_ms, 0);
        Some(alert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(rule: &str, ticker: &str, state: AlertState) -> Alert {
        Alert {
            alert_id: format!("{rule}-{ticker}"),
            rule: rule.into(),
            severity: Severity::Warning,
            state,
            group: BTreeMap::from([("ticker".to_string(), ticker.to_string())]),
            labels: BTreeMap::new(),
            started_at: String::new(),
            resolved_at: None,
            window_start: String::new(),
            window_end: String::new(),
            value: 3.0,
            baseline: None,
            threshold: 3.0,
            count: 3,
            summary: String::new(),
            top_headlines: Vec::new(),
        }
    }

    #[test]
    fn past_the_limit_alerts_are_held_back_and_summed_up_once_the_interval_ends() {
        let minute = 60_000;
        let mut limit = RateLimit::new(3, 10 * minute, 0);
        let admitted: Vec<bool> = (0..20).map(|i| limit.admit(&alert("ticker-negative", &format!("Z{i:03}"), AlertState::Firing), i)).collect();
        assert_eq!(admitted.iter().filter(|a| **a).count(), 3, "{admitted:?}");
        assert!(admitted[..3].iter().all(|a| *a));
        assert!(!limit.admit(&alert("other", "Y", AlertState::Resolved), 5 * minute));
        assert!(limit.summary("desk", 9 * minute, false).is_none(), "the interval has not ended");
        // It ended: one summary, and a new interval with the whole limit.
        let summary = limit.summary("desk", 10 * minute, false).unwrap();
        assert_eq!((summary.rule.as_str(), summary.count, summary.state), (HELD_RULE, 18, AlertState::Firing));
        assert_eq!(summary.group, BTreeMap::from([("receiver".to_string(), "desk".to_string())]));
        assert!(summary.summary.starts_with("18 notifications held back after 3 in 10 min: other 1 (0 firing, 1 resolved), ticker-negative 17 (17 firing, 0 resolved); for example ticker-negative Z003, ticker-negative Z004"), "{}", summary.summary);
        assert_eq!(summary.summary.matches(", ticker-negative Z").count(), 9, "at most {EXAMPLES} examples: {}", summary.summary);
        assert!(limit.summary("desk", 10 * minute, false).is_none(), "summed up once");
        assert!((0..3).all(|i| limit.admit(&alert("r", &format!("A{i}"), AlertState::Firing), 10 * minute + i)));
        assert!(!limit.admit(&alert("r", "B", AlertState::Firing), 11 * minute));
        // A stop sums up what is held at once.
        assert_eq!(limit.summary("desk", 12 * minute, true).map(|s| s.count), Some(1));
        // A quiet interval just ends.
        assert!(limit.admit(&alert("r", "C", AlertState::Firing), 30 * minute));
    }

    #[test]
    fn an_interval_resumed_from_a_checkpoint_keeps_what_was_sent_and_held() {
        let minute = 60_000;
        let mut before = RateLimit::new(2, 10 * minute, 0);
        for i in 0..5 {
            before.admit(&alert("r", &format!("T{i}"), AlertState::Firing), i);
        }
        let saved: Interval = serde_json::from_str(&serde_json::to_string(before.interval()).unwrap()).unwrap();
        assert_eq!(&saved, before.interval());
        // A restart in the same interval: no second allowance, and the held count goes on.
        let mut after = RateLimit::new(2, 10 * minute, 3 * minute);
        after.resume(saved);
        assert!(!after.admit(&alert("r", "T5", AlertState::Firing), 4 * minute));
        let summary = after.summary("desk", 10 * minute, false).unwrap();
        assert_eq!((summary.count, summary.alert_id.as_str()), (4, "held-desk-0"));
    }
}

//! A partition's share of the windows moving between aggregate instances: the instance that reads
//! a partition of the scored topic (keyed by topic) counts its topics, so when the partition moves,
//! those topics' windows move with it, and the partition's clock too. `all` and per-ticker windows
//! stay with the instance that counted them: each counts its own stories, and the market is the sum.

use std::collections::{BTreeMap, BTreeSet};

use super::{SourceClock, WindowKey, WindowState};

/// A window of one of `topics` itself (not `all`, not a ticker's).
fn of_topics(key: &WindowKey, topics: &BTreeSet<String>) -> bool {
    key.ticker.is_none() && topics.contains(&key.topic)
}

impl WindowState {
    /// Forgets the windows of `topics`: their partition went to another instance, which goes on
    /// with them from the checkpoint this one just wrote.
    pub fn drop_topics(&mut self, topics: &BTreeSet<String>) {
        self.open.retain(|key, _| !of_topics(key, topics));
        self.closed.retain(|key, _| !of_topics(key, topics));
    }

    /// Goes on with `topics`' windows and `source`'s clock as `donor` (the checkpoint of the
    /// instance that read `source` last) left them. This state's own windows of those topics are
    /// older: replaced. A window the watermark here has already passed closes at the next story.
    pub fn adopt(&mut self, donor: &WindowState, topics: &BTreeSet<String>, source: &str) {
        self.drop_topics(topics);
        self.open.extend(donor.open.iter().filter(|(key, _)| of_topics(key, topics)).map(|(k, w)| (k.clone(), w.clone())));
        self.closed.extend(donor.closed.iter().filter(|(key, _)| of_topics(key, topics)).map(|(k, w)| (k.clone(), w.clone())));
        self.trim_closed();
        let clock = donor.sources.get(source).copied().unwrap_or(SourceClock { max_event_ms: None, caught_up: false });
        if let Some(event_ms) = clock.max_event_ms {
            self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        }
        // Until the consumer's statistics say otherwise, the partition has stories to deliver.
        self.sources.insert(source.to_string(), SourceClock { caught_up: false, ..clock });
        self.move_watermark();
    }

    /// Takes in `donor`'s recent stories, so that a copy of one of them that arrives here still
    /// folds into its cluster.
    pub fn adopt_copies(&mut self, donor: &WindowState) {
        self.copies.merge(&donor.copies);
    }

    /// This state's partitions and their clocks, for other instances' [`WindowState::hold_for`].
    pub fn clocks(&self) -> &BTreeMap<String, SourceClock> {
        &self.sources
    }

    /// Other instances' partitions hold the watermark here too, as their newest progress says
    /// (the partitions this state reads itself excepted): a partition whose reader died holds it
    /// until this or another instance takes it over, and the windows it adopts then are still open.
    pub fn hold_for(&mut self, elsewhere: BTreeMap<String, SourceClock>) {
        self.elsewhere = elsewhere;
        self.move_watermark();
    }
}

//! Event-time windows (DESIGN §3 `windows`): tumbling or hopping, grouped by topic (and ticker), plus
//! an `all` group.
//!
//! The watermark follows the slowest source partition that still has data to deliver (its newest
//! event time minus `allowed_lateness`; partitions read to their end do not hold it back) and never
//! moves back. A window closes once the watermark reaches its end, and then emits its final row. An
//! event whose every window has already closed is late: it is counted and goes to the side output instead. State is plain data so that a
//! checkpoint can hold it; sums are kept in integer micro-units so that results do not depend on the
//! order stories arrive in.

mod config;
mod copies;
mod handover;
mod table;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::news::Why;

pub use config::{GroupBy, MAX_WINDOWS_PER_STORY, WindowConfig};
pub use copies::{Copies, Folding, MAX_RECENT};
pub use table::{WindowRow, windows_batch, windows_schema};

/// The group that counts every story, whatever its topic.
pub const ALL: &str = "all";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    pub size_ms: i64,
    pub slide_ms: i64,
    pub allowed_lateness_ms: i64,
    pub by_ticker: bool,
}

impl WindowSpec {
    pub fn from_config(config: &WindowConfig) -> WindowSpec {
        WindowSpec {
            size_ms: config.size.as_millis(),
            slide_ms: config.slide().as_millis(),
            allowed_lateness_ms: config.allowed_lateness.as_millis(),
            by_ticker: config.group_by.contains(&GroupBy::Ticker),
        }
    }

    /// Starts of every window that contains `t`, oldest first.
    fn starts(&self, t: i64) -> impl Iterator<Item = i64> + use<> {
        let last = t.div_euclid(self.slide_ms) * self.slide_ms;
        let count = self.size_ms / self.slide_ms;
        let slide = self.slide_ms;
        (0..count).rev().map(move |k| last - k * slide)
    }
}

/// One window of one group. `topic` is [`ALL`] for the all-topics groups; `ticker` is set only for
/// per-ticker groups (which then count every topic).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowKey {
    pub start_ms: i64,
    pub topic: String,
    pub ticker: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub n: u64,
    pub n_negative: u64,
    pub n_neutral: u64,
    pub n_positive: u64,
    /// Σ sentiment_score in millionths: integer, so sums are exact in any order.
    pub sentiment_micros: i64,
    /// Copies of stories already counted here (the same or near-same text), not in `n`.
    #[serde(default)]
    pub n_copies: u64,
}

impl Counts {
    fn add(&mut self, sentiment: &str, sentiment_score: f32) {
        self.n += 1;
        match sentiment {
            "negative" => self.n_negative += 1,
            "positive" => self.n_positive += 1,
            _ => self.n_neutral += 1,
        }
        self.sentiment_micros += (f64::from(sentiment_score) * 1e6).round() as i64;
    }

    /// Takes back what [`Counts::add`] counted (a story whose label changed).
    fn remove(&mut self, sentiment: &str, sentiment_score: f32) {
        self.n = self.n.saturating_sub(1);
        let n = match sentiment {
            "negative" => &mut self.n_negative,
            "positive" => &mut self.n_positive,
            _ => &mut self.n_neutral,
        };
        *n = n.saturating_sub(1);
        self.sentiment_micros -= (f64::from(sentiment_score) * 1e6).round() as i64;
    }

    pub fn neg_share(&self) -> f64 {
        if self.n == 0 { 0.0 } else { self.n_negative as f64 / self.n as f64 }
    }

    pub fn mean_sentiment(&self) -> f64 {
        if self.n == 0 { 0.0 } else { self.sentiment_micros as f64 / 1e6 / self.n as f64 }
    }
}

/// A story kept with its window to explain an alert: the most negative ones are the "why".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Headline {
    pub id: String,
    pub headline: String,
    pub p_negative: f32,
    /// The words that make it read negative, strongest first (filled in when an alert explains its
    /// headlines; windows keep it empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub why: Vec<Why>,
}

/// Most characters of a headline a window keeps among its top stories (`news` keeps it whole).
/// Every window a story falls in keeps its own copy (64 tickers, each hopping window), so 4,000
/// stories of 2,000-character headlines on 10,000 tickers held 876 MB at peak.
pub const TOP_HEADLINE_CHARS: usize = 300;

impl Headline {
    /// A story as a window keeps it: its headline cut to [`TOP_HEADLINE_CHARS`] (with "…").
    pub fn kept(id: &str, headline: &str, p_negative: f32) -> Headline {
        let headline = match headline.char_indices().nth(TOP_HEADLINE_CHARS) {
            Some((at, _)) => format!("{}…", &headline[..at]),
            None => headline.to_string(),
        };
        Headline { id: id.to_string(), headline, p_negative, why: vec![] }
    }
}

/// How many of the most negative stories each window keeps.
pub const TOP_HEADLINES: usize = 5;

/// Open windows past which no new per-ticker window opens (the story still counts in its topic and
/// `all`): tickers come from the input, so this bounds what a feed naming ever new tickers can make
/// the windows (and their checkpoints) hold. Topic windows are bounded by the model's topics and,
/// across event time, by [`MAX_OPEN_WINDOWS_ALL`].
pub const MAX_OPEN_WINDOWS: usize = 50_000;

/// Open windows of every group at which the watermark moves on by itself, past the oldest tenth of
/// them ([`WindowState::bound_open_windows`]). The watermark follows the slowest partition with
/// data left, so a partition held far back in event time (a deep backlog of old stories, or a
/// producer that keeps one partition old on purpose) would otherwise let the others open a window
/// for every hour they name, without bound. Its stories older than that are then late, as if it had
/// caught up.
pub const MAX_OPEN_WINDOWS_ALL: usize = 100_000;

/// Whether a window that is not open yet must stay unopened: a ticker's, with
/// [`MAX_OPEN_WINDOWS`] open (counted in `bearwatch_window_tickers_refused_total`).
fn refuses_new_window(open_windows: usize, key: &WindowKey) -> bool {
    let refused = key.ticker.is_some() && open_windows >= MAX_OPEN_WINDOWS;
    if refused {
        metrics::counter!("bearwatch_window_tickers_refused_total").increment(1);
    }
    refused
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenWindow {
    counts: Counts,
    /// Most negative first; ties by id so that results do not depend on arrival order.
    top: Vec<Headline>,
    /// Changed since its last live row was written to the table (at a checkpoint).
    dirty: bool,
    /// Changed since the alert rules last saw it (at a step of event time).
    #[serde(default)]
    unevaluated: bool,
    /// The clusters of copies counted here: which story counts for each, and how many copies of it
    /// were folded in (absent from older checkpoints: nothing folds into what they held).
    #[serde(default)]
    folded: BTreeMap<u64, Folded>,
}

/// One cluster of copies in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Folded {
    /// The story counted for the cluster: the smallest id among its copies here, so that what a
    /// window holds does not depend on which copy arrived first (a restart replays partitions in
    /// another interleaving). Empty while none is (it moved to another group).
    counted: String,
    /// The counted story's label and score, to take it back when a smaller id arrives (absent from
    /// older checkpoints: their counted story stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counted_as: Option<(String, f32)>,
    copies: u64,
}

/// Clusters a window tracks, at most; stories past it count without folding.
pub const MAX_FOLDED_PER_WINDOW: usize = 20_000;

impl OpenWindow {
    fn empty(changed: bool) -> OpenWindow {
        OpenWindow { counts: Counts::default(), top: Vec::new(), dirty: changed, unevaluated: changed, folded: BTreeMap::new() }
    }

    /// Counts `story` here: as a story, or as a copy of its cluster's story.
    fn count_in(&mut self, story: &Counted) {
        let counted_as = || Some((story.sentiment.clone(), story.sentiment_score));
        let counts_as_story = match self.folded.get_mut(&story.cluster) {
            _ if story.cluster == 0 => true,
            Some(f) if f.counted.is_empty() || f.counted == story.story.id => {
                f.counted.clone_from(&story.story.id);
                f.counted_as = counted_as();
                true
            }
            Some(f) if story.story.id < f.counted && f.counted_as.is_some() => {
                // A smaller id takes the count over; the story counted so far becomes a copy.
                let replaced = std::mem::replace(&mut f.counted, story.story.id.clone());
                let (sentiment, score) = std::mem::replace(&mut f.counted_as, counted_as()).unwrap_or_default();
                f.copies += 1;
                self.counts.remove(&sentiment, score);
                self.counts.n_copies += 1;
                self.top.retain(|h| h.id != replaced);
                true
            }
            Some(f) => {
                f.copies += 1;
                false
            }
            None => {
                if self.folded.len() < MAX_FOLDED_PER_WINDOW {
                    self.folded.insert(story.cluster, Folded { counted: story.story.id.clone(), counted_as: counted_as(), copies: 0 });
                }
                true
            }
        };
        if counts_as_story {
            self.counts.add(&story.sentiment, story.sentiment_score);
            self.keep_if_among_most_negative(&story.story);
        } else {
            self.counts.n_copies += 1;
        }
    }

    /// Takes back what [`OpenWindow::count_in`] counted for `story`.
    fn count_out(&mut self, story: &Counted) {
        let counted_as_story = match self.folded.get_mut(&story.cluster) {
            _ if story.cluster == 0 => true,
            Some(f) if f.counted == story.story.id => {
                f.counted.clear();
                f.counted_as = None;
                if f.copies == 0 {
                    self.folded.remove(&story.cluster);
                }
                true
            }
            Some(f) => {
                f.copies = f.copies.saturating_sub(1);
                if f.copies == 0 && f.counted.is_empty() {
                    self.folded.remove(&story.cluster);
                }
                false
            }
            None => true,
        };
        if counted_as_story {
            self.counts.remove(&story.sentiment, story.sentiment_score);
            self.top.retain(|h| h.id != story.story.id);
        } else {
            self.counts.n_copies = self.counts.n_copies.saturating_sub(1);
        }
    }

    fn changed(&mut self) {
        self.dirty = true;
        self.unevaluated = true;
    }

    fn keep_if_among_most_negative(&mut self, story: &Headline) {
        fn rank(h: &Headline) -> (std::cmp::Reverse<i64>, &str) {
            (std::cmp::Reverse(ordered(h.p_negative)), h.id.as_str())
        }
        if self.top.len() == TOP_HEADLINES && self.top.last().is_some_and(|last| rank(last) <= rank(story)) {
            return;
        }
        let at = self.top.partition_point(|h| rank(h) < rank(story));
        self.top.insert(at, story.clone());
        self.top.truncate(TOP_HEADLINES);
    }
}

/// One story as the windows counted it: what a label correction takes back and counts anew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counted {
    pub event_ms: i64,
    pub topic: String,
    pub tickers: Vec<String>,
    pub sentiment: String,
    pub sentiment_score: f32,
    pub story: Headline,
    /// The cluster of copies it belongs to ([`WindowState::cluster_of`]); 0: counted on its own.
    #[serde(default)]
    pub cluster: u64,
}

/// f32 probabilities as a totally ordered key.
fn ordered(p: f32) -> i64 {
    (f64::from(p) * 1e9).round() as i64
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Counted in this many windows (per group).
    Counted(usize),
    /// Every window it belongs to had closed.
    Late,
}

/// All open windows and the watermark. Serializable as a whole for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// Kept in checkpoints so that a restart under different window settings is refused, not mixed.
    spec: WindowSpec,
    #[serde(with = "open_windows")]
    open: BTreeMap<WindowKey, OpenWindow>,
    /// Newest event time seen from any source.
    max_event_ms: Option<i64>,
    /// Per source partition (`topic/partition`, or the file): its newest event time, and whether
    /// the consumer has read all it holds. The watermark follows the slowest partition that still has
    /// data to deliver, as Flink's per-partition watermarks do, so a partition that a consumer happens
    /// to read ahead (a backlog after a broker restart, say) does not make the others' stories late.
    #[serde(default)]
    sources: BTreeMap<String, SourceClock>,
    /// The slowest pending source's newest event time − allowed lateness; it never moves back.
    /// Absent from checkpoints written before per-source clocks (see `upgrade_restored`).
    #[serde(default)]
    watermark_ms: Option<i64>,
    /// The newest closed windows, kept so that a label correction can revise their final rows.
    #[serde(default, with = "open_windows")]
    closed: BTreeMap<WindowKey, OpenWindow>,
    /// The last step of event time (watermark ÷ the evaluation interval) at which the rules saw
    /// the live rows ([`WindowState::take_due_for_rules`]).
    #[serde(default)]
    evaluated_step: Option<i64>,
    /// How many closed windows to keep (0: none). A setting of the running pipeline, not state.
    #[serde(skip)]
    keep_closed: usize,
    /// The recent stories copies fold into.
    #[serde(default)]
    copies: Copies,
    /// None: copies count as stories. A setting of the running pipeline, not state.
    #[serde(skip)]
    folding: Option<Folding>,
    /// Other instances' partitions, as their last progress said ([`WindowState::hold_for`]): they
    /// hold the watermark like this state's own, so that a partition taken over from one of them
    /// finds its windows still open. Refreshed, never checkpointed.
    #[serde(skip)]
    elsewhere: BTreeMap<String, SourceClock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SourceClock {
    /// None for a partition assigned but not yet heard from: the watermark waits for it.
    pub max_event_ms: Option<i64>,
    /// Nothing left to read right now (the consumer's position is at the partition's end), so
    /// this source does not hold the watermark back until it delivers again.
    pub caught_up: bool,
}

/// JSON object keys must be strings, so the map is stored as a list of pairs.
mod open_windows {
    use super::*;

    pub fn serialize<S: serde::Serializer>(map: &BTreeMap<WindowKey, OpenWindow>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<WindowKey, OpenWindow>, D::Error> {
        Ok(Vec::<(WindowKey, OpenWindow)>::deserialize(d)?.into_iter().collect())
    }
}

impl WindowState {
    pub fn new(spec: WindowSpec) -> WindowState {
        WindowState {
            spec,
            open: BTreeMap::new(),
            max_event_ms: None,
            sources: BTreeMap::new(),
            watermark_ms: None,
            closed: BTreeMap::new(),
            evaluated_step: None,
            keep_closed: 0,
            copies: Copies::default(),
            folding: None,
            elsewhere: BTreeMap::new(),
        }
    }

    /// Copies of a story within a window count once from now on (`None`: every story counts).
    pub fn fold_copies(&mut self, folding: Option<Folding>) {
        self.folding = folding;
    }

    pub fn folding(&self) -> Option<Folding> {
        self.folding
    }

    /// The cluster of copies a story belongs to, for [`Counted::cluster`]: 0 when copies do not fold.
    pub fn cluster_of(&mut self, event_ms: i64, text: &str, reading: &crate::news::near::Reading) -> u64 {
        let Some(folding) = &self.folding else { return 0 };
        // Copies fold within a window; a story can arrive up to the lateness after its window.
        let (reach, keep) = (self.spec.size_ms, self.spec.size_ms + self.spec.allowed_lateness_ms);
        self.copies.cluster(folding, event_ms, text, reading, reach, keep)
    }

    /// Keeps the newest `count` closed windows revisable (see [`WindowState::relabel`]).
    pub fn keep_closed(&mut self, count: usize) {
        self.keep_closed = count;
        self.trim_closed();
    }

    /// Forgets, in the closed windows, the clusters of copies that none of `revisable` (the clusters
    /// of the stories a correction can still re-count) belongs to: only such a correction reads them
    /// there, and a busy feed's closed `all` window holds up to [`MAX_FOLDED_PER_WINDOW`] (about
    /// 1.3 MB of checkpoint each at 5,000 stories an hour).
    pub fn forget_folded_except(&mut self, revisable: &std::collections::HashSet<u64>) {
        for window in self.closed.values_mut() {
            window.folded.retain(|cluster, _| revisable.contains(cluster));
        }
    }

    /// Forgets the oldest closed windows, a whole window start at a time: a window at a kept start
    /// that is not here never had a story.
    fn trim_closed(&mut self) {
        while self.closed.len() > self.keep_closed {
            let Some(oldest) = self.closed.keys().next().map(|k| k.start_ms) else { break };
            while self.closed.first_key_value().is_some_and(|(k, _)| k.start_ms == oldest) {
                self.closed.pop_first();
            }
        }
    }

    /// The groups a story counts in: its topic, [`ALL`], and (when grouping by ticker) each ticker once.
    fn groups<'a>(&self, topic: &'a str, tickers: &'a [String]) -> Vec<(&'a str, Option<&'a str>)> {
        let mut groups: Vec<(&str, Option<&str>)> = vec![(topic, None), (ALL, None)];
        if self.spec.by_ticker {
            for ticker in tickers {
                if !groups.contains(&(ALL, Some(ticker.as_str()))) {
                    groups.push((ALL, Some(ticker.as_str())));
                }
            }
        }
        groups
    }

    /// Moves a story from how it was counted (`was`) to how it counts now (`now`) in every window of
    /// its event time that is open or still kept closed. Open windows show it in their next live
    /// rows; each kept closed window it changes gets a revised final row, returned here (the newest
    /// `updated_at` of a window wins). Returns nothing when every such window is gone.
    pub fn relabel(&mut self, was: &Counted, now: &Counted, now_ms: i64) -> Vec<WindowRow> {
        let mut revised = std::collections::BTreeSet::new();
        let size = self.spec.size_ms;
        let watermark = self.watermark_ms;
        let starts: Vec<i64> = self.spec.starts(was.event_ms).collect();
        for (topic, ticker) in self.groups(&was.topic, &was.tickers) {
            for &start in &starts {
                let key = WindowKey { start_ms: start, topic: topic.to_string(), ticker: ticker.map(str::to_string) };
                if let Some(window) = self.open.get_mut(&key) {
                    window.count_out(was);
                    window.changed();
                } else if let Some(window) = self.closed.get_mut(&key) {
                    window.count_out(was);
                    revised.insert(key);
                }
            }
        }
        let oldest_kept = self.closed.keys().next().map(|k| k.start_ms);
        let new_groups: Vec<(String, Option<String>)> =
            self.groups(&now.topic, &now.tickers).into_iter().map(|(t, k)| (t.to_string(), k.map(str::to_string))).collect();
        for (topic, ticker) in new_groups {
            for &start in &starts {
                let key = WindowKey { start_ms: start, topic: topic.clone(), ticker: ticker.clone() };
                let open = !watermark.is_some_and(|w| start + size <= w);
                let window = if open {
                    if !self.open.contains_key(&key) && refuses_new_window(self.open.len(), &key) {
                        continue;
                    }
                    self.open.entry(key).or_insert_with(|| OpenWindow::empty(true))
                } else if self.closed.contains_key(&key) || oldest_kept.is_some_and(|oldest| start >= oldest) {
                    // A closed window of the new group that had no stories: it now has this one.
                    revised.insert(key.clone());
                    self.closed.entry(key).or_insert_with(|| OpenWindow::empty(false))
                } else {
                    continue;
                };
                window.count_in(now);
                if open {
                    window.changed();
                }
            }
        }
        self.trim_closed();
        revised
            .into_iter()
            .filter_map(|key| {
                let window = self.closed.get(&key)?;
                Some(WindowRow::new(key, size, window.counts.clone(), window.top.clone(), true, now_ms))
            })
            .collect()
    }

    /// Records that `source` delivered an event at `event_ms`, and moves the watermark.
    pub fn advance(&mut self, source: &str, event_ms: i64) {
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        match self.sources.get_mut(source) {
            Some(clock) => {
                clock.max_event_ms = Some(clock.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
                clock.caught_up = false;
            }
            None => {
                self.sources.insert(source.to_string(), SourceClock { max_event_ms: Some(event_ms), caught_up: false });
            }
        }
        self.move_watermark();
    }

    /// Whether `source` has been read to its end (the consumer's statistics). A source not yet
    /// heard from that is not at its end holds the watermark until its first event.
    pub fn set_caught_up(&mut self, source: &str, caught_up: bool) {
        match self.sources.get_mut(source) {
            Some(clock) if clock.caught_up != caught_up => clock.caught_up = caught_up,
            None if !caught_up => {
                self.sources.insert(source.to_string(), SourceClock { max_event_ms: None, caught_up });
            }
            _ => return,
        }
        self.move_watermark();
    }

    fn move_watermark(&mut self) {
        // None while a pending source has not been heard from: it could bring anything, so wait.
        let elsewhere = self.elsewhere.iter().filter(|(source, _)| !self.sources.contains_key(*source)).map(|(_, clock)| clock);
        let Some(pending) =
            self.sources.values().chain(elsewhere).filter(|c| !c.caught_up).map(|c| c.max_event_ms).collect::<Option<Vec<i64>>>()
        else {
            return;
        };
        // Every source read to its end: nothing older is on its way.
        let Some(slowest) = pending.into_iter().min().or(self.max_event_ms) else { return };
        let candidate = slowest.saturating_sub(self.spec.allowed_lateness_ms);
        self.watermark_ms = Some(self.watermark_ms.map_or(candidate, |w| w.max(candidate)));
    }

    /// Stops tracking partitions this pipeline no longer reads (moved to another group member).
    pub fn forget_source(&mut self, source: &str) {
        self.sources.remove(source);
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    pub fn watermark_ms(&self) -> Option<i64> {
        self.watermark_ms
    }

    /// A checkpoint from before per-source clocks has only the newest event time: its watermark
    /// was that less the allowed lateness, and it must not move back.
    pub fn upgrade_restored(&mut self) {
        if self.watermark_ms.is_none() && self.sources.is_empty() {
            self.watermark_ms = self.max_event_ms.map(|t| t.saturating_sub(self.spec.allowed_lateness_ms));
        }
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Counts one scored story into every open window it belongs to, in each of its groups (a copy
    /// of a story already there counts as a copy). The caller moves the watermark with
    /// [`WindowState::advance`].
    pub fn add(&mut self, story: &Counted) -> Placed {
        self.bound_open_windows();
        let watermark = self.watermark_ms();
        let groups = self.groups(&story.topic, &story.tickers);
        let size = self.spec.size_ms;
        let starts: Vec<i64> = self.spec.starts(story.event_ms).filter(|start| !watermark.is_some_and(|w| start + size <= w)).collect();
        for (topic, ticker) in &groups {
            // One key per group, re-pointed at each window start: most windows exist already, and a
            // lookup by reference allocates nothing.
            let mut key = WindowKey { start_ms: 0, topic: topic.to_string(), ticker: ticker.map(str::to_string) };
            for &start in &starts {
                key.start_ms = start;
                let open_windows = self.open.len();
                let window = match self.open.get_mut(&key) {
                    Some(window) => window,
                    None if refuses_new_window(open_windows, &key) => continue,
                    None => self.open.entry(key.clone()).or_insert_with(|| OpenWindow::empty(true)),
                };
                window.count_in(story);
                window.changed();
            }
        }
        let windows = starts.len();
        if windows == 0 { Placed::Late } else { Placed::Counted(windows) }
    }

    /// At [`MAX_OPEN_WINDOWS_ALL`] open windows, moves the watermark to the end of the oldest tenth
    /// (whole window starts), so that the next [`WindowState::close_due`] closes them: hopping
    /// windows open several starts a story, so closing one start at a time would not hold the bound.
    fn bound_open_windows(&mut self) {
        if self.open.len() < MAX_OPEN_WINDOWS_ALL {
            return;
        }
        let Some(last) = self.open.keys().nth(self.open.len() - MAX_OPEN_WINDOWS_ALL * 9 / 10).map(|k| k.start_ms) else { return };
        let end = last.saturating_add(self.spec.size_ms);
        if self.watermark_ms.is_none_or(|w| w < end) {
            self.watermark_ms = Some(end);
            metrics::counter!("bearwatch_window_watermark_forced_total").increment(1);
            tracing::debug!(open = self.open.len(), watermark_ms = end, "too many open windows: the watermark moves on by itself");
        }
    }

    /// Removes the windows the watermark has passed and returns their final rows.
    pub fn close_due(&mut self, now_ms: i64) -> Vec<WindowRow> {
        match self.watermark_ms() {
            Some(watermark) => {
                let size = self.spec.size_ms;
                self.close_where(now_ms, |start| start + size <= watermark)
            }
            None => Vec::new(),
        }
    }

    /// Closes every window: the end of a bounded input means no more events can arrive.
    pub fn close_all(&mut self, now_ms: i64) -> Vec<WindowRow> {
        self.close_where(now_ms, |_| true)
    }

    fn close_where(&mut self, now_ms: i64, due: impl Fn(i64) -> bool) -> Vec<WindowRow> {
        let mut rows = Vec::new();
        while let Some(entry) = self.open.first_entry() {
            if !due(entry.key().start_ms) {
                break;
            }
            let (key, window) = entry.remove_entry();
            rows.push(WindowRow::new(key.clone(), self.spec.size_ms, window.counts.clone(), window.top.clone(), true, now_ms));
            if self.keep_closed > 0 {
                self.closed.insert(key, window);
            }
        }
        self.trim_closed();
        rows
    }

    /// What the watermark now allows, for the alert rules: the final rows of the windows it passed
    /// (removed from the open ones), then [`WindowState::take_due_for_rules`]. The pipeline and
    /// every replay (`model compare`) call this after each story, so they decide alike.
    pub fn due(&mut self, every_ms: i64, now_ms: i64) -> (Vec<WindowRow>, Vec<WindowRow>) {
        let closed = self.close_due(now_ms);
        let live = self.take_due_for_rules(every_ms, now_ms);
        (closed, live)
    }

    /// Live rows for the alert rules: the open windows that changed since the rules last saw them,
    /// once each time the watermark crosses a multiple of `every_ms` (and nothing otherwise). The
    /// points are of event time, so a replay, a restart from a checkpoint and a second run of the
    /// same input evaluate the same rows at the same watermarks, however the wall clock went.
    pub fn take_due_for_rules(&mut self, every_ms: i64, now_ms: i64) -> Vec<WindowRow> {
        let Some(watermark) = self.watermark_ms else { return Vec::new() };
        let step = watermark.div_euclid(every_ms.max(1));
        let Some(done) = self.evaluated_step else {
            // The first watermark crosses nothing: when it comes depends on how the partitions
            // interleave, and the rules would read whatever was open then.
            self.evaluated_step = Some(step);
            return Vec::new();
        };
        if step <= done {
            return Vec::new();
        }
        self.evaluated_step = Some(step);
        self.take_marked(|w| &mut w.unevaluated, now_ms)
    }

    /// Live (not final) rows for the table: the windows that changed since the last call.
    pub fn take_updates(&mut self, now_ms: i64) -> Vec<WindowRow> {
        self.take_marked(|w| &mut w.dirty, now_ms)
    }

    /// Live rows of the open windows whose `mark` is set, clearing it.
    fn take_marked(&mut self, mark: fn(&mut OpenWindow) -> &mut bool, now_ms: i64) -> Vec<WindowRow> {
        let size = self.spec.size_ms;
        self.open
            .iter_mut()
            .filter_map(|(key, w)| {
                let marked = std::mem::take(mark(w));
                marked.then(|| WindowRow::new(key.clone(), size, w.counts.clone(), w.top.clone(), false, now_ms))
            })
            .collect()
    }

    /// Every open window as it stands now (live rows), leaving the change marks alone.
    pub fn snapshot(&self, now_ms: i64) -> Vec<WindowRow> {
        self.open
            .iter()
            .map(|(key, w)| WindowRow::new(key.clone(), self.spec.size_ms, w.counts.clone(), Vec::new(), false, now_ms))
            .collect()
    }

    /// Open windows of the [`ALL`] group's topics, for the live summary: (topic, counts).
    pub fn open_counts(&self) -> impl Iterator<Item = (&WindowKey, &Counts)> {
        self.open.iter().map(|(k, w)| (k, &w.counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn a_window_keeps_a_long_headline_cut_short() {
        let long = "é".repeat(TOP_HEADLINE_CHARS + 50);
        let kept = Headline::kept("s1", &long, 0.9);
        assert_eq!(kept.headline.chars().count(), TOP_HEADLINE_CHARS + 1);
        assert!(kept.headline.ends_with('…') && kept.headline.starts_with("éé"));
        let short = "Oil falls";
        assert_eq!(Headline::kept("s2", short, 0.1).headline, short);
        assert_eq!(Headline::kept("s3", &"x".repeat(TOP_HEADLINE_CHARS), 0.1).headline.len(), TOP_HEADLINE_CHARS, "no cut at the limit itself");
    }

    fn story(id: &str, p_negative: f32) -> Headline {
        Headline { id: id.into(), headline: format!("headline {id}"), p_negative, why: vec![] }
    }

    /// `WindowState::add` for tests that do not care about headlines.
    trait AddPlain {
        fn put(&mut self, t: i64, topic: &str, tickers: &[String], sentiment: &str, score: f32) -> Placed;
    }

    impl AddPlain for WindowState {
        fn put(&mut self, t: i64, topic: &str, tickers: &[String], sentiment: &str, score: f32) -> Placed {
            let placed = self.add(&Counted { tickers: tickers.to_vec(), ..counted("x", t, topic, sentiment, score, 0.5) });
            self.advance("p0", t);
            placed
        }
    }

    fn spec(size: i64, slide: i64, lateness: i64) -> WindowSpec {
        WindowSpec { size_ms: size, slide_ms: slide, allowed_lateness_ms: lateness, by_ticker: false }
    }

    /// One partition stays at the first hour while another names a new hour with every story: the
    /// open windows stop growing at the bound, the oldest close with their final rows, and the held
    /// partition's next story is late.
    #[test]
    fn a_watermark_held_back_moves_on_by_itself_once_too_many_windows_are_open() {
        // Hopping: 4 h windows every hour, stories 5 h apart, so each story opens 4 starts × 2 groups.
        let mut state = WindowState::new(spec(4 * H, H, 0));
        state.advance("held", 0);
        let stories = MAX_OPEN_WINDOWS_ALL / 4;
        let (mut closed, mut most) = (0, 0);
        for i in 0..stories as i64 {
            state.add(&counted(&format!("s{i}"), 5 * i * H, "energy", "negative", -1.0, 0.9));
            state.advance("ahead", 5 * i * H);
            most = most.max(state.open_windows());
            closed += state.close_due(0).len();
        }
        assert!(most <= MAX_OPEN_WINDOWS_ALL + 2 * 8, "{most} open at most (the bound and two stories' windows)");
        assert_eq!(closed + state.open_windows(), 8 * stories, "every window opened, closed with its final row or open");
        assert!(closed > stories, "the oldest closed: {closed}");
        assert!(state.watermark_ms().is_some_and(|w| w > 0), "moved on");
        assert_eq!(state.add(&counted("old", 0, "energy", "negative", -1.0, 0.9)), Placed::Late, "the held partition's old story");
    }

    #[test]
    fn new_ticker_windows_stop_opening_at_the_bound_and_the_story_still_counts_in_its_topic() {
        let mut state = WindowState::new(WindowSpec { by_ticker: true, ..spec(H, H, 0) });
        let tickers: Vec<String> = (0..MAX_OPEN_WINDOWS).map(|i| format!("T{i}")).collect();
        for chunk in tickers.chunks(crate::news::MAX_TICKERS) {
            state.put(10, "energy", chunk, "negative", -0.9);
        }
        assert_eq!(state.open.len(), MAX_OPEN_WINDOWS, "energy, all and tickers up to the bound");
        state.put(20, "energy", &["XOM".into(), "T0".into()], "negative", -0.9);
        assert_eq!(state.open.len(), MAX_OPEN_WINDOWS);
        let t0 = WindowKey { start_ms: 0, topic: ALL.into(), ticker: Some("T0".into()) };
        assert_eq!(state.open[&t0].counts.n, 2, "an open ticker window still counts");
        let energy = WindowKey { start_ms: 0, topic: "energy".into(), ticker: None };
        assert_eq!(state.open[&energy].counts.n, (MAX_OPEN_WINDOWS as u64).div_ceil(crate::news::MAX_TICKERS as u64) + 1);
        let xom = WindowKey { ticker: Some("XOM".into()), ..t0.clone() };
        assert!(!state.open.contains_key(&xom), "no new ticker window past the bound");
        // An analyst's correction of that story opens none either.
        let was = Counted { tickers: vec!["XOM".into(), "T0".into()], ..counted("x", 20, "energy", "negative", -0.9, 0.5) };
        let now = Counted { sentiment: "neutral".into(), sentiment_score: 0.0, ..was.clone() };
        state.relabel(&was, &now, 30);
        assert_eq!(state.open.len(), MAX_OPEN_WINDOWS);
        assert!(!state.open.contains_key(&xom));
        assert_eq!(state.open[&t0].counts.n_negative, 1, "the open ticker window follows the correction");
    }

    #[test]
    fn tumbling_windows_close_when_the_watermark_passes_their_end() {
        let mut state = WindowState::new(spec(H, H, 0));
        assert_eq!(state.put(10, "energy", &[], "negative", -0.9), Placed::Counted(1));
        assert_eq!(state.put(20, "energy", &[], "positive", 0.5), Placed::Counted(1));
        assert!(state.close_due(0).is_empty());
        state.put(H + 5, "trade", &[], "neutral", 0.0);
        let closed = state.close_due(0);
        assert_eq!(closed.len(), 2, "energy and all for the first hour");
        let energy = closed.iter().find(|r| r.key.topic == "energy").unwrap();
        assert_eq!((energy.counts.n, energy.counts.n_negative, energy.counts.n_positive), (2, 1, 1));
        assert!((energy.counts.mean_sentiment() + 0.2).abs() < 1e-9);
        assert!(energy.final_row && energy.end_ms == H);
    }

    #[test]
    fn the_rules_see_changed_windows_once_per_step_of_event_time_whatever_the_checkpoints_take() {
        const MIN: i64 = 60_000;
        let mut state = WindowState::new(spec(H, H, 0));
        state.put(10 * MIN, "energy", &[], "negative", -1.0);
        assert!(state.take_due_for_rules(10 * MIN, 0).is_empty(), "the first watermark crosses no step");
        // A checkpoint's live rows for the table do not take the rules' turn.
        state.put(12 * MIN, "energy", &[], "negative", -1.0);
        assert_eq!(state.take_updates(0).len(), 2);
        assert!(state.take_due_for_rules(10 * MIN, 0).is_empty(), "still the same step");
        state.put(19 * MIN, "trade", &[], "neutral", 0.0);
        assert!(state.take_due_for_rules(10 * MIN, 0).is_empty());
        state.put(20 * MIN, "trade", &[], "neutral", 0.0);
        let rows = state.take_due_for_rules(10 * MIN, 0);
        let mut topics: Vec<(&str, u64)> = rows.iter().map(|r| (r.key.topic.as_str(), r.counts.n)).collect();
        topics.sort();
        assert_eq!(topics, vec![("all", 4), ("energy", 2), ("trade", 2)], "every window changed since the last step");
        let mut restored: WindowState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        restored.put(25 * MIN, "trade", &[], "neutral", 0.0);
        assert!(restored.take_due_for_rules(10 * MIN, 0).is_empty(), "the step evaluated is checkpointed");
    }

    #[test]
    fn hopping_windows_count_each_event_size_over_slide_times() {
        let mut state = WindowState::new(spec(4 * H, H, 0));
        assert_eq!(state.put(5 * H + 1, "energy", &[], "negative", -1.0), Placed::Counted(4));
        let starts: Vec<i64> = state.open.keys().filter(|k| k.topic == "energy").map(|k| k.start_ms).collect();
        assert_eq!(starts, vec![2 * H, 3 * H, 4 * H, 5 * H]);
    }

    #[test]
    fn events_behind_closed_windows_are_late_and_not_counted() {
        let mut state = WindowState::new(spec(H, H, 10 * 60_000));
        state.put(2 * H + 20 * 60_000, "energy", &[], "neutral", 0.0);
        // Watermark is 2h10m: the windows ending at 1h and 2h are closed, the one ending at 3h is open.
        assert_eq!(state.put(30 * 60_000, "energy", &[], "negative", -1.0), Placed::Late);
        assert_eq!(state.put(H + 30 * 60_000, "energy", &[], "negative", -1.0), Placed::Late);
        assert_eq!(state.put(2 * H + 5 * 60_000, "energy", &[], "negative", -1.0), Placed::Counted(1));
        let all: u64 = state.open_counts().filter(|(k, _)| k.topic == ALL).map(|(_, c)| c.n).sum();
        assert_eq!(all, 2);
    }

    #[test]
    fn tickers_get_their_own_groups_across_topics() {
        let mut state = WindowState::new(WindowSpec { by_ticker: true, ..spec(H, H, 0) });
        let tickers = vec!["XOM".to_string(), "XOM".to_string(), "CVX".to_string()];
        state.put(1, "energy", &tickers, "negative", -1.0);
        let mut keys: Vec<(String, Option<String>)> = state.open.keys().map(|k| (k.topic.clone(), k.ticker.clone())).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                ("all".into(), None),
                ("all".into(), Some("CVX".into())),
                ("all".into(), Some("XOM".into())),
                ("energy".into(), None)
            ]
        );
    }

    #[test]
    fn live_rows_are_emitted_once_per_change_and_state_round_trips() {
        let mut state = WindowState::new(spec(H, H, 0));
        state.put(1, "energy", &[], "negative", -0.5);
        assert_eq!(state.take_updates(7).len(), 2);
        assert!(state.take_updates(8).is_empty());
        let json = serde_json::to_string(&state).unwrap();
        let restored: WindowState = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, state);
        let mut restored = restored;
        assert_eq!(restored.close_all(9).len(), 2);
    }

    #[test]
    fn each_window_keeps_its_most_negative_stories() {
        let mut state = WindowState::new(spec(H, H, 0));
        for (i, p) in [0.1f32, 0.9, 0.5, 0.95, 0.2, 0.7, 0.9].iter().enumerate() {
            state.add(&counted(&format!("s{i}"), 1, "energy", "neutral", 0.0, *p));
        }
        let rows = state.close_all(2);
        let top: Vec<&str> = rows[0].top.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(top, ["s3", "s1", "s6", "s5", "s2"], "by p_negative, ties by id");
    }

    #[test]
    fn the_watermark_follows_the_slowest_source_with_data_left_and_never_moves_back() {
        let mut state = WindowState::new(spec(H, H, 0));
        let add = |state: &mut WindowState, source: &str, t: i64| {
            let placed = state.add(&counted("s", t, "x", "neutral", 0.0, 0.5));
            state.advance(source, t);
            placed
        };
        add(&mut state, "p0", 10 * H);
        add(&mut state, "p1", H);
        assert_eq!(state.watermark_ms(), Some(10 * H), "a new source cannot move it back");
        // p0 is read ahead; p1 is behind with data left: its stories are not late.
        add(&mut state, "p0", 20 * H);
        assert_eq!(state.watermark_ms(), Some(10 * H));
        assert_eq!(add(&mut state, "p1", 11 * H), Placed::Counted(1));
        assert_eq!(state.watermark_ms(), Some(11 * H));
        // p1 has been read to its end: p0 alone moves the watermark, until p1 delivers again.
        state.set_caught_up("p1", true);
        assert_eq!(state.watermark_ms(), Some(20 * H));
        assert_eq!(add(&mut state, "p1", 12 * H), Placed::Late);
        add(&mut state, "p0", 30 * H);
        assert_eq!(state.watermark_ms(), Some(20 * H), "p1 delivered, so it holds the watermark again");
        // A source that moved to another consumer no longer counts.
        state.forget_source("p1");
        add(&mut state, "p0", 31 * H);
        assert_eq!(state.watermark_ms(), Some(31 * H));
        // A newly assigned partition with data left holds it until its first story, then its pace.
        state.set_caught_up("p2", false);
        add(&mut state, "p0", 40 * H);
        assert_eq!(state.watermark_ms(), Some(31 * H));
        assert_eq!(add(&mut state, "p2", 35 * H), Placed::Counted(1));
        assert_eq!(state.watermark_ms(), Some(35 * H));
        // One read to its end before it delivered anything (an empty partition) stops holding it.
        state.set_caught_up("p3", false);
        add(&mut state, "p2", 45 * H);
        assert_eq!(state.watermark_ms(), Some(35 * H));
        state.set_caught_up("p3", true);
        assert_eq!(state.watermark_ms(), Some(40 * H));
    }

    #[test]
    fn nothing_closes_while_an_assigned_partition_has_not_been_heard_from() {
        let mut state = WindowState::new(spec(H, H, 0));
        state.set_caught_up("p1", false);
        state.put(10 * H, "x", &[], "neutral", 0.0);
        assert_eq!(state.watermark_ms(), None);
        assert!(state.close_due(0).is_empty());
        assert_eq!(state.put(H, "x", &[], "neutral", 0.0), Placed::Counted(1), "still open: p1 holds it");
    }

    #[test]
    fn a_checkpoint_from_before_per_source_clocks_keeps_its_watermark() {
        let mut state = WindowState::new(spec(H, H, H));
        state.put(10 * H, "x", &[], "neutral", 0.0);
        let mut json: serde_json::Value = serde_json::to_value(&state).unwrap();
        json.as_object_mut().unwrap().retain(|k, _| k != "sources" && k != "watermark_ms");
        let mut restored: WindowState = serde_json::from_value(json).unwrap();
        assert_eq!(restored.watermark_ms(), None);
        restored.upgrade_restored();
        assert_eq!(restored.watermark_ms(), Some(9 * H));
    }

    #[test]
    fn sums_do_not_depend_on_arrival_order() {
        let scores = [0.1f32, -0.7, 0.333333, -0.25, 0.9];
        let mut a = WindowState::new(spec(H, H, H));
        let mut b = WindowState::new(spec(H, H, H));
        for s in scores {
            a.put(1, "x", &[], "neutral", s);
        }
        for s in scores.iter().rev() {
            b.put(1, "x", &[], "neutral", *s);
        }
        assert_eq!(a.open, b.open);
    }

    fn counted(id: &str, t: i64, topic: &str, sentiment: &str, score: f32, p_negative: f32) -> Counted {
        Counted { event_ms: t, topic: topic.into(), tickers: vec![], sentiment: sentiment.into(), sentiment_score: score, story: story(id, p_negative), cluster: 0 }
    }

    fn add(state: &mut WindowState, c: &Counted) {
        state.add(c);
        state.advance("p0", c.event_ms);
    }

    /// Instance b takes over partition s/0 (topic energy) from a's checkpoint: energy's windows
    /// and s/0's clock move; a's `all` stays with a; a partition of a third instance that has not
    /// caught up holds b's watermark until it moves.
    #[test]
    fn a_partitions_topics_move_with_their_windows_and_clock_and_other_partitions_hold_the_watermark() {
        let mut a = WindowState::new(spec(2 * H, H, 0));
        for (id, t, topic, source) in [("e1", 10, "energy", "s/0"), ("m1", 20, "metals", "s/1"), ("e2", H + 10, "energy", "s/0")] {
            a.add(&counted(id, t, topic, "negative", -0.9, 0.9));
            a.advance(source, t);
        }
        let mut b = WindowState::new(spec(2 * H, H, 0));
        b.add(&counted("t1", 30, "trade", "neutral", 0.0, 0.1));
        b.advance("s/2", 30);
        let energy = std::collections::BTreeSet::from(["energy".to_string()]);
        b.adopt(&a, &energy, "s/0");
        let topics = |s: &WindowState| s.open.keys().map(|k| (k.topic.clone(), k.start_ms)).collect::<Vec<_>>();
        assert!(topics(&b).contains(&("energy".into(), 0)) && topics(&b).contains(&("energy".into(), H)));
        assert!(!topics(&b).iter().any(|(t, _)| t == "metals"), "metals stays with its partition");
        let all = WindowKey { start_ms: 0, topic: ALL.into(), ticker: None };
        assert_eq!(b.open[&all].counts.n, 1, "b's `all` counts b's stories only");
        assert_eq!(b.sources["s/0"].max_event_ms, Some(H + 10), "the partition's clock came along");
        assert_eq!(b.watermark_ms(), Some(30), "the adopted partition is ahead of b's own");
        a.drop_topics(&energy);
        assert!(!topics(&a).iter().any(|(t, _)| t == "energy"));
        assert_eq!(a.open[&all].counts.n, 3, "a keeps what its `all` counted");

        // A third instance's partition, pending at 20 ms: b's watermark waits for it.
        let mut c = WindowState::new(spec(2 * H, H, 0));
        c.advance("s/3", 5);
        c.hold_for(BTreeMap::from([("s/4".to_string(), SourceClock { max_event_ms: Some(20), caught_up: false })]));
        c.advance("s/3", 3 * H);
        assert_eq!(c.watermark_ms(), Some(20), "held by the other instance's partition");
        c.hold_for(BTreeMap::from([("s/4".to_string(), SourceClock { max_event_ms: Some(3 * H), caught_up: false })]));
        assert_eq!(c.watermark_ms(), Some(3 * H));
        c.hold_for(BTreeMap::from([("s/3".to_string(), SourceClock { max_event_ms: Some(0), caught_up: false })]));
        assert_eq!(c.watermark_ms(), Some(3 * H), "its own partitions are its own word");
    }

    #[test]
    fn a_relabelled_story_moves_between_counts_in_open_windows() {
        let mut state = WindowState::new(spec(2 * H, H, 0));
        let was = counted("a", 10, "energy", "negative", -0.8, 0.9);
        add(&mut state, &was);
        add(&mut state, &counted("b", 20, "energy", "neutral", 0.0, 0.1));
        state.take_updates(0);
        let now = Counted { topic: "metals".into(), sentiment: "neutral".into(), sentiment_score: 0.0, story: story("a", 0.0), ..was.clone() };
        assert!(state.relabel(&was, &now, 5).is_empty(), "open windows change in place");
        let counts = |state: &WindowState, topic: &str| {
            state.open_counts().filter(|(k, _)| k.topic == topic).map(|(_, c)| (c.n, c.n_negative, c.sentiment_micros)).collect::<Vec<_>>()
        };
        assert_eq!(counts(&state, "energy"), vec![(1, 0, 0); 2]);
        assert_eq!(counts(&state, "metals"), vec![(1, 0, 0); 2]);
        assert_eq!(counts(&state, ALL), vec![(2, 0, 0); 2]);
        let updates = state.take_updates(6);
        assert_eq!(updates.len(), 6, "every window it left or joined shows a live row");
        let energy = updates.iter().find(|r| r.key.topic == "energy").unwrap();
        assert!(energy.top.iter().all(|h| h.id != "a"), "no longer among energy's most negative");
    }

    #[test]
    fn kept_closed_windows_get_revised_final_rows_and_the_rest_stay_final() {
        let mut state = WindowState::new(spec(H, H, 0));
        state.keep_closed(2);
        let old = counted("old", 10, "energy", "negative", -1.0, 0.9);
        let was = counted("a", H + 10, "energy", "negative", -1.0, 0.9);
        add(&mut state, &old);
        add(&mut state, &was);
        add(&mut state, &counted("c", 2 * H + 10, "energy", "neutral", 0.0, 0.1));
        assert_eq!(state.close_due(0).len(), 4, "two hours of energy and all");
        // Only the newest hour's closed windows are kept: the first hour's are gone for good.
        let now = Counted { sentiment: "positive".into(), sentiment_score: 1.0, story: story("a", 0.0), ..was.clone() };
        let revised = state.relabel(&was, &now, 9);
        assert_eq!(revised.iter().map(|r| r.key.topic.as_str()).collect::<Vec<_>>(), vec![ALL, "energy"]);
        let row = &revised[1];
        assert!(row.final_row && row.updated_ms == 9 && row.key.start_ms == H);
        assert_eq!((row.counts.n, row.counts.n_negative, row.counts.n_positive), (1, 0, 1));
        let old_now = Counted { sentiment: "neutral".into(), ..old.clone() };
        assert!(state.relabel(&old, &old_now, 10).is_empty());
    }

    /// Closed windows keep the folding of only the clusters a correction can still re-count; a
    /// correction of such a story revises them as it did with every cluster's entry kept.
    #[test]
    fn closed_windows_forget_the_folding_of_clusters_no_correction_can_reach() {
        let mut state = WindowState::new(spec(H, H, 0));
        state.keep_closed(10);
        let a = Counted { cluster: 1, ..counted("a", 10, "energy", "negative", -1.0, 0.9) };
        let copy_of_a = Counted { cluster: 1, ..counted("b", 20, "energy", "negative", -0.9, 0.8) };
        let other = Counted { cluster: 2, ..counted("c", 30, "energy", "neutral", 0.0, 0.1) };
        for story in [&a, &copy_of_a, &other, &counted("next", H + 10, "energy", "neutral", 0.0, 0.1)] {
            add(&mut state, story);
        }
        assert_eq!(state.close_due(0).len(), 2, "the first hour of energy and all");
        let mut kept_whole = state.clone();
        state.forget_folded_except(&std::collections::HashSet::from([1]));
        let clusters = |state: &WindowState| state.closed.values().flat_map(|w| w.folded.keys().copied()).collect::<Vec<_>>();
        assert_eq!((clusters(&kept_whole), clusters(&state)), (vec![1, 2, 1, 2], vec![1, 1]));
        let now = Counted { sentiment: "positive".into(), sentiment_score: 1.0, ..a.clone() };
        let revised = state.relabel(&a, &now, 9);
        assert_eq!(revised.len(), 2);
        assert_eq!((revised[0].counts.n, revised[0].counts.n_copies, revised[0].counts.n_positive), (2, 1, 1));
        assert_eq!(revised, kept_whole.relabel(&a, &now, 9));
    }

    /// A restart replays partitions in another interleaving: the copy that counts for a cluster is
    /// the smallest id, whichever arrived first, so the windows come out the same.
    #[test]
    fn which_copy_counts_does_not_depend_on_arrival_order() {
        let reading = crate::news::near::Reading { sentiment: [0.9, 0.1, 0.0], topic: "metals".into() };
        let copies: Vec<(&str, &str, f32, f32)> = vec![
            ("b", "negative", -0.9, 0.9),
            ("a", "neutral", -0.2, 0.4),
            ("c", "negative", -0.7, 0.8),
        ];
        let windows = |order: &[usize]| {
            let mut state = WindowState::new(spec(4 * H, H, 0));
            state.fold_copies(Some(Folding { near: None }));
            for &i in order {
                let (id, sentiment, score, p) = copies[i];
                let t = 10 * H + i as i64 * 60_000;
                let cluster = state.cluster_of(t, "Copper slumps as Chile mine strike ends", &reading);
                state.add(&Counted { cluster, ..counted(id, t, "metals", sentiment, score, p) });
            }
            let key = WindowKey { start_ms: 10 * H, topic: "metals".into(), ticker: None };
            let window = &state.open[&key];
            (window.counts.clone(), window.top.iter().map(|h| h.id.clone()).collect::<Vec<_>>())
        };
        let first = windows(&[0, 1, 2]);
        assert_eq!((first.0.n, first.0.n_neutral, first.0.n_copies), (1, 1, 2), "\"a\" counts, the others are copies");
        assert_eq!(first.1, vec!["a".to_string()]);
        for order in [[1, 0, 2], [2, 1, 0], [2, 0, 1], [0, 2, 1], [1, 2, 0]] {
            assert_eq!(windows(&order), first, "arrival order {order:?}");
        }
    }

    /// Twenty re-sends of one headline within a window are one story there; a relabel moves the
    /// counted story and leaves the copies copies; another window counts the story anew.
    #[test]
    fn copies_within_a_window_count_once_and_survive_a_relabel() {
        let mut state = WindowState::new(spec(4 * H, H, 0));
        state.fold_copies(Some(Folding { near: None }));
        let reading = crate::news::near::Reading { sentiment: [0.9, 0.1, 0.0], topic: "metals".into() };
        let mut stories = Vec::new();
        for i in 0..20 {
            let t = 10 * H + i * 60_000;
            let cluster = state.cluster_of(t, "Copper slumps as Chile mine strike ends", &reading);
            let story = Counted { cluster, ..counted(&format!("copy{i}"), t, "metals", "negative", -0.9, 0.9) };
            add(&mut state, &story);
            stories.push(story);
        }
        let other = Counted { cluster: state.cluster_of(10 * H, "Gold steady", &reading), ..counted("gold", 10 * H, "metals", "neutral", 0.0, 0.1) };
        add(&mut state, &other);
        let metals = |state: &WindowState| -> Vec<(u64, u64, u64)> {
            state.open_counts().filter(|(k, _)| k.topic == "metals").map(|(_, c)| (c.n, c.n_negative, c.n_copies)).collect()
        };
        assert_eq!(metals(&state), vec![(2, 1, 19); 4], "each of the 4 windows: 2 stories, 1 negative, 19 copies");
        let rows = state.snapshot(0);
        let batch = windows_batch(&rows).unwrap();
        let copies = batch.column_by_name("copies").unwrap().as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
        assert!(copies.iter().any(|c| c == Some(19)), "the column says how many were folded");
        let key = WindowKey { start_ms: 10 * H, topic: "metals".into(), ticker: None };
        assert_eq!(state.open[&key].top.len(), 2, "copies do not fill the most negative headlines");

        // An analyst says the text is neutral: every copy is relabelled, the counted one first.
        for story in &stories {
            let now = Counted { sentiment: "neutral".into(), sentiment_score: 0.0, ..story.clone() };
            state.relabel(story, &now, 1);
        }
        assert_eq!(metals(&state), vec![(2, 0, 19); 4]);
        // Moved to another topic: the story leaves metals with its copies and counts once in energy.
        for story in &stories {
            let was = Counted { sentiment: "neutral".into(), sentiment_score: 0.0, ..story.clone() };
            let now = Counted { topic: "energy".into(), ..was.clone() };
            state.relabel(&was, &now, 2);
        }
        assert_eq!(metals(&state), vec![(1, 0, 0); 4]);
        let energy: Vec<(u64, u64)> = state.open_counts().filter(|(k, _)| k.topic == "energy").map(|(_, c)| (c.n, c.n_copies)).collect();
        assert_eq!(energy, vec![(1, 19); 4]);
        // A window that starts after the first copies counts the first copy it holds as the story.
        let late = 13 * H + 30 * 60_000;
        let cluster = state.cluster_of(late, "Copper slumps as Chile mine strike ends", &reading);
        add(&mut state, &Counted { cluster, ..counted("copy-late", late, "energy", "neutral", 0.0, 0.1) });
        let by_start: Vec<(i64, u64, u64)> = state.open_counts().filter(|(k, _)| k.topic == "energy").map(|(k, c)| (k.start_ms / H, c.n, c.n_copies)).collect();
        assert!(by_start.contains(&(10, 1, 20)) && by_start.contains(&(11, 1, 0)) && by_start.contains(&(13, 1, 0)), "{by_start:?}");
    }
}

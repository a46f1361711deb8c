//! `[window]`: window size and slide, lateness, grouping and de-duplication.

use serde::Deserialize;

use crate::config::{FieldError, HumanDuration, within};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Topic,
    Ticker,
}

/// `[window]`: event-time windows. `slide` < `size` makes hopping windows; equal (the default), tumbling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    pub size: HumanDuration,
    pub slide: Option<HumanDuration>,
    /// The watermark trails the newest event time by this much; windows close when it passes their end.
    pub allowed_lateness: HumanDuration,
    /// `topic` always; add `ticker` for per-ticker rows. An `all` group is always computed.
    pub group_by: Vec<GroupBy>,
    /// Ids are remembered for this long in event time to drop replayed duplicates...
    pub dedup_horizon: HumanDuration,
    /// ...and at most this many of them.
    pub dedup_max_ids: usize,
    /// Copies of a story within a window (the same words, or a near-duplicate by the model's rule
    /// that only adds or drops words or changes numbers)
    /// count once there; the rest are in the `copies` column.
    pub fold_copies: bool,
}

impl Default for WindowConfig {
    fn default() -> Self {
        let d = |s| HumanDuration::parse(s).expect("valid default duration");
        WindowConfig {
            size: d("1h"),
            slide: None,
            allowed_lateness: d("5m"),
            group_by: vec![GroupBy::Topic],
            dedup_horizon: d("1d"),
            dedup_max_ids: 1_000_000,
            fold_copies: true,
        }
    }
}

/// Stories × windows is the work and memory of every story: `size / slide` beyond this is a typo.
pub const MAX_WINDOWS_PER_STORY: i64 = 1000;

impl WindowConfig {
    pub fn slide(&self) -> HumanDuration {
        self.slide.unwrap_or(self.size)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.size.as_millis() <= 0 {
            return Err(("window.size", "must be longer than 0".into()));
        }
        let slide = self.slide().as_millis();
        if slide <= 0 || slide > self.size.as_millis() || self.size.as_millis() % slide != 0 {
            return Err(("window.slide", format!("must be positive, at most `size` ({}), and divide it", self.size)));
        }
        let windows_per_story = self.size.as_millis() / slide;
        if windows_per_story > MAX_WINDOWS_PER_STORY {
            return Err((
                "window.slide",
                format!("`size` / `slide` is {windows_per_story} windows per story; at most {MAX_WINDOWS_PER_STORY} are allowed"),
            ));
        }
        within("window.dedup_max_ids", self.dedup_max_ids, 1, 100_000_000)?;
        if !self.group_by.contains(&GroupBy::Topic) {
            return Err(("window.group_by", "must include \"topic\"".into()));
        }
        Ok(())
    }
}

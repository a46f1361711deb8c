//! A topic's alert state moving with its partition between aggregate instances (see
//! `window::handover`): its closed windows kept as baseline and its alerts' lifecycles.

use std::collections::BTreeSet;

use super::{Detector, GroupKey};

fn in_topics(group: &GroupKey, topics: &BTreeSet<String>) -> bool {
    group.ticker.is_none() && topics.contains(&group.topic)
}

impl Detector {
    /// Forgets `topics`' baselines and alerts: another instance goes on with them.
    pub fn drop_topics(&mut self, topics: &BTreeSet<String>) {
        self.history.retain(|group, _| !in_topics(group, topics));
        self.tracked.retain(|(_, group), _| !in_topics(group, topics));
        self.slots = Default::default();
    }

    /// Goes on with `topics`' baselines and alerts as `donor` (another instance's checkpoint) left
    /// them, for the rules configured here: a firing alert stays one alert, resolved here.
    pub fn adopt(&mut self, donor: &Detector, topics: &BTreeSet<String>) {
        self.drop_topics(topics);
        self.history.extend(donor.history.iter().filter(|(group, _)| in_topics(group, topics)).map(|(g, h)| (g.clone(), h.clone())));
        let rules: BTreeSet<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        self.tracked.extend(
            donor
                .tracked
                .iter()
                .filter(|((rule, group), _)| in_topics(group, topics) && rules.contains(rule.as_str()))
                .map(|(key, tracked)| (key.clone(), tracked.clone())),
        );
    }
}

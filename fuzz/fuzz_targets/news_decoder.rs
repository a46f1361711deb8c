//! A Kafka message value as the source decodes it: a news object, and (role `aggregate`) the scores
//! it carries. Any bytes must give a story or an error with a kind, never a panic.
#![no_main]

use bearwatch::news::{News, Scores};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match News::from_json(data) {
        Ok(mut news) => {
            let _ = news.published_ms();
            let _ = news.classification_text(200);
            if let Ok(scores) = Scores::take_from(&mut news.extra) {
                assert!((0.0..=1.0).contains(&scores.p_negative) && (-1.0..=1.0).contains(&scores.sentiment_score));
            }
        }
        Err(e) => assert!(!e.kind().is_empty()),
    }
});

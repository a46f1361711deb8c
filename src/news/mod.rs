//! The incoming news message (`schemas/news.schema.json`) and its validation.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

pub mod near;
mod fields;

pub use fields::{Fields, NotFields};

/// Longest headline accepted, in characters.
pub const MAX_HEADLINE_CHARS: usize = 2000;
/// Longest story id accepted, in characters: de-duplication holds up to `dedup_max_ids` of them.
pub const MAX_ID_CHARS: usize = 256;
/// Most tickers one story may name: each is a window group when grouping by ticker, so this bounds
/// what one message can make the windows and rules hold.
pub const MAX_TICKERS: usize = 64;
/// Longest ticker accepted, in characters.
pub const MAX_TICKER_CHARS: usize = 32;
/// Longest topic label accepted, in a model's labels and in a scored message: each topic is a
/// window group and a line of every summary.
pub const MAX_TOPIC_CHARS: usize = 64;
/// Most topics a model may have, and most distinct topics role `aggregate` counts (their names come
/// from the scored messages it reads).
pub const MAX_TOPICS: usize = 256;
/// Longest `name@version` of a model accepted, in characters: every story carries it.
pub const MAX_MODEL_CHARS: usize = 128;

/// Why `label` cannot be a topic, model name or ticker (`None`: it can): blank, a control character, or
/// longer than `max` characters.
pub fn label_problem(label: &str, max: usize) -> Option<String> {
    let chars = label.chars().count();
    if label.chars().all(invisible) {
        Some("it is blank".into())
    } else if label.chars().any(control) {
        Some("it has a control character".into())
    } else if chars > max {
        Some(format!("it has {chars} characters, more than {max}"))
    } else {
        None
    }
}

/// Whitespace, and characters that print nothing (zero-width spaces and joiners, word joiner, BOM,
/// soft hyphen, bidi marks): a headline of only these has nothing to classify.
fn invisible(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{00ad}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

/// Characters that break a line or a header where ids and tickers end up (log lines, mail headers,
/// Alertmanager labels): C0 and C1 controls, and the Unicode line and paragraph separators.
fn control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

fn check_tickers(tickers: &[String]) -> Result<(), NewsError> {
    if tickers.len() > MAX_TICKERS {
        return Err(NewsError::Tickers(format!("it has {}", tickers.len())));
    }
    // The ticker itself is not quoted: it may be a megabyte long.
    match tickers.iter().find_map(|t| label_problem(t, MAX_TICKER_CHARS)) {
        Some(problem) => Err(NewsError::Tickers(format!("one ticker: {problem}"))),
        None => Ok(()),
    }
}

/// A validated news item. Fields outside the schema are kept in `extra`, exactly as written, and
/// serialize beside the others again (DESIGN §2: a scored story is the input fields plus scores).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct News {
    pub id: String,
    pub published_at: String,
    pub headline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tickers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(flatten)]
    pub extra: Fields,
}

/// Why a message is not valid news; the text goes into dead-letter headers and CLI error lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NewsError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("expected a JSON object")]
    NotAnObject,
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType { field: &'static str, expected: &'static str },
    #[error("field `published_at` is not an RFC 3339 timestamp: {0}")]
    BadTimestamp(String),
    #[error("field `id` must have 1 to {MAX_ID_CHARS} characters, has {0}")]
    IdLength(usize),
    #[error("field `id` has a control character (a line break, tab or other): {0:?}")]
    IdControl(String),
    #[error("field `headline` must have 1 to {MAX_HEADLINE_CHARS} characters, has {0}")]
    HeadlineLength(usize),
    #[error("field `headline` is blank: it has only whitespace or invisible characters")]
    BlankHeadline,
    #[error("field `tickers` must name at most {MAX_TICKERS} tickers of 1 to {MAX_TICKER_CHARS} visible characters: {0}")]
    Tickers(String),
}

impl NewsError {
    /// A short stable name for the `error.kind` header and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            NewsError::Json(_) => "json",
            NewsError::NotAnObject => "not_an_object",
            NewsError::Missing(_) => "missing_field",
            NewsError::WrongType { .. } => "wrong_type",
            NewsError::BadTimestamp(_) => "bad_timestamp",
            NewsError::IdLength(_) => "id_length",
            NewsError::IdControl(_) => "id_control",
            NewsError::HeadlineLength(_) => "headline_length",
            NewsError::BlankHeadline => "headline_blank",
            NewsError::Tickers(_) => "tickers",
        }
    }
}

/// A story with its scores: a row of table `news` and a message of `news.scored` (DESIGN §2).
#[derive(Debug, Clone, Serialize)]
pub struct ScoredNews {
    #[serde(flatten)]
    pub news: News,
    #[serde(flatten)]
    pub scores: Scores,
    pub ingested_at: String,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    #[serde(skip)]
    pub published_ms: i64,
    #[serde(skip)]
    pub ingested_ms: i64,
}

impl News {
    /// The bytes of its text fields: about what a row of it holds until it is written.
    pub fn bytes(&self) -> usize {
        let optional = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.id.len() + self.published_at.len() + self.headline.len() + optional(&self.body) + optional(&self.source) + optional(&self.url)
            + optional(&self.lang)
            + self.tickers.as_ref().map_or(0, |t| t.iter().map(String::len).sum())
            + self.extra.bytes()
    }

    /// Event time in milliseconds since the epoch; `published_at` was checked when the news was parsed.
    pub fn published_ms(&self) -> i64 {
        chrono::DateTime::parse_from_rfc3339(&self.published_at).map_or(0, |t| t.timestamp_millis())
    }

    /// What the classifier reads: the headline, then the first `body_chars` characters of the body
    /// with runs of whitespace collapsed (as `models/train/data.py` built the training text).
    pub fn classification_text(&self, body_chars: usize) -> String {
        let Some(body) = self.body.as_deref().filter(|_| body_chars > 0) else { return self.headline.clone() };
        // Only as much of the body as the lead takes is read: a body may be far longer.
        let mut lead = String::new();
        let mut chars = 0;
        for word in body.split_whitespace() {
            if chars >= body_chars {
                break;
            }
            if !lead.is_empty() {
                lead.push(' ');
                chars += 1;
            }
            for c in word.chars().take(body_chars.saturating_sub(chars)) {
                lead.push(c);
                chars += 1;
            }
        }
        if lead.is_empty() {
            return self.headline.clone();
        }
        format!("{} {lead}", self.headline)
    }

    pub fn from_json(bytes: &[u8]) -> Result<News, NewsError> {
        match Fields::parse(bytes) {
            Ok(fields) => News::from_fields(fields),
            Err(NotFields::Json(e)) => Err(NewsError::Json(e)),
            Err(NotFields::NotAnObject) => Err(NewsError::NotAnObject),
        }
    }

    /// The schema's fields taken out of `map`; what is left is `extra`.
    pub fn from_fields(mut map: Fields) -> Result<News, NewsError> {
        let id = required_string(&mut map, "id")?;
        let id_chars = id.chars().count();
        if id_chars == 0 || id_chars > MAX_ID_CHARS {
            return Err(NewsError::IdLength(id_chars));
        }
        if id.chars().any(control) {
            return Err(NewsError::IdControl(id));
        }
        let published_at = required_string(&mut map, "published_at")?;
        chrono::DateTime::parse_from_rfc3339(&published_at)
            .map_err(|e| NewsError::BadTimestamp(format!("{published_at:?}: {e}")))?;
        let headline = required_string(&mut map, "headline")?;
        let chars = headline.chars().count();
        if chars > MAX_HEADLINE_CHARS {
            return Err(NewsError::HeadlineLength(chars));
        }
        if headline.chars().all(invisible) {
            return Err(NewsError::BlankHeadline);
        }
        let tickers = match map.take("tickers") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .into_iter()
                    .map(|t| match t {
                        Value::String(s) => Ok(s),
                        _ => Err(NewsError::WrongType { field: "tickers", expected: "an array of strings" }),
                    })
                    .collect::<Result<Vec<String>, _>>()?,
            ),
            Some(_) => return Err(NewsError::WrongType { field: "tickers", expected: "an array of strings" }),
        };
        if let Some(tickers) = &tickers {
            check_tickers(tickers)?;
        }
        Ok(News {
            id,
            published_at,
            headline,
            body: optional_string(&mut map, "body")?,
            source: optional_string(&mut map, "source")?,
            tickers,
            url: optional_string(&mut map, "url")?,
            lang: optional_string(&mut map, "lang")?,
            extra: map,
        })
    }
}

fn required_string(map: &mut Fields, field: &'static str) -> Result<String, NewsError> {
    optional_string(map, field)?.ok_or(NewsError::Missing(field))
}

fn optional_string(map: &mut Fields, field: &'static str) -> Result<Option<String>, NewsError> {
    match map.take(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(NewsError::WrongType { field, expected: "a string" }),
    }
}

/// What the classifier says about one text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub topic: String,
    #[serde(serialize_with = "six_decimals")]
    pub topic_score: f32,
    pub sentiment: &'static str,
    #[serde(serialize_with = "six_decimals")]
    pub p_negative: f32,
    #[serde(serialize_with = "six_decimals")]
    pub p_neutral: f32,
    #[serde(serialize_with = "six_decimals")]
    pub p_positive: f32,
    /// `p_positive − p_negative`, in [−1, 1].
    #[serde(serialize_with = "six_decimals")]
    pub sentiment_score: f32,
    /// `name@version` of the model that produced these scores.
    pub model: Arc<str>,
}

impl Scores {
    /// The scores a `news.scored` message carries (DESIGN §2), taken out of the story's other fields.
    pub fn take_from(fields: &mut Fields) -> Result<Scores, String> {
        let mut text = |name: &str| match fields.take(name) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(format!("scored news needs `{name}` as a string")),
        };
        let topic = text("topic")?;
        let sentiment = text("sentiment")?;
        let model = text("model")?;
        let start = |value: &str| value.chars().take(40).collect::<String>();
        if let Some(problem) = label_problem(&topic, MAX_TOPIC_CHARS) {
            return Err(format!("`topic` (starting {:?}) cannot be a topic: {problem}", start(&topic)));
        }
        if let Some(problem) = label_problem(&model, MAX_MODEL_CHARS) {
            return Err(format!("`model` (starting {:?}) cannot be a model's name@version: {problem}", start(&model)));
        }
        let sentiment = SENTIMENTS
            .into_iter()
            .find(|s| *s == sentiment)
            .ok_or_else(|| format!("`sentiment` must be one of {SENTIMENTS:?}, not {sentiment:?}"))?;
        let mut probability = |name: &str, low: f32| match fields.take(name).and_then(|v| v.as_f64()) {
            Some(p) if (f64::from(low)..=1.0).contains(&p) => Ok(p as f32),
            _ => Err(format!("scored news needs `{name}` as a number in [{low}, 1]")),
        };
        Ok(Scores {
            topic,
            topic_score: probability("topic_score", 0.0)?,
            sentiment,
            p_negative: probability("p_negative", 0.0)?,
            p_neutral: probability("p_neutral", 0.0)?,
            p_positive: probability("p_positive", 0.0)?,
            sentiment_score: probability("sentiment_score", -1.0)?,
            model: Arc::from(model),
        })
    }
}

/// One word of a scored text and what it does to its negativity: an explanation's unit
/// (`bearwatch classify --explain`, an alert's headlines).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Why {
    pub word: String,
    /// Its place among the text's whitespace-separated words, from 0 (a word can occur twice).
    pub position: usize,
    /// p_negative of the text minus p_negative of the text without this word: positive when the
    /// word makes the text read more negative.
    #[serde(serialize_with = "six_decimals")]
    pub effect: f32,
}

/// Probabilities are written with six decimals: enough to compare, without float noise in every line.
pub(crate) fn six_decimals<S: serde::Serializer>(value: &f32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((f64::from(*value) * 1e6).round() / 1e6)
}

pub const SENTIMENTS: [&str; 3] = ["negative", "neutral", "positive"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unknown_fields_in_extra() {
        let news = News::from_json(
            br#"{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":"Oil falls","tickers":["XOM"],"desk":"energy"}"#,
        )
        .unwrap();
        assert_eq!(news.tickers.as_deref(), Some(&["XOM".to_string()][..]));
        assert_eq!(news.extra.get("desk"), Some(Value::String("energy".into())));
    }

    /// DESIGN §2: a scored story is the input fields plus scores, so role `aggregate` reads back
    /// what role `classify` read, however large its numbers.
    #[test]
    fn unknown_fields_pass_through_a_scored_message_exactly() {
        let input = br#"{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":"Oil falls","desk":"energy",
            "seq": 123456789012345678901234567890, "meta": {"x": 1.50, "ids": [18446744073709551616]}}"#;
        let news = News::from_json(input).unwrap();
        let kept = r#"{"desk":"energy","seq":123456789012345678901234567890,"meta":{"x":1.50,"ids":[18446744073709551616]}}"#;
        assert_eq!(news.extra.to_json(), kept);
        let scores = Scores {
            topic: "energy".into(),
            topic_score: 0.9,
            sentiment: "negative",
            p_negative: 0.8,
            p_neutral: 0.15,
            p_positive: 0.05,
            sentiment_score: -0.75,
            model: Arc::from("m@1"),
        };
        let scored = ScoredNews {
            news,
            scores: scores.clone(),
            ingested_at: "2024-01-02T03:04:06Z".into(),
            kafka_partition: Some(0),
            kafka_offset: Some(7),
            published_ms: 0,
            ingested_ms: 0,
        };
        let message = serde_json::to_vec(&scored).unwrap();
        let mut back = News::from_json(&message).unwrap();
        assert_eq!(Scores::take_from(&mut back.extra).unwrap(), scores);
        for added in ["ingested_at", "kafka_partition", "kafka_offset"] {
            assert!(back.extra.take(added).is_some(), "{added} missing from {}", String::from_utf8_lossy(&message));
        }
        assert_eq!(back, scored.news);
        assert_eq!(back.extra.to_json(), kept);
    }

    /// A scored message's topic becomes a window group and its model name rides on every row, so
    /// both are bounded like a model's own labels.
    #[test]
    fn a_scored_topic_or_model_that_no_model_could_give_is_refused() {
        let scored = |topic: &str, model: &str| {
            let message = serde_json::json!({"id": "a", "published_at": "2024-01-02T03:04:05Z", "headline": "Oil falls",
                "topic": topic, "topic_score": 0.9, "sentiment": "negative", "p_negative": 0.8, "p_neutral": 0.15,
                "p_positive": 0.05, "sentiment_score": -0.75, "model": model});
            Scores::take_from(&mut News::from_json(message.to_string().as_bytes()).unwrap().extra)
        };
        assert_eq!(scored(&"e".repeat(MAX_TOPIC_CHARS), "m@1").unwrap().topic.len(), MAX_TOPIC_CHARS);
        let long = scored(&format!("energy{}", "x".repeat(60_000)), "m@1").unwrap_err();
        assert!(long.contains("60006 characters, more than 64") && long.len() < 200, "{long}");
        assert!(scored(" \u{200b}", "m@1").unwrap_err().contains("blank"));
        assert!(scored("energy\nFAKE LOG LINE", "m@1").unwrap_err().contains("control character"));
        let model = scored("energy", &"m".repeat(MAX_MODEL_CHARS + 1)).unwrap_err();
        assert!(model.contains("`model`") && model.contains("more than 128"), "{model}");
    }

    #[test]
    fn classification_text_adds_a_collapsed_body_lead() {
        let mut news = News::from_json(
            br#"{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":"OIL FALLS","body":"Crude  prices\n fell sharply today."}"#,
        )
        .unwrap();
        assert_eq!(news.classification_text(0), "OIL FALLS");
        assert_eq!(news.classification_text(13), "OIL FALLS Crude prices ");
        assert_eq!(news.classification_text(1000), "OIL FALLS Crude prices fell sharply today.");
        news.body = Some("  ".into());
        assert_eq!(news.classification_text(50), "OIL FALLS");
        // Reading only the lead gives what collapsing the whole body and cutting it gave.
        let whole = |body: &str, n: usize| {
            let collapsed = body.split_whitespace().collect::<Vec<_>>().join(" ");
            if collapsed.is_empty() { "OIL FALLS".to_string() } else { format!("OIL FALLS {}", collapsed.chars().take(n).collect::<String>()) }
        };
        for body in [" a  bc\td  é\n\nfgh ", "word", "  lead and trail  ", "ünïcødé   wörds here"] {
            news.body = Some(body.into());
            for n in 1..25 {
                assert_eq!(news.classification_text(n), whole(body, n), "{body:?} {n}");
            }
        }
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let cases: [(&[u8], NewsError); 8] = [
            (b"{", NewsError::Json(String::new())),
            (b"[1]", NewsError::NotAnObject),
            (br#"{"published_at":"2024-01-02T03:04:05Z","headline":"x"}"#, NewsError::Missing("id")),
            (br#"{"id":1,"published_at":"2024-01-02T03:04:05Z","headline":"x"}"#, NewsError::WrongType { field: "id", expected: "a string" }),
            (br#"{"id":"a","published_at":"yesterday","headline":"x"}"#, NewsError::BadTimestamp(String::new())),
            (br#"{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":"  "}"#, NewsError::BlankHeadline),
            ("{\"id\":\"a\",\"published_at\":\"2024-01-02T03:04:05Z\",\"headline\":\"\u{200b}\u{feff} \u{2060}\"}".as_bytes(), NewsError::BlankHeadline),
            (br#"{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":""}"#, NewsError::BlankHeadline),
        ];
        for (input, expected) in cases {
            let err = News::from_json(input).unwrap_err();
            assert_eq!(err.kind(), expected.kind(), "{}", String::from_utf8_lossy(input));
        }
        assert!(News::from_json(br#"{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":" x "}"#).is_ok());
        let long = format!(r#"{{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":"{}"}}"#, "x".repeat(2001));
        assert_eq!(News::from_json(long.as_bytes()).unwrap_err(), NewsError::HeadlineLength(2001));
        let long_id = format!(r#"{{"id":"{}","published_at":"2024-01-02T03:04:05Z","headline":"x"}}"#, "i".repeat(MAX_ID_CHARS + 1));
        assert_eq!(News::from_json(long_id.as_bytes()).unwrap_err(), NewsError::IdLength(MAX_ID_CHARS + 1));
        assert_eq!(News::from_json(br#"{"id":"","published_at":"2024-01-02T03:04:05Z","headline":"x"}"#).unwrap_err(), NewsError::IdLength(0));
    }

    #[test]
    fn tickers_are_bounded_in_number_and_length() {
        let story = |tickers: &[String]| format!(r#"{{"id":"a","published_at":"2024-01-02T03:04:05Z","headline":"x","tickers":{}}}"#, serde_json::to_string(tickers).unwrap());
        let many: Vec<String> = (0..MAX_TICKERS).map(|i| format!("T{i}")).collect();
        assert_eq!(News::from_json(story(&many).as_bytes()).unwrap().tickers.map(|t| t.len()), Some(MAX_TICKERS));
        let too_many: Vec<String> = (0..=MAX_TICKERS).map(|i| format!("T{i}")).collect();
        let err = News::from_json(story(&too_many).as_bytes()).unwrap_err();
        assert_eq!((err.kind(), err.to_string().ends_with(&format!("it has {}", MAX_TICKERS + 1))), ("tickers", true), "{err}");
        let long = News::from_json(story(&["X".repeat(MAX_TICKER_CHARS + 1)]).as_bytes()).unwrap_err();
        assert!(long.to_string().ends_with("one ticker: it has 33 characters, more than 32"), "{long}");
        assert!(News::from_json(story(&["Ü".repeat(MAX_TICKER_CHARS)]).as_bytes()).is_ok(), "characters, not bytes");
        assert_eq!(News::from_json(story(&["XOM".into(), " ".into()]).as_bytes()).unwrap_err(), NewsError::Tickers("one ticker: it is blank".into()));
        for forged in ["XOM\r\nBcc: x@example.com", "A\u{0}B", "A\u{85}B", "A\u{2028}B", "A\tB"] {
            let err = News::from_json(story(&["XOM".into(), forged.into()]).as_bytes()).unwrap_err();
            assert!(err.kind() == "tickers" && err.to_string().ends_with("one ticker: it has a control character"), "{forged:?}: {err}");
        }
    }

    #[test]
    fn ids_with_control_characters_are_refused() {
        for id in ["a\r\nb", "a\u{1b}[31mb", "a\u{2029}"] {
            let json = format!(r#"{{"id":{},"published_at":"2024-01-02T03:04:05Z","headline":"x"}}"#, serde_json::to_string(id).unwrap());
            let err = News::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), "id_control", "{id:?}");
        }
    }
}

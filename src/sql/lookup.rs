//! What the feedback endpoints and `feedback import` look up before they write: the stories and
//! alerts a judgement names, and the earlier judgements it supersedes. Filters are built as
//! expressions, not as SQL text, so an id can hold any character.

use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float32Type, TimestampMillisecondType};
use datafusion::prelude::{Expr, SessionContext, col, lit};

use super::{SqlError, classify};
use crate::feedback::{Head, Story, TrainingLabel};

/// Which label won, for each text and head: the newest judgement that no other supersedes, unless
/// it is `unsure`. docs/SQL.md shows the same query for people.
pub const WINNING_LABELS: &str = "SELECT text, head, analyst_label AS label, analyst, created_at, feedback_id, story_id \
    FROM (SELECT *, row_number() OVER (PARTITION BY text_hash, head ORDER BY created_at DESC, feedback_id DESC) AS newest \
          FROM label_feedback \
          WHERE feedback_id NOT IN (SELECT supersedes FROM label_feedback WHERE supersedes IS NOT NULL)) \
    WHERE newest = 1 AND action <> 'unsure' ORDER BY created_at, feedback_id";

fn strings(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>, SqlError> {
    let column = batch.column_by_name(name).ok_or_else(|| SqlError::Execution(format!("no column {name}")))?;
    let utf8 = cast(column, &DataType::Utf8).map_err(|e| SqlError::Execution(e.to_string()))?;
    Ok(utf8.as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect())
}

fn floats(batch: &RecordBatch, name: &str) -> Result<Vec<Option<f32>>, SqlError> {
    let column = batch.column_by_name(name).ok_or_else(|| SqlError::Execution(format!("no column {name}")))?;
    Ok(column.as_primitive::<Float32Type>().iter().collect())
}

fn head(name: Option<&str>) -> Head {
    if name == Some("topic") { Head::Topic } else { Head::Sentiment }
}

/// A UTC millisecond timestamp as a literal to compare `published_at` and the like with.
pub fn timestamp(ms: i64) -> Expr {
    lit(datafusion::scalar::ScalarValue::TimestampMillisecond(Some(ms), Some("UTC".into())))
}

fn any_of(column: &str, values: &[String]) -> Expr {
    col(column).in_list(values.iter().map(|v| lit(v.clone())).collect(), false)
}

/// Rows of `table` where `filter` holds, newest `order` last.
async fn rows(ctx: &SessionContext, table: &str, filter: Expr, order: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let frame = ctx.table(table).await.map_err(classify)?;
    let frame = frame.filter(filter).map_err(classify)?.sort(vec![col(order).sort(true, true)]).map_err(classify)?;
    frame.collect().await.map_err(classify)
}

/// The stories with these ids in the `news` table (its newest row when a story was stored twice).
pub async fn stories(ctx: &SessionContext, ids: &[String]) -> Result<BTreeMap<String, Story>, SqlError> {
    let mut found = BTreeMap::new();
    if ids.is_empty() {
        return Ok(found);
    }
    for batch in rows(ctx, "news", any_of("id", ids), "ingested_at").await? {
        let (id, headline, model) = (strings(&batch, "id")?, strings(&batch, "headline")?, strings(&batch, "model")?);
        let (sentiment, topic) = (strings(&batch, "sentiment")?, strings(&batch, "topic")?);
        let (topic_score, negative, neutral, positive) =
            (floats(&batch, "topic_score")?, floats(&batch, "p_negative")?, floats(&batch, "p_neutral")?, floats(&batch, "p_positive")?);
        for i in 0..batch.num_rows() {
            let sentiment = sentiment[i].clone().unwrap_or_default();
            let sentiment_score = match sentiment.as_str() {
                "negative" => negative[i],
                "neutral" => neutral[i],
                _ => positive[i],
            };
            let story = Story {
                id: id[i].clone().unwrap_or_default(),
                headline: headline[i].clone().unwrap_or_default(),
                model: model[i].clone().unwrap_or_default(),
                sentiment,
                sentiment_score: sentiment_score.unwrap_or_default(),
                topic: topic[i].clone().unwrap_or_default(),
                topic_score: topic_score[i].unwrap_or_default(),
            };
            found.insert(story.id.clone(), story);
        }
    }
    Ok(found)
}

/// The rule of each of these alerts, from the `alerts` table.
pub async fn alert_rules(ctx: &SessionContext, alert_ids: &[String]) -> Result<BTreeMap<String, String>, SqlError> {
    let mut rules = BTreeMap::new();
    if alert_ids.is_empty() {
        return Ok(rules);
    }
    for batch in rows(ctx, "alerts", any_of("alert_id", alert_ids), "recorded_at").await? {
        let (id, rule) = (strings(&batch, "alert_id")?, strings(&batch, "rule")?);
        for i in 0..batch.num_rows() {
            rules.insert(id[i].clone().unwrap_or_default(), rule[i].clone().unwrap_or_default());
        }
    }
    Ok(rules)
}

/// `analyst`'s newest verdict on each of these alerts: what a new verdict of theirs supersedes.
pub async fn latest_verdicts(ctx: &SessionContext, alert_ids: &[String], analyst: &str) -> Result<BTreeMap<String, String>, SqlError> {
    let mut latest = BTreeMap::new();
    if alert_ids.is_empty() {
        return Ok(latest);
    }
    let filter = any_of("alert_id", alert_ids).and(col("analyst").eq(lit(analyst.to_string())));
    for batch in rows(ctx, "alert_verdicts", filter, "created_at").await? {
        let (alert, id) = (strings(&batch, "alert_id")?, strings(&batch, "verdict_id")?);
        for i in 0..batch.num_rows() {
            latest.insert(alert[i].clone().unwrap_or_default(), id[i].clone().unwrap_or_default());
        }
    }
    Ok(latest)
}

/// The training-ready set ([`WINNING_LABELS`]): one label per text and head.
pub async fn winning_labels(ctx: &SessionContext) -> Result<Vec<TrainingLabel>, SqlError> {
    let mut labels = Vec::new();
    for batch in super::run(ctx, WINNING_LABELS).await? {
        let (text, head_name, label, analyst) =
            (strings(&batch, "text")?, strings(&batch, "head")?, strings(&batch, "label")?, strings(&batch, "analyst")?);
        let (id, story) = (strings(&batch, "feedback_id")?, strings(&batch, "story_id")?);
        let created = batch.column_by_name("created_at").ok_or_else(|| SqlError::Execution("no column created_at".into()))?;
        let created = created.as_primitive::<TimestampMillisecondType>();
        for i in 0..batch.num_rows() {
            labels.push(TrainingLabel {
                text: text[i].clone().unwrap_or_default(),
                head: head(head_name[i].as_deref()),
                label: label[i].clone().unwrap_or_default(),
                analyst: analyst[i].clone().unwrap_or_default(),
                created_at: chrono::DateTime::from_timestamp_millis(created.value(i)).unwrap_or_default(),
                feedback_id: id[i].clone().unwrap_or_default(),
                story_id: story[i].clone(),
            });
        }
    }
    Ok(labels)
}

/// The scored stories of `table` (`news` or `shadow_news`) where `filter` holds, as the windows
/// count them, with the model that scored each; oldest `ingested_at` first, so that the last of an
/// id is its newest score.
pub async fn scored_stories(ctx: &SessionContext, table: &str, filter: Expr) -> Result<Vec<(String, crate::detect::replay::Story)>, SqlError> {
    let mut found = Vec::new();
    for batch in rows(ctx, table, filter, "ingested_at").await? {
        let (id, headline, model) = (strings(&batch, "id")?, strings(&batch, "headline")?, strings(&batch, "model")?);
        let (sentiment, topic) = (strings(&batch, "sentiment")?, strings(&batch, "topic")?);
        let (score, negative) = (floats(&batch, "sentiment_score")?, floats(&batch, "p_negative")?);
        let published = times(&batch, "published_at")?;
        let tickers = batch.column_by_name("tickers").ok_or_else(|| SqlError::Execution("no column tickers".into()))?;
        let tickers = tickers.as_list::<i32>();
        for i in 0..batch.num_rows() {
            let tickers = if tickers.is_null(i) {
                Vec::new()
            } else {
                tickers.value(i).as_string::<i32>().iter().flatten().map(str::to_string).collect()
            };
            found.push((
                model[i].clone().unwrap_or_default(),
                crate::detect::replay::Story {
                    id: id[i].clone().unwrap_or_default(),
                    published_ms: published[i].unwrap_or_default(),
                    headline: headline[i].clone().unwrap_or_default(),
                    topic: topic[i].clone().unwrap_or_default(),
                    tickers,
                    sentiment: sentiment[i].clone().unwrap_or_default(),
                    sentiment_score: score[i].unwrap_or_default(),
                    p_negative: negative[i].unwrap_or_default(),
                },
            ));
        }
    }
    Ok(found)
}

/// An alert an analyst judged: its newest verdict, and where and when it fired.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgedAlert {
    pub alert_id: String,
    pub verdict: String,
    pub rule: String,
    pub topic: String,
    pub ticker: Option<String>,
    pub started_ms: i64,
    /// None while it was still firing.
    pub resolved_ms: Option<i64>,
}

fn times(batch: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>, SqlError> {
    let column = batch.column_by_name(name).ok_or_else(|| SqlError::Execution(format!("no column {name}")))?;
    Ok(column.as_primitive::<TimestampMillisecondType>().iter().collect())
}

/// Every judged alert, with its newest verdict (any analyst's).
pub async fn judged_alerts(ctx: &SessionContext) -> Result<Vec<JudgedAlert>, SqlError> {
    let mut verdicts = BTreeMap::new();
    for batch in rows(ctx, "alert_verdicts", lit(true), "created_at").await? {
        let (id, verdict) = (strings(&batch, "alert_id")?, strings(&batch, "verdict")?);
        for i in 0..batch.num_rows() {
            verdicts.insert(id[i].clone().unwrap_or_default(), verdict[i].clone().unwrap_or_default());
        }
    }
    let ids: Vec<String> = verdicts.keys().cloned().collect();
    let mut judged: BTreeMap<String, JudgedAlert> = BTreeMap::new();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    for batch in rows(ctx, "alerts", any_of("alert_id", &ids), "recorded_at").await? {
        let (id, rule, topic, ticker) = (strings(&batch, "alert_id")?, strings(&batch, "rule")?, strings(&batch, "topic")?, strings(&batch, "ticker")?);
        let (started, resolved) = (times(&batch, "started_at")?, times(&batch, "resolved_at")?);
        for i in 0..batch.num_rows() {
            let alert_id = id[i].clone().unwrap_or_default();
            let entry = judged.entry(alert_id.clone()).or_insert_with(|| JudgedAlert {
                verdict: verdicts.get(&alert_id).cloned().unwrap_or_default(),
                alert_id,
                rule: rule[i].clone().unwrap_or_default(),
                topic: topic[i].clone().unwrap_or_default(),
                ticker: ticker[i].clone(),
                started_ms: started[i].unwrap_or_default(),
                resolved_ms: None,
            });
            entry.resolved_ms = entry.resolved_ms.or(resolved[i]);
        }
    }
    Ok(judged.into_values().collect())
}

/// An event analysts say should have raised an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Missed {
    pub topic: Option<String>,
    pub ticker: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
}

pub async fn missed_events(ctx: &SessionContext) -> Result<Vec<Missed>, SqlError> {
    let mut found = Vec::new();
    for batch in rows(ctx, "missed_events", lit(true), "created_at").await? {
        let (topic, ticker, from, to) = (strings(&batch, "topic")?, strings(&batch, "ticker")?, times(&batch, "from")?, times(&batch, "to")?);
        for i in 0..batch.num_rows() {
            found.push(Missed { topic: topic[i].clone(), ticker: ticker[i].clone(), from_ms: from[i].unwrap_or_default(), to_ms: to[i].unwrap_or_default() });
        }
    }
    Ok(found)
}

//! `bearwatch classify`: JSON lines in, exactly one scored JSON line out per input line, in order.

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Classifier, ClassifyError, Pending, PendingExplanation};
use crate::news::{Fields, News, NotFields};

/// Longest input line read; a news message is a few KiB, so anything longer is refused, not buffered.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// What a run saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LineStats {
    pub lines: u64,
    pub errors: u64,
}

/// One output line: an error known at once, or an item waiting for its batch.
enum Slot {
    Failed(Value),
    Waiting { line: u64, fields: Fields, pending: Waiting },
}

enum Waiting {
    Scores(Pending),
    Explanation(PendingExplanation),
}

/// Reads news objects (or `{"text": …}`) and writes each with its scores added (and, with
/// `explain`, `why`: each word's effect on p_negative, strongest first). A bad line becomes
/// `{"error": …, "line": N}` and the run goes on. Reading, tokenizing and queueing run ahead of the
/// writer (bounded by the classifier's `max_queued`), so the model is never idle waiting for input.
pub async fn classify_lines(
    classifier: &Classifier,
    mut input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    read_ahead: usize,
    body_chars: usize,
    explain: bool,
) -> std::io::Result<LineStats> {
    let (tx, mut rx) = mpsc::channel::<Slot>(read_ahead.max(1));
    let reader = async move {
        let mut buf = Vec::new();
        let mut line = 0u64;
        loop {
            buf.clear();
            if (&mut input).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
            line += 1;
            let too_long = buf.len() > MAX_LINE_BYTES && !buf.ends_with(b"\n");
            if too_long {
                skip_line(&mut input).await?;
            }
            let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let parsed = if too_long {
                Err(format!("line is longer than {MAX_LINE_BYTES} bytes"))
            } else {
                parse(text, body_chars)
            };
            let slot = match parsed {
                Ok((fields, to_classify)) => {
                    let pending = if explain {
                        classifier.submit_explain(&to_classify).await.map(Waiting::Explanation)
                    } else {
                        classifier.submit(&to_classify).await.map(Waiting::Scores)
                    };
                    match pending {
                        Ok(pending) => Slot::Waiting { line, fields, pending },
                        Err(e) => Slot::Failed(error_line(line, &e)),
                    }
                }
                Err(message) => Slot::Failed(error_line(line, &message)),
            };
            if tx.send(slot).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async {
        let mut stats = LineStats::default();
        while let Some(slot) = rx.recv().await {
            stats.lines += 1;
            let value = match slot {
                Slot::Failed(error) => Err(error),
                Slot::Waiting { line, mut fields, pending } => {
                    let outcome = match pending {
                        Waiting::Scores(pending) => pending.scores().await.map(|scores| (scores, None)),
                        Waiting::Explanation(pending) => pending.explained().await.map(|e| (e.scores, Some(e.why))),
                    };
                    match outcome {
                        Ok((scores, why)) => {
                            if let Value::Object(scored) = json!(scores) {
                                for (key, value) in &scored {
                                    fields.set(key, value);
                                }
                            }
                            if let Some(why) = why {
                                fields.set("why", &json!(why));
                            }
                            Ok(fields)
                        }
                        Err(e) => Err(error_line(line, &e)),
                    }
                }
            };
            stats.errors += u64::from(value.is_err());
            let mut bytes = match value {
                Ok(fields) => serde_json::to_vec(&fields),
                Err(error) => serde_json::to_vec(&error),
            }
            .map_err(std::io::Error::other)?;
            bytes.push(b'\n');
            output.write_all(&bytes).await?;
        }
        output.flush().await?;
        Ok::<_, std::io::Error>(stats)
    };
    let (read, stats) = tokio::join!(reader, writer);
    read?;
    stats
}

/// Discards input up to and including the next newline.
async fn skip_line(input: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<()> {
    loop {
        let chunk = input.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                input.consume(end + 1);
                return Ok(());
            }
            None => {
                let len = chunk.len();
                input.consume(len);
            }
        }
    }
}

fn error_line(line: u64, error: &dyn std::fmt::Display) -> Value {
    json!({ "error": error.to_string(), "line": line })
}

/// The fields to echo and the text to classify: `text` if present, else a valid news object's
/// headline (with `body_chars` of its body).
fn parse(raw: &[u8], body_chars: usize) -> Result<(Fields, String), String> {
    let fields = Fields::parse(raw).map_err(|e| match e {
        _ if raw.iter().all(u8::is_ascii_whitespace) => "empty line".to_string(),
        NotFields::Json(e) => format!("not valid JSON: {e}"),
        NotFields::NotAnObject => "expected a JSON object".to_string(),
    })?;
    match fields.get("text") {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok((fields, text)),
        Some(Value::String(_)) => Err(ClassifyError::EmptyText.to_string()),
        Some(_) => Err("field `text` must be a string".into()),
        None => {
            let news = News::from_fields(fields.clone()).map_err(|e| e.to_string())?;
            Ok((fields, news.classification_text(body_chars)))
        }
    }
}

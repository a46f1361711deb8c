//! Token-budget dynamic batching, after Hugging Face TEI.
//!
//! Callers tokenize on their own tasks and queue token ids; one thread owns the model and forms each
//! batch from whatever is queued the moment the model is free. A batch always takes the oldest item
//! (so nothing starves), then the queued items closest to it in length (so little is padding), as
//! long as rows × longest row stays within `max_batch_tokens` and rows within `max_batch_size`.
//! The only deliberate wait is for a lone item: up to `max_wait` for company, then it runs alone.

use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::ClassifyError;

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    pub max_wait: Duration,
}

/// Token ids and attention mask of one batch, row-major `rows × cols`, zero-padded on the right.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub rows: usize,
    pub cols: usize,
}

impl PaddedBatch {
    pub fn new<'a>(items: impl ExactSizeIterator<Item = &'a [i64]> + Clone) -> PaddedBatch {
        let rows = items.len();
        let cols = items.clone().map(<[i64]>::len).max().unwrap_or(0);
        let mut ids = vec![0; rows * cols];
        let mut mask = vec![0; rows * cols];
        for (row, item) in items.enumerate() {
            ids[row * cols..row * cols + item.len()].copy_from_slice(item);
            mask[row * cols..row * cols + item.len()].fill(1);
        }
        PaddedBatch { ids, mask, rows, cols }
    }

    /// Tokens the model computes over, padding included.
    pub fn padded_tokens(&self) -> usize {
        self.rows * self.cols
    }
}

/// Class probabilities for a batch, row-major: 3 sentiment columns, then `topic.len() / rows` topic columns.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    pub sentiment: Vec<f32>,
    pub topic: Vec<f32>,
}

/// One item's slice of a [`BatchOutput`].
#[derive(Debug, Clone, PartialEq)]
pub struct ItemOutput {
    pub sentiment: [f32; 3],
    pub topic: Vec<f32>,
}

/// The model runtime behind the batcher.
pub trait Backend: Send + 'static {
    fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError>;
}

type Reply = oneshot::Sender<Result<ItemOutput, ClassifyError>>;

struct Request {
    ids: Vec<i64>,
    arrived: Instant,
    reply: Reply,
    _slot: OwnedSemaphorePermit,
}

/// The sending side of the batcher's queue; the batcher thread ends when every clone is dropped.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Request>,
}

impl Submitter {
    /// Queues one tokenized item; `slot` is held until its result is sent.
    pub fn submit(
        &self,
        ids: Vec<i64>,
        slot: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<ItemOutput, ClassifyError>>, ClassifyError> {
        let (reply, rx) = oneshot::channel();
        let request = Request { ids, arrived: Instant::now(), reply, _slot: slot };
        self.tx.send(request).map_err(|_| ClassifyError::Stopped)?;
        metrics::gauge!("bearwatch_classify_queued").increment(1.0);
        Ok(rx)
    }
}

/// Starts the batcher thread that owns `backend`.
pub fn spawn(backend: impl Backend, limits: BatchLimits) -> Result<Submitter, ClassifyError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("classify-batcher".into())
        .spawn(move || run(backend, rx, limits))
        .map_err(|e| ClassifyError::Session(format!("cannot start the batcher thread: {e}")))?;
    Ok(Submitter { tx })
}

fn run(mut backend: impl Backend, rx: mpsc::Receiver<Request>, limits: BatchLimits) {
    let mut queue: Vec<Request> = Vec::new();
    let mut open = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok(request) => queue.push(request),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Callers that gave up need no compute.
        let before = queue.len();
        queue.retain(|r| !r.reply.is_closed());
        metrics::gauge!("bearwatch_classify_queued").decrement((before - queue.len()) as f64);
        if queue.is_empty() {
            match rx.recv() {
                Ok(request) => queue.push(request),
                Err(_) => return,
            }
            continue;
        }
        if queue.len() == 1 && open && limits.max_batch_size > 1 {
            let waited = queue[0].arrived.elapsed();
            if let Some(left) = limits.max_wait.checked_sub(waited).filter(|d| !d.is_zero()) {
                match rx.recv_timeout(left) {
                    Ok(request) => {
                        queue.push(request);
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
        }
        let batch = take_batch(&mut queue, &limits);
        metrics::gauge!("bearwatch_classify_queued").decrement(batch.len() as f64);
        execute(&mut backend, batch);
    }
}

/// Removes the next batch from `queue`, keeping the rest in arrival order.
fn take_batch(queue: &mut Vec<Request>, limits: &BatchLimits) -> Vec<Request> {
    let lengths: Vec<usize> = queue.iter().map(|r| r.ids.len()).collect();
    let mut in_batch = vec![false; queue.len()];
    for i in choose(&lengths, limits) {
        in_batch[i] = true;
    }
    let (batch, rest): (Vec<_>, Vec<_>) =
        std::mem::take(queue).into_iter().zip(in_batch).partition(|(_, chosen)| *chosen);
    *queue = rest.into_iter().map(|(request, _)| request).collect();
    batch.into_iter().map(|(request, _)| request).collect()
}

/// Which queued items (indices into `lengths`, arrival order) form the next batch.
pub fn choose(lengths: &[usize], limits: &BatchLimits) -> Vec<usize> {
    let Some(&anchor) = lengths.first() else { return Vec::new() };
    let mut candidates: Vec<usize> = (1..lengths.len()).collect();
    candidates.sort_by_key(|&i| (lengths[i].abs_diff(anchor), i));
    let mut chosen = vec![0];
    let mut longest = anchor;
    for i in candidates {
        if chosen.len() == limits.max_batch_size {
            break;
        }
        let new_longest = longest.max(lengths[i]);
        if new_longest * (chosen.len() + 1) <= limits.max_batch_tokens {
            chosen.push(i);
            longest = new_longest;
        }
    }
    chosen
}

fn execute(backend: &mut impl Backend, batch: Vec<Request>) {
    let padded = PaddedBatch::new(batch.iter().map(|r| r.ids.as_slice()));
    let span = tracing::debug_span!("classify_batch", rows = padded.rows, cols = padded.cols);
    let _enter = span.enter();
    let started = Instant::now();
    let result = backend.run(&padded).and_then(|out| split(out, padded.rows));
    metrics::histogram!("bearwatch_classify_batch_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("bearwatch_classify_batch_size").record(padded.rows as f64);
    metrics::histogram!("bearwatch_classify_batch_padded_tokens").record(padded.padded_tokens() as f64);
    for request in &batch {
        metrics::histogram!("bearwatch_classify_queue_wait_seconds")
            .record(started.duration_since(request.arrived).as_secs_f64());
    }
    match result {
        Ok(items) => {
            metrics::counter!("bearwatch_classify_items_total").increment(items.len() as u64);
            for (request, item) in batch.into_iter().zip(items) {
                // A dropped receiver means the caller stopped waiting; nothing to do.
                let _ = request.reply.send(Ok(item));
            }
        }
        Err(e) => {
            metrics::counter!("bearwatch_classify_errors_total").increment(batch.len() as u64);
            tracing::error!(error = %e, rows = padded.rows, "batch failed");
            let message = e.to_string();
            for request in batch {
                let _ = request.reply.send(Err(ClassifyError::Inference(message.clone())));
            }
        }
    }
}

/// Cuts a batch's output into per-item rows, checking the backend returned one row per item.
fn split(out: BatchOutput, rows: usize) -> Result<Vec<ItemOutput>, ClassifyError> {
    if rows == 0 || out.sentiment.len() != rows * 3 || out.topic.is_empty() || out.topic.len() % rows != 0 {
        return Err(ClassifyError::Inference(format!(
            "model returned {} sentiment and {} topic values for {rows} rows",
            out.sentiment.len(),
            out.topic.len()
        )));
    }
    let width = out.topic.len() / rows;
    Ok(out
        .sentiment
        .chunks_exact(3)
        .zip(out.topic.chunks_exact(width))
        .map(|(s, t)| ItemOutput { sentiment: [s[0], s[1], s[2]], topic: t.to_vec() })
        .collect())
}

//! Token-budget dynamic batching, after Hugging Face TEI, over one or more model workers (Triton's
//! instance count).
//!
//! Callers tokenize on their own tasks and queue token ids; each worker thread owns one model
//! session and, the moment it is free, forms a batch from whatever is queued. A batch always takes
//! the oldest item (so nothing starves), then the queued items closest to it in length (so little is
//! padding), as long as rows × longest row stays within `max_batch_tokens` and rows within
//! `max_batch_size`. The only deliberate wait is for a lone item that finds a worker idle: up to
//! `max_wait` for company, then it runs alone. Work that queued while the workers were busy runs as
//! soon as one is free.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// Class probabilities for a batch, row-major: 3 sentiment columns, then `topic.len() / rows` topic
/// columns; and the pooled embeddings (`embedding.len() / rows` columns), empty when the model lists none.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    pub sentiment: Vec<f32>,
    pub topic: Vec<f32>,
    pub embedding: Vec<f32>,
}

/// One item's slice of a [`BatchOutput`].
#[derive(Debug, Clone, PartialEq)]
pub struct ItemOutput {
    pub sentiment: [f32; 3],
    pub topic: Vec<f32>,
    pub embedding: Vec<f32>,
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
    /// Released before the reply goes out, so a caller that has its result can queue another
    /// item at once (`submit_now` would otherwise find the queue full).
    slot: OwnedSemaphorePermit,
}

impl Request {
    fn answer(self, result: Result<ItemOutput, ClassifyError>) {
        drop(self.slot);
        // A dropped receiver means the caller stopped waiting; nothing to do.
        let _ = self.reply.send(result);
    }
}

/// Rows that must run together, in one model call, with one reply: the variants of an explanation.
struct Group {
    rows: Vec<Vec<i64>>,
    reply: oneshot::Sender<Result<Vec<ItemOutput>, ClassifyError>>,
    /// A queue slot, for callers bounded by `max_queued`; `None` for a pipeline's few alert explanations.
    slot: Option<OwnedSemaphorePermit>,
}

/// What is queued, shared by the submitters and the workers.
#[derive(Default)]
struct Queue {
    items: VecDeque<Request>,
    groups: Vec<Group>,
    /// False once every [`Submitter`] is dropped: the workers finish what is queued and end.
    open: bool,
    /// Workers still running; at 0 (all panicked) nothing queued could ever run, so submits fail.
    workers: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when work is queued or the queue closes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker that panicked mid-batch leaves a queue that is still consistent: every change
        // to it is a single push or remove.
        crate::sync::lock(&self.queue)
    }

    fn push(&self, add: impl FnOnce(&mut Queue)) -> Result<(), ClassifyError> {
        let mut queue = self.lock();
        if queue.workers == 0 {
            return Err(ClassifyError::Stopped);
        }
        add(&mut queue);
        drop(queue);
        self.changed.notify_one();
        Ok(())
    }
}

/// Counts a worker out when its thread ends, however it ends; the last one fails what is queued.
struct Running<'a>(&'a Shared);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.workers -= 1;
        if queue.workers == 0 {
            let stranded = queue.items.len();
            metrics::gauge!("bearwatch_classify_queue_depth").decrement(stranded as f64);
            crate::telemetry::dropped("classify", "stopped", stranded as u64);
            // Dropping the replies tells their callers the classifier stopped.
            queue.items.clear();
            queue.groups.clear();
        }
    }
}

/// Closes the queue when the last [`Submitter`] clone is dropped.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().open = false;
        self.0.changed.notify_all();
    }
}

/// The sending side of the batcher's queue; the workers end when every clone is dropped.
#[derive(Clone)]
pub struct Submitter {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

impl Submitter {
    /// Queues one tokenized item; `slot` is held until its result is sent.
    pub fn submit(
        &self,
        ids: Vec<i64>,
        slot: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<ItemOutput, ClassifyError>>, ClassifyError> {
        let (reply, rx) = oneshot::channel();
        let request = Request { ids, arrived: Instant::now(), reply, slot };
        self.shared.push(|queue| queue.items.push_back(request))?;
        metrics::gauge!("bearwatch_classify_queue_depth").increment(1.0);
        crate::telemetry::received("classify", 1);
        Ok(rx)
    }

    /// Queues rows that run in one model call (split only if they exceed `max_batch_tokens`), ahead
    /// of single items; `slot`, if any, is held until the reply is sent.
    pub fn submit_group(
        &self,
        rows: Vec<Vec<i64>>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<oneshot::Receiver<Result<Vec<ItemOutput>, ClassifyError>>, ClassifyError> {
        let (reply, rx) = oneshot::channel();
        self.shared.push(|queue| queue.groups.push(Group { rows, reply, slot }))?;
        Ok(rx)
    }
}

/// Starts one worker thread per backend, all serving one queue.
pub fn spawn<B: Backend>(backends: Vec<B>, limits: BatchLimits) -> Result<Submitter, ClassifyError> {
    if backends.is_empty() {
        return Err(ClassifyError::Session("no model worker to run batches".into()));
    }
    let queue = Queue { open: true, workers: backends.len(), ..Queue::default() };
    let shared = Arc::new(Shared { queue: Mutex::new(queue), changed: Condvar::new() });
    // Made first: if a thread cannot start, dropping it closes the queue for those that did.
    let submitter = Submitter { _closer: Arc::new(Closer(shared.clone())), shared: shared.clone() };
    // Taken before any item can be submitted, so the first item counts as arriving at an idle model.
    let idle_since = Instant::now();
    for (index, backend) in backends.into_iter().enumerate() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("classify-worker-{index}"))
            .spawn(move || work(backend, &shared, limits, idle_since))
            .map_err(|e| ClassifyError::Session(format!("cannot start a classify worker thread: {e}")))?;
    }
    Ok(submitter)
}

enum Next {
    Items(Vec<Request>),
    Group(Group),
}

/// One worker: takes the next batch whenever it is free, until the queue is closed and empty.
fn work(mut backend: impl Backend, shared: &Shared, limits: BatchLimits, mut idle_since: Instant) {
    let _running = Running(shared);
    while let Some(next) = next_batch(shared, &limits, idle_since) {
        match next {
            Next::Group(group) => execute_group(&mut backend, group, &limits),
            Next::Items(batch) => execute(&mut backend, batch),
        }
        idle_since = Instant::now();
    }
}

/// Waits for work and removes it from the queue; `None` once the queue is closed and drained.
fn next_batch(shared: &Shared, limits: &BatchLimits, idle_since: Instant) -> Option<Next> {
    let mut queue = shared.lock();
    loop {
        // Callers that gave up need no compute.
        let before = queue.items.len();
        queue.items.retain(|r| !r.reply.is_closed());
        let abandoned = before - queue.items.len();
        metrics::gauge!("bearwatch_classify_queue_depth").decrement(abandoned as f64);
        crate::telemetry::dropped("classify", "abandoned", abandoned as u64);
        queue.groups.retain(|g| !g.reply.is_closed());
        if !queue.groups.is_empty() {
            return Some(Next::Group(queue.groups.remove(0)));
        }
        if queue.items.is_empty() {
            if !queue.open {
                return None;
            }
            queue = shared.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        // Only an item that found this worker idle waits for company; one that arrived while every
        // worker was busy has waited already.
        if queue.items.len() == 1 && queue.open && limits.max_batch_size > 1 && queue.items[0].arrived >= idle_since {
            let waited = queue.items[0].arrived.elapsed();
            if let Some(left) = limits.max_wait.checked_sub(waited).filter(|d| !d.is_zero()) {
                queue = shared.changed.wait_timeout(queue, left).unwrap_or_else(|e| e.into_inner()).0;
                continue;
            }
        }
        let batch = take_batch(&mut queue.items, limits);
        metrics::gauge!("bearwatch_classify_queue_depth").decrement(batch.len() as f64);
        return Some(Next::Items(batch));
    }
}

/// Removes the next batch from `queue`, keeping the rest in arrival order.
fn take_batch(queue: &mut VecDeque<Request>, limits: &BatchLimits) -> Vec<Request> {
    let lengths: Vec<usize> = queue.iter().map(|r| r.ids.len()).collect();
    let mut chosen = choose(&lengths, limits);
    chosen.sort_unstable();
    // Taken from the back first so that earlier indices hold; a deque shifts the shorter side, so
    // the oldest items (a batch always holds the oldest) come off the front at no cost.
    let mut batch: Vec<Request> = chosen.iter().rev().filter_map(|&i| queue.remove(i)).collect();
    batch.reverse();
    batch
}

/// Which queued items (indices into `lengths`, arrival order) form the next batch: the oldest, then
/// the others by distance in length from it (the older first among equals), each taken if the batch
/// still fits. Linear in the queue: lengths are bucketed rather than sorted, since a deep queue
/// formed into small batches would otherwise be sorted once per batch.
pub fn choose(lengths: &[usize], limits: &BatchLimits) -> Vec<usize> {
    let Some(&anchor) = lengths.first() else { return Vec::new() };
    let mut chosen = vec![0];
    if limits.max_batch_size <= 1 {
        return chosen;
    }
    let widest = lengths.iter().copied().max().unwrap_or(anchor);
    let mut by_length: Vec<Vec<usize>> = vec![Vec::new(); widest + 1];
    for (i, &length) in lengths.iter().enumerate().skip(1) {
        by_length[length].push(i);
    }
    let mut longest = anchor;
    for distance in 0..=widest {
        let shorter: &[usize] = anchor.checked_sub(distance).map_or(&[], |n| &by_length[n]);
        let longer: &[usize] = if distance == 0 { &[] } else { by_length.get(anchor + distance).map_or(&[], |v| v) };
        // Both in arrival order: merged, the older first.
        let (mut a, mut b) = (shorter.iter().peekable(), longer.iter().peekable());
        while let Some(&i) = match (a.peek(), b.peek()) {
            (Some(&&x), Some(&&y)) => if x < y { a.next() } else { b.next() },
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        } {
            if chosen.len() == limits.max_batch_size {
                return chosen;
            }
            let new_longest = longest.max(lengths[i]);
            if new_longest * (chosen.len() + 1) <= limits.max_batch_tokens {
                chosen.push(i);
                longest = new_longest;
            }
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
    metrics::histogram!("bearwatch_classify_batch_tokens").record(padded.padded_tokens() as f64);
    for request in &batch {
        metrics::histogram!("bearwatch_classify_queue_wait_seconds")
            .record(started.duration_since(request.arrived).as_secs_f64());
    }
    match result {
        Ok(items) => {
            crate::telemetry::sent("classify", items.len() as u64);
            for (request, item) in batch.into_iter().zip(items) {
                request.answer(Ok(item));
            }
        }
        Err(e) => {
            crate::telemetry::errors("classify", batch.len() as u64);
            tracing::error!(error = %e, rows = padded.rows, "batch failed");
            let message = e.to_string();
            for request in batch {
                request.answer(Err(ClassifyError::Inference(message.clone())));
            }
        }
    }
}

/// Runs a group's rows in as few model calls as `max_batch_tokens` allows (one, for a headline's
/// variants), and replies with all their outputs in order.
fn execute_group(backend: &mut impl Backend, group: Group, limits: &BatchLimits) {
    let longest = group.rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let per_call = (limits.max_batch_tokens / longest).max(1);
    let mut outputs = Vec::with_capacity(group.rows.len());
    let mut result = Ok(());
    for chunk in group.rows.chunks(per_call) {
        let padded = PaddedBatch::new(chunk.iter().map(Vec::as_slice));
        let _span = tracing::debug_span!("classify_group", rows = padded.rows, cols = padded.cols).entered();
        let started = Instant::now();
        match backend.run(&padded).and_then(|out| split(out, padded.rows)) {
            Ok(items) => outputs.extend(items),
            Err(e) => {
                result = Err(ClassifyError::Inference(e.to_string()));
                break;
            }
        }
        metrics::histogram!("bearwatch_classify_batch_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("bearwatch_classify_batch_size").record(padded.rows as f64);
        metrics::histogram!("bearwatch_classify_batch_tokens").record(padded.padded_tokens() as f64);
    }
    drop(group.slot);
    let _ = group.reply.send(result.map(|()| outputs));
}

/// Cuts a batch's output into per-item rows, checking the backend returned one row per item.
fn split(out: BatchOutput, rows: usize) -> Result<Vec<ItemOutput>, ClassifyError> {
    if rows == 0 || out.sentiment.len() != rows * 3 || out.topic.is_empty() || out.topic.len() % rows != 0 || out.embedding.len() % rows != 0 {
        return Err(ClassifyError::Inference(format!(
            "model returned {} sentiment, {} topic and {} embedding values for {rows} rows",
            out.sentiment.len(),
            out.topic.len(),
            out.embedding.len()
        )));
    }
    let (width, dims) = (out.topic.len() / rows, out.embedding.len() / rows);
    Ok((0..rows)
        .map(|i| ItemOutput {
            sentiment: [out.sentiment[3 * i], out.sentiment[3 * i + 1], out.sentiment[3 * i + 2]],
            topic: out.topic[i * width..(i + 1) * width].to_vec(),
            embedding: out.embedding[i * dims..(i + 1) * dims].to_vec(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc as std_mpsc};

    use tokio::sync::Semaphore;

    use super::*;

    /// Echoes each row's real length as its first sentiment value and records every batch's shape.
    struct Echo {
        batches: Arc<Mutex<Vec<Vec<usize>>>>,
        /// If set, the first batch says it has started, then waits until the test opens the gate.
        gate: Option<(std_mpsc::Sender<()>, std_mpsc::Receiver<()>)>,
        fail_first: bool,
    }

    impl Backend for Echo {
        fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
            if let Some((entered, gate)) = self.gate.take() {
                entered.send(()).unwrap();
                gate.recv().unwrap();
            }
            let lengths: Vec<usize> =
                batch.mask.chunks(batch.cols).map(|row| row.iter().filter(|&&m| m == 1).count()).collect();
            self.batches.lock().unwrap().push(lengths.clone());
            if std::mem::take(&mut self.fail_first) {
                return Err(ClassifyError::Inference("device lost".into()));
            }
            Ok(BatchOutput {
                sentiment: lengths.iter().flat_map(|&n| [n as f32, 0.0, 0.0]).collect(),
                topic: vec![1.0; batch.rows],
                embedding: Vec::new(),
            })
        }
    }

    fn limits(tokens: usize, size: usize, wait_ms: u64) -> BatchLimits {
        BatchLimits { max_batch_tokens: tokens, max_batch_size: size, max_wait: Duration::from_millis(wait_ms) }
    }

    struct Harness {
        submitter: Submitter,
        slots: Arc<Semaphore>,
        batches: Arc<Mutex<Vec<Vec<usize>>>>,
    }

    impl Harness {
        fn start(
            limits: BatchLimits,
            gate: Option<(std_mpsc::Sender<()>, std_mpsc::Receiver<()>)>,
            fail_first: bool,
        ) -> Harness {
            let batches = Arc::new(Mutex::new(Vec::new()));
            let submitter = spawn(vec![Echo { batches: batches.clone(), gate, fail_first }], limits).unwrap();
            Harness { submitter, slots: Arc::new(Semaphore::new(100_000)), batches }
        }

        /// A harness whose first batch blocks in the backend until the returned gate is opened.
        fn gated(limits: BatchLimits) -> (Harness, Gate) {
            let (open, gate) = std_mpsc::channel();
            let (entered_tx, entered) = std_mpsc::channel();
            (Harness::start(limits, Some((entered_tx, gate)), false), Gate { open, entered })
        }

        fn submit(&self, len: usize) -> oneshot::Receiver<Result<ItemOutput, ClassifyError>> {
            let slot = self.slots.clone().try_acquire_owned().unwrap();
            self.submitter.submit(vec![7; len], slot).unwrap()
        }
    }

    struct Gate {
        open: std_mpsc::Sender<()>,
        entered: std_mpsc::Receiver<()>,
    }

    impl Gate {
        /// Returns once the first batch is inside the backend.
        fn wait_entered(&self) {
            self.entered.recv().unwrap();
        }

        fn open(&self) {
            self.open.send(()).unwrap();
        }
    }

    #[test]
    fn a_group_runs_in_one_call_ahead_of_queued_items_and_splits_only_past_the_token_budget() {
        let (harness, gate) = Harness::gated(limits(64, 2, 0));
        let first = harness.submit(3);
        gate.wait_entered();
        // Queued while the model is busy: items, then a group of five rows (more than max_batch_size).
        let item = harness.submit(4);
        let slot = harness.slots.clone().try_acquire_owned().unwrap();
        let group = harness.submitter.submit_group(vec![vec![7; 5], vec![7; 4], vec![7; 3], vec![7; 4], vec![7; 2]], Some(slot)).unwrap();
        let wide = harness.submitter.submit_group(vec![vec![7; 20]; 5], None).unwrap();
        gate.open();
        let rows = group.blocking_recv().unwrap().unwrap();
        assert_eq!(rows.iter().map(|r| r.sentiment[0]).collect::<Vec<_>>(), [5.0, 4.0, 3.0, 4.0, 2.0], "in order");
        assert_eq!(wide.blocking_recv().unwrap().unwrap().len(), 5);
        item.blocking_recv().unwrap().unwrap();
        first.blocking_recv().unwrap().unwrap();
        let batches = harness.batches.lock().unwrap().clone();
        // 20 tokens × 5 rows exceed the 64-token budget: 3 rows, then 2.
        assert_eq!(batches, [vec![3], vec![5, 4, 3, 4, 2], vec![20, 20, 20], vec![20, 20], vec![4]]);
    }

    #[test]
    fn choose_groups_by_length_within_budget_and_size() {
        assert_eq!(choose(&[10, 50, 12, 11, 60, 9], &limits(40, 3, 0)), vec![0, 3, 5]);
        // 31 × 3 rows would exceed 64 tokens.
        assert_eq!(choose(&[30, 31, 29], &limits(64, 8, 0)), vec![0, 1]);
        // The oldest item always goes, even alone and over budget.
        assert_eq!(choose(&[100, 5], &limits(64, 8, 0)), vec![0]);
        assert!(choose(&[], &limits(64, 8, 0)).is_empty());
    }

    #[test]
    fn choose_takes_the_nearest_lengths_in_the_order_a_full_sort_would() {
        // The rule written plainly: every other item by (distance in length, arrival), each taken if it fits.
        let by_sorting = |lengths: &[usize], limits: &BatchLimits| {
            let mut order: Vec<usize> = (1..lengths.len()).collect();
            order.sort_by_key(|&i| (lengths[i].abs_diff(lengths[0]), i));
            let (mut chosen, mut longest) = (vec![0], lengths[0]);
            for i in order {
                if chosen.len() == limits.max_batch_size {
                    break;
                }
                if longest.max(lengths[i]) * (chosen.len() + 1) <= limits.max_batch_tokens {
                    chosen.push(i);
                    longest = longest.max(lengths[i]);
                }
            }
            chosen
        };
        let mut random = crate::rng::Lcg(7);
        for _ in 0..500 {
            let lengths: Vec<usize> = (0..1 + random.below(200)).map(|_| 1 + random.below(64)).collect();
            let limits = limits(64 + random.below(2048), 1 + random.below(70), 0);
            assert_eq!(choose(&lengths, &limits), by_sorting(&lengths, &limits), "{lengths:?} {limits:?}");
        }
    }

    #[tokio::test]
    async fn every_item_gets_its_own_result_and_batches_respect_limits() {
        let harness = Harness::start(limits(96, 8, 1), None, false);
        let lengths: Vec<usize> = (0..300).map(|i| 3 + (i * 7919) % 30).collect();
        let replies: Vec<_> = lengths.iter().map(|&n| harness.submit(n)).collect();
        for (reply, &n) in replies.into_iter().zip(&lengths) {
            assert_eq!(reply.await.unwrap().unwrap().sentiment[0], n as f32);
        }
        let batches = harness.batches.lock().unwrap();
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), lengths.len());
        for batch in batches.iter() {
            assert!(batch.len() <= 8, "{batch:?}");
            assert!(batch.iter().max().unwrap() * batch.len() <= 96, "{batch:?}");
        }
    }

    #[tokio::test]
    async fn a_long_item_is_not_starved_by_later_short_ones() {
        let (harness, gate) = Harness::gated(limits(4096, 64, 0));
        let first = harness.submit(5);
        gate.wait_entered();
        let early: Vec<_> = (0..100).map(|_| harness.submit(5)).collect();
        let long = harness.submit(60);
        let late: Vec<_> = (0..100).map(|_| harness.submit(5)).collect();
        gate.open();
        first.await.unwrap().unwrap();
        long.await.unwrap().unwrap();
        for reply in early.into_iter().chain(late) {
            reply.await.unwrap().unwrap();
        }
        let batches = harness.batches.lock().unwrap();
        let with_long = batches.iter().position(|b| b.contains(&60)).unwrap();
        // [first], 64 early, 36 early + 28 late, then the long item is the oldest and leads its batch.
        assert_eq!(with_long, 3, "{batches:?}");
        assert!(batches[with_long + 1..].iter().any(|b| !b.is_empty()), "later items were still queued");
    }

    #[tokio::test]
    async fn a_lone_item_waits_for_company_at_most_max_wait() {
        let harness = Harness::start(limits(4096, 64, 50), None, false);
        let started = Instant::now();
        harness.submit(10).await.unwrap().unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(40), "served before max_wait without company: {waited:?}");
        assert!(waited < Duration::from_millis(300), "lone item waited {waited:?}");
    }

    #[tokio::test]
    async fn company_that_arrives_in_time_joins_the_batch() {
        let harness = Harness::start(limits(4096, 64, 300), None, false);
        let a = harness.submit(10);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = harness.submit(12);
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(*harness.batches.lock().unwrap(), vec![vec![10, 12]]);
    }

    #[tokio::test]
    async fn queued_work_does_not_wait_when_the_model_is_idle() {
        // A huge max_wait: any wait beyond the lone-item rule would show.
        let (harness, gate) = Harness::gated(limits(4096, 2, 10_000));
        let first = harness.submit(4);
        let second = harness.submit(4);
        gate.wait_entered();
        // Queued while the model is busy: must run as soon as it is free, without waiting for company.
        let third = harness.submit(4);
        let started = Instant::now();
        gate.open();
        for reply in [first, second, third] {
            reply.await.unwrap().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_failed_batch_fails_its_items_and_the_batcher_goes_on() {
        let harness = Harness::start(limits(4096, 64, 0), None, true);
        let failed = harness.submit(5).await.unwrap();
        assert!(matches!(failed, Err(ClassifyError::Inference(ref m)) if m.contains("device lost")));
        assert_eq!(harness.submit(6).await.unwrap().unwrap().sentiment[0], 6.0);
    }

    /// Blocks any batch holding a row of 99 tokens until the test opens the gate.
    struct Blocking {
        entered: std_mpsc::Sender<()>,
        gate: Arc<Mutex<std_mpsc::Receiver<()>>>,
    }

    impl Backend for Blocking {
        fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
            let lengths: Vec<usize> = batch.mask.chunks(batch.cols).map(|row| row.iter().sum::<i64>() as usize).collect();
            if lengths.contains(&99) {
                self.entered.send(()).unwrap();
                self.gate.lock().unwrap().recv().unwrap();
            }
            Ok(BatchOutput {
                sentiment: lengths.iter().flat_map(|&n| [n as f32, 0.0, 0.0]).collect(),
                topic: vec![1.0; batch.rows],
                embedding: Vec::new(),
            })
        }
    }

    #[tokio::test]
    async fn a_second_worker_serves_the_queue_while_the_first_is_busy() {
        let (open, gate) = std_mpsc::channel();
        let (entered_tx, entered) = std_mpsc::channel();
        let gate = Arc::new(Mutex::new(gate));
        let workers = (0..2).map(|_| Blocking { entered: entered_tx.clone(), gate: gate.clone() }).collect();
        let submitter = spawn(workers, limits(4096, 64, 0)).unwrap();
        let slots = Arc::new(Semaphore::new(100));
        let submit = |len| submitter.submit(vec![7; len], slots.clone().try_acquire_owned().unwrap()).unwrap();
        let slow = submit(99);
        entered.recv().unwrap();
        // One worker is inside the model until the gate opens; the other must answer meanwhile.
        let quick: Vec<_> = (0..20).map(|i| submit(3 + i % 5)).collect();
        for (i, reply) in quick.into_iter().enumerate() {
            assert_eq!(reply.await.unwrap().unwrap().sentiment[0], (3 + i % 5) as f32);
        }
        open.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().sentiment[0], 99.0);
    }

    struct Panics;

    impl Backend for Panics {
        fn run(&mut self, _: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
            panic!("a backend bug");
        }
    }

    #[tokio::test]
    async fn when_every_worker_has_died_queued_items_fail_and_new_ones_are_refused() {
        let submitter = spawn(vec![Panics, Panics], limits(4096, 1, 0)).unwrap();
        let slots = Arc::new(Semaphore::new(100));
        let replies: Vec<_> = (0..2).map(|_| submitter.submit(vec![7; 4], slots.clone().try_acquire_owned().unwrap()).unwrap()).collect();
        for reply in replies {
            assert!(reply.await.is_err(), "a dead worker's item must not wait forever");
        }
        // Refused, or (if the last worker's thread is still unwinding) failed when it ends: never left waiting.
        match submitter.submit(vec![7; 4], slots.clone().try_acquire_owned().unwrap()) {
            Err(e) => assert!(matches!(e, ClassifyError::Stopped), "{e}"),
            Ok(reply) => assert!(reply.await.is_err()),
        }
    }

    #[test]
    fn padded_batch_pads_right_and_masks_padding() {
        let batch = PaddedBatch::new([&[1, 2, 3][..], &[4][..]].into_iter());
        assert_eq!((batch.rows, batch.cols), (2, 3));
        assert_eq!(batch.ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(batch.mask, vec![1, 1, 1, 1, 0, 0]);
    }
}

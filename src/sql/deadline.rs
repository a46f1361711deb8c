//! A time limit and a way out inside every query plan, so that they hold on each interface, the
//! Postgres wire protocol included (datafusion-postgres' `statement_timeout` bounds planning only).
//!
//! A physical-optimizer rule rewrites each finished plan:
//! - every operator gets a [`CheckExec`] above it, which ends its stream with an error once the query
//!   is past its deadline or abandoned. Operators that never yield (a sort over a cross join) still
//!   poll their inputs batch by batch, so they stop within one batch;
//! - the root becomes a [`RelayExec`]: the plan runs on the query threads ([`super::guard::pool`])
//!   and its batches come back over a small channel. The caller's side answers the deadline, a
//!   Postgres cancel request or its own going away on time, whatever the query threads are doing,
//!   and dropping it marks the query abandoned, which stops the work behind it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};

use super::SqlError;

/// Guards each finished plan (see the module docs).
#[derive(Debug)]
pub struct Deadline(pub Duration);

impl PhysicalOptimizerRule for Deadline {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        if plan.is::<RelayExec>() {
            return Ok(plan);
        }
        let control = Arc::new(Control { timeout: self.0, deadline_ns: AtomicU64::new(UNSET), abandoned: AtomicBool::new(false) });
        let checked = plan
            .transform_up(|node| {
                Ok(Transformed::yes(Arc::new(CheckExec { input: node, control: control.clone() }) as Arc<dyn ExecutionPlan>))
            })?
            .data;
        Ok(Arc::new(RelayExec { input: checked, control }))
    }

    fn name(&self) -> &str {
        "bearwatch_deadline"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

const UNSET: u64 = u64::MAX;
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// One query's deadline and whether its caller is gone, shared by all its operators.
#[derive(Debug)]
struct Control {
    timeout: Duration,
    /// Nanoseconds since [`EPOCH`]; set when the plan starts running.
    deadline_ns: AtomicU64,
    abandoned: AtomicBool,
}

impl Control {
    fn start(&self) -> tokio::time::Instant {
        let deadline = now_ns().saturating_add(self.timeout.as_nanos() as u64);
        let _ = self.deadline_ns.compare_exchange(UNSET, deadline, Ordering::SeqCst, Ordering::SeqCst);
        let left = self.deadline_ns.load(Ordering::SeqCst).saturating_sub(now_ns());
        tokio::time::Instant::now() + Duration::from_nanos(left)
    }

    fn stop_reason(&self) -> Option<DataFusionError> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Some(external(SqlError::Cancelled));
        }
        (now_ns() >= self.deadline_ns.load(Ordering::Relaxed)).then(|| external(SqlError::Timeout(self.timeout)))
    }
}

fn external(error: SqlError) -> DataFusionError {
    DataFusionError::External(Box::new(error))
}

macro_rules! one_child_plan {
    ($name:literal) => {
        fn name(&self) -> &str {
            $name
        }

        fn properties(&self) -> &Arc<PlanProperties> {
            self.input.properties()
        }

        fn maintains_input_order(&self) -> Vec<bool> {
            vec![true]
        }

        fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
            vec![&self.input]
        }

        fn apply_expressions(&self, _: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>) -> Result<TreeNodeRecursion> {
            Ok(TreeNodeRecursion::Continue)
        }

        fn replace_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>, _: ReplaceChildrenOptions) -> Result<Arc<dyn ExecutionPlan>> {
            if children.len() != 1 {
                return Err(DataFusionError::Internal(format!("{} takes one child, got {}", $name, children.len())));
            }
            Ok(Arc::new(Self { input: children.swap_remove(0), control: self.control.clone() }))
        }

        fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
            self.replace_children(children, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))
        }
    };
}

/// Stops its input's stream once the query is past its deadline or abandoned.
#[derive(Debug)]
pub struct CheckExec {
    input: Arc<dyn ExecutionPlan>,
    control: Arc<Control>,
}

impl DisplayAs for CheckExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckExec")
    }
}

impl ExecutionPlan for CheckExec {
    one_child_plan!("CheckExec");

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        if let Some(reason) = self.control.stop_reason() {
            return Err(reason);
        }
        let inner = self.input.execute(partition, context)?;
        Ok(Box::pin(CheckStream { inner, control: self.control.clone(), stopped: false }))
    }
}

struct CheckStream {
    inner: SendableRecordBatchStream,
    control: Arc<Control>,
    stopped: bool,
}

impl Stream for CheckStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stopped {
            return Poll::Ready(None);
        }
        if let Some(reason) = self.control.stop_reason() {
            self.stopped = true;
            return Poll::Ready(Some(Err(reason)));
        }
        self.inner.poll_next_unpin(cx)
    }
}

impl RecordBatchStream for CheckStream {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

/// Runs its input on the query threads and hands the batches to the caller (see the module docs).
#[derive(Debug)]
pub struct RelayExec {
    input: Arc<dyn ExecutionPlan>,
    control: Arc<Control>,
}

impl DisplayAs for RelayExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayExec: timeout={:?}", self.control.timeout)
    }
}

impl ExecutionPlan for RelayExec {
    one_child_plan!("RelayExec");

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let pool = super::guard::pool().map_err(external)?;
        let deadline = self.control.start();
        let input = self.input.clone();
        // `None` marks the end of the input: a channel closed without it means the task died.
        let (sender, receiver) = tokio::sync::mpsc::channel::<Option<Result<RecordBatch>>>(2);
        // While the query reads, the writer's merges keep the parts it may have listed.
        let pin = crate::storage::ReadPin::new();
        let task = pool.spawn(async move {
            let _pin = pin;
            let mut stream = match input.execute(partition, context) {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = sender.send(Some(Err(e))).await;
                    return;
                }
            };
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                if sender.send(Some(item)).await.is_err() || failed {
                    return;
                }
            }
            let _ = sender.send(None).await;
        });
        let cancelled: Option<BoxFuture<'static, ()>> = super::guard::cancel_signal().map(|mut signal| {
            async move {
                let _ = signal.changed().await;
            }
            .boxed()
        });
        Ok(Box::pin(RelayStream {
            receiver,
            task,
            schema: self.input.schema(),
            deadline,
            sleep: None,
            cancelled,
            control: self.control.clone(),
            done: false,
        }))
    }
}

struct RelayStream {
    receiver: tokio::sync::mpsc::Receiver<Option<Result<RecordBatch>>>,
    task: tokio::task::JoinHandle<()>,
    schema: SchemaRef,
    deadline: tokio::time::Instant,
    /// Made on the first poll, inside the runtime that owns the caller's timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    cancelled: Option<BoxFuture<'static, ()>>,
    control: Arc<Control>,
    done: bool,
}

impl RelayStream {
    fn stop(&mut self, error: SqlError) -> Poll<Option<Result<RecordBatch>>> {
        self.done = true;
        self.control.abandoned.store(true, Ordering::SeqCst);
        Poll::Ready(Some(Err(external(error))))
    }
}

impl Stream for RelayStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(cancelled) = self.cancelled.as_mut()
            && cancelled.poll_unpin(cx).is_ready()
        {
            return self.stop(SqlError::Cancelled);
        }
        let deadline = self.deadline;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            let timeout = self.control.timeout;
            return self.stop(SqlError::Timeout(timeout));
        }
        match self.receiver.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Some(item))) => Poll::Ready(Some(item)),
            Poll::Ready(Some(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => self.stop(SqlError::Execution("the query stopped unexpectedly (see the log)".into())),
        }
    }
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        // Dropped before its end: the caller is gone (timed out, cancelled, disconnected, or it has
        // the rows it wanted), so the work behind it stops. Other partitions of a query that ended
        // normally go on.
        if !self.done {
            self.control.abandoned.store(true, Ordering::SeqCst);
        }
        self.task.abort();
    }
}

impl RecordBatchStream for RelayStream {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// The deadline's or a cancel's error, wherever DataFusion wrapped it.
pub fn stopped(error: &DataFusionError) -> Option<SqlError> {
    match error.find_root() {
        DataFusionError::External(e) => match e.downcast_ref::<SqlError>() {
            Some(SqlError::Timeout(timeout)) => Some(SqlError::Timeout(*timeout)),
            Some(SqlError::Cancelled) => Some(SqlError::Cancelled),
            _ => None,
        },
        _ => None,
    }
}

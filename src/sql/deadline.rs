//! A time limit inside every query plan, so that it holds on each interface, the Postgres wire
//! protocol included: datafusion-postgres' `statement_timeout` bounds planning only, and its result
//! stream runs unbounded. A physical-optimizer rule puts [`DeadlineExec`] at the root of each plan;
//! its stream ends in an error once the query has run longer than the limit.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::Stream;

use super::SqlError;

/// Wraps each finished plan in a [`DeadlineExec`].
#[derive(Debug)]
pub struct Deadline(pub Duration);

impl PhysicalOptimizerRule for Deadline {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        if plan.is::<DeadlineExec>() {
            return Ok(plan);
        }
        Ok(Arc::new(DeadlineExec { input: plan, timeout: self.0 }))
    }

    fn name(&self) -> &str {
        "bearwatch_deadline"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[derive(Debug, Clone)]
pub struct DeadlineExec {
    input: Arc<dyn ExecutionPlan>,
    timeout: Duration,
}

impl DisplayAs for DeadlineExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeadlineExec: timeout={:?}", self.timeout)
    }
}

impl ExecutionPlan for DeadlineExec {
    fn name(&self) -> &str {
        "DeadlineExec"
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
            return Err(DataFusionError::Internal(format!("DeadlineExec takes one child, got {}", children.len())));
        }
        Ok(Arc::new(DeadlineExec { input: children.swap_remove(0), timeout: self.timeout }))
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(children, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let inner = self.input.execute(partition, context)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        Ok(Box::pin(DeadlineStream { inner, deadline, sleep: None, timeout: self.timeout, expired: false }))
    }
}

struct DeadlineStream {
    inner: SendableRecordBatchStream,
    deadline: tokio::time::Instant,
    /// Made on the first poll, which runs inside the runtime that owns the timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    expired: bool,
}

impl Stream for DeadlineStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.expired {
            return Poll::Ready(None);
        }
        let deadline = self.deadline;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.expired = true;
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(SqlError::Timeout(self.timeout))))));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

impl RecordBatchStream for DeadlineStream {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

/// The deadline's error, wherever DataFusion wrapped it.
pub fn expired(error: &DataFusionError) -> Option<Duration> {
    match error.find_root() {
        DataFusionError::External(e) => match e.downcast_ref::<SqlError>() {
            Some(SqlError::Timeout(timeout)) => Some(*timeout),
            _ => None,
        },
        _ => None,
    }
}

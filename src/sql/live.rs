//! Rows a running pipeline has processed but not yet written as Parquet, so that SQL sees them
//! within a second. The pipeline publishes a snapshot twice a second; a checkpoint, while it writes
//! the Parquet parts, holds the same lock that queries take to list the parts and read the snapshot,
//! so a query sees each row exactly once: from a part or from the snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use tokio::sync::RwLock;

use crate::storage::Table;

/// The latest unflushed rows of every table.
pub struct LiveRows {
    tables: RwLock<BTreeMap<Table, Vec<RecordBatch>>>,
    /// The pipeline's `[storage] instance`: the value of the tables' `instance` column for its rows.
    instance: Option<String>,
}

impl LiveRows {
    pub fn new(instance: Option<String>) -> LiveRows {
        LiveRows { tables: RwLock::default(), instance }
    }

    pub(crate) fn is_an_instance(&self) -> bool {
        self.instance.is_some()
    }

    /// Replaces the snapshot (called from the pipeline thread, never from async code).
    pub fn publish(&self, tables: BTreeMap<Table, Vec<RecordBatch>>) {
        *self.tables.blocking_write() = tables;
    }

    /// Holds queries off while a checkpoint moves rows from the snapshot into Parquet parts; the
    /// snapshot is emptied when the guard is taken.
    pub fn flushing(&self) -> tokio::sync::RwLockWriteGuard<'_, BTreeMap<Table, Vec<RecordBatch>>> {
        let mut guard = self.tables.blocking_write();
        guard.clear();
        guard
    }
}

/// A table's Parquet parts plus its live rows.
#[derive(Debug)]
pub struct LiveTable {
    table: Table,
    stored: Arc<dyn TableProvider>,
    live: Arc<LiveRows>,
}

impl std::fmt::Debug for LiveRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveRows")
    }
}

impl LiveTable {
    pub fn new(table: Table, stored: Arc<dyn TableProvider>, live: Arc<LiveRows>) -> LiveTable {
        LiveTable { table, stored, live }
    }
}

#[async_trait]
impl TableProvider for LiveTable {
    fn schema(&self) -> SchemaRef {
        self.stored.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        // Each side may prune with the filters; DataFusion still applies them above the union.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Listing the parts and copying the snapshot under one read lock: a checkpoint in between
        // would otherwise show its rows twice, or not at all.
        let tables = self.live.tables.read().await;
        let stored = self.stored.scan(state, projection, filters, limit).await?;
        let batches = tables.get(&self.table).cloned().unwrap_or_default();
        drop(tables);
        if batches.is_empty() {
            return Ok(stored);
        }
        // The snapshot is built with the stored (Utf8) schema; queries read text as Utf8View. Where
        // the stored tables are partitioned by instance, the rows get this pipeline's.
        let schema = self.schema();
        let batches = batches
            .iter()
            .map(|b| {
                let instance: datafusion::arrow::array::ArrayRef =
                    Arc::new(datafusion::arrow::array::StringArray::from(vec![self.live.instance.clone(); b.num_rows()]));
                let columns = b
                    .columns()
                    .iter()
                    .chain(std::iter::repeat(&instance))
                    .zip(schema.fields())
                    .map(|(c, f)| datafusion::arrow::compute::cast(c, f.data_type()))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                RecordBatch::try_new(schema.clone(), columns)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let memory = MemTable::try_new(schema, vec![batches])?;
        let live = memory.scan(state, projection, filters, limit).await?;
        UnionExec::try_new(vec![stored, live])
    }
}

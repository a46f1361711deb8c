//! The read-only guard on both paths a query takes. The Postgres hook (the server's own parser)
//! lets through only reads, transactions, cursors, SHOW and client SETs; DataFusion with the
//! read-only options plans only reads. Neither may panic, and nothing may be written.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use bearwatch::sql::{self, Limits};
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use libfuzzer_sys::fuzz_target;

static STORAGE: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());
static CTX: LazyLock<SessionContext> = LazyLock::new(|| {
    sql::context(STORAGE.path(), Limits { memory_bytes: 64 << 20, timeout: Duration::from_secs(1) }, None).unwrap()
});
static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
static PARSER: LazyLock<PostgresCompatibilityParser> = LazyLock::new(PostgresCompatibilityParser::new);

fn writes(plan: &LogicalPlan) -> bool {
    let mut found = false;
    plan.apply(|node| {
        found |= matches!(node, LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) | LogicalPlan::Statement(_));
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })
    .unwrap();
    found
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(statements) = PARSER.parse(text) {
        for statement in &statements {
            if sql::postgres::refusal(statement).is_none() {
                let allowed = matches!(
                    statement,
                    Statement::Query(_)
                        | Statement::Explain { .. }
                        | Statement::StartTransaction { .. }
                        | Statement::Commit { .. }
                        | Statement::Rollback { .. }
                        | Statement::Declare { .. }
                        | Statement::Fetch { .. }
                        | Statement::Close { .. }
                        | Statement::Set(_)
                        | Statement::ShowVariable { .. }
                        | Statement::ShowVariables { .. }
                        | Statement::ShowStatus { .. }
                        | Statement::ShowTables { .. }
                        | Statement::ShowColumns { .. }
                );
                assert!(allowed, "the Postgres hook let through: {statement}");
            }
        }
    }
    if let Ok(frame) = RUNTIME.block_on(sql::plan(&CTX, text)) {
        assert!(!writes(frame.logical_plan()), "read-only options planned a write: {text}");
    }
    let written: Vec<_> = walk(STORAGE.path());
    assert!(written.is_empty(), "files appeared: {written:?}");
});

/// Files under the storage folder (the context created only empty table folders).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

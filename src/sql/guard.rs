//! What keeps a query from hurting the pipeline beside it, on every interface (CLI, HTTP, Postgres):
//! - queries run on their own threads ([`pool`]): large stacks for DataFusion's recursive planner,
//!   and a lower scheduling priority, so that ingestion, alerting, `/health` and `/metrics` keep
//!   their pace while the worst query runs;
//! - query text is at most [`MAX_QUERY_BYTES`] and expressions and subqueries nest at most
//!   [`MAX_NESTING`] deep ([`check_statement`]), which bounds the stack every later step needs;
//! - a Postgres cancel request reaches the query its connection is running ([`Cancels`]).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use datafusion::sql::sqlparser::ast::{Expr, Query, Statement, Visit, Visitor};
use tokio::sync::watch;

use super::SqlError;
use crate::sync::lock;

/// Longest query text accepted.
pub const MAX_QUERY_BYTES: usize = 64 * 1024;
/// Deepest nesting of expressions and subqueries accepted (`1+1+…+1` with N terms nests N deep).
pub const MAX_NESTING: usize = 256;
/// Stack of each query thread. Only the pages a query touches are committed; the depth limit keeps a
/// query far inside it.
pub const STACK_BYTES: usize = 256 << 20;

/// The threads every query runs on: as many as there are cores, with [`STACK_BYTES`] stacks, at a
/// lower priority than the pipeline's threads.
pub fn pool() -> Result<&'static tokio::runtime::Runtime, SqlError> {
    static POOL: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        query_runtime("sql", std::thread::available_parallelism().map_or(2, |n| n.get())).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|reason| SqlError::Execution(format!("cannot start the query threads: {reason}")))
}

/// A runtime whose threads can plan and run queries: large stacks and a lower priority.
pub fn query_runtime(name: &str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .thread_stack_size(STACK_BYTES)
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
}

/// Nice 10 for the calling thread (Linux sets priorities per thread): under load the scheduler
/// prefers the pipeline's threads to a query's.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id; failure only leaves the priority as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Refuses query text over [`MAX_QUERY_BYTES`].
pub fn check_size(query: &str) -> Result<(), SqlError> {
    if query.len() > MAX_QUERY_BYTES {
        return Err(SqlError::Limit(format!(
            "the query is {} bytes; the limit is {MAX_QUERY_BYTES} bytes (max_query_bytes)",
            query.len()
        )));
    }
    Ok(())
}

/// Refuses a statement whose expressions or subqueries nest deeper than [`MAX_NESTING`]. The visit
/// stops at the first level past the limit, so the check itself stays shallow.
pub fn check_statement(statement: &Statement) -> Result<(), SqlError> {
    struct Depth {
        now: usize,
    }
    impl Depth {
        fn enter(&mut self) -> ControlFlow<()> {
            self.now += 1;
            if self.now > MAX_NESTING { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        }
    }
    impl Visitor for Depth {
        type Break = ();
        fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
            self.enter()
        }
        fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.enter()
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
    }
    match statement.visit(&mut Depth { now: 0 }) {
        ControlFlow::Break(()) => Err(SqlError::Limit(format!(
            "expressions or subqueries nest more than {MAX_NESTING} levels deep (max_nesting); simplify the query"
        ))),
        ControlFlow::Continue(()) => Ok(()),
    }
}

tokio::task_local! {
    /// The cancel signal of the Postgres connection whose task is running (absent elsewhere).
    static CONNECTION: Arc<watch::Sender<u64>>;
}

/// Cancel requests of the Postgres wire protocol: each connection's task carries a counter that a
/// cancel request bumps; a query watches the counter it started under and stops when it moves.
#[derive(Default)]
pub struct Cancels {
    by_key: Mutex<HashMap<(i32, Vec<u8>), Weak<watch::Sender<u64>>>>,
}

impl Cancels {
    /// Runs one connection's future with its own cancel signal.
    pub async fn scope<F: Future>(connection: F) -> F::Output {
        let (signal, _) = watch::channel(0);
        CONNECTION.scope(Arc::new(signal), connection).await
    }

    /// Files the running connection under the key its client was given (BackendKeyData).
    pub fn register(&self, pid: i32, secret: Vec<u8>) {
        let Ok(signal) = CONNECTION.try_with(Arc::downgrade) else { return };
        let mut by_key = lock(&self.by_key);
        by_key.retain(|_, s| s.strong_count() > 0);
        by_key.insert((pid, secret), signal);
    }

    /// A cancel request: stops what the connection with that key is running, if anything.
    pub fn cancel(&self, pid: i32, secret: Vec<u8>) {
        let by_key = lock(&self.by_key);
        if let Some(signal) = by_key.get(&(pid, secret)).and_then(Weak::upgrade) {
            signal.send_modify(|n| *n += 1);
            tracing::info!(pid, "postgres cancel request");
        }
    }
}

/// The running connection's cancel signal, as a query starting now sees it.
pub fn cancel_signal() -> Option<watch::Receiver<u64>> {
    CONNECTION.try_with(|signal| signal.subscribe()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn check(sql: &str) -> Result<(), SqlError> {
        let statements = Parser::new(&GenericDialect {}).with_recursion_limit(1000).try_with_sql(sql).unwrap().parse_statements().unwrap();
        check_statement(&statements[0])
    }

    #[test]
    fn nesting_is_counted_through_operators_and_subqueries() {
        let chain = |n: usize| format!("SELECT {}", vec!["1"; n].join("+"));
        assert!(check(&chain(MAX_NESTING - 2)).is_ok());
        let err = check(&chain(MAX_NESTING + 5)).unwrap_err();
        assert!(err.to_string().contains("max_nesting"), "{err}");
        let subqueries = (0..MAX_NESTING).fold("SELECT 1".to_string(), |q, _| format!("SELECT * FROM ({q}) AS t"));
        assert!(check(&subqueries).is_err());
        assert!(check_size(&"x".repeat(MAX_QUERY_BYTES + 1)).unwrap_err().to_string().contains("max_query_bytes"));
    }
}

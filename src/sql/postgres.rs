//! The Postgres wire protocol (pgwire through `datafusion-postgres`, which also provides the
//! `pg_catalog` that psql's `\d` and Grafana query), so psql, Grafana and Postgres drivers connect.
//! Password auth (cleartext, as with `password` in pg_hba.conf) from `[server]`, and read only: a
//! hook runs before all others and refuses anything but queries, `SHOW`, harmless client `SET`s,
//! transactions and cursors.

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use datafusion::arrow::error::ArrowError;
use datafusion::common::{DFSchema, ParamValues};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password};
use datafusion_postgres::pgwire::api::cancel::CancelHandler;
use datafusion_postgres::pgwire::messages::cancel::CancelRequest;
use datafusion_postgres::pgwire::api::results::{Response, Tag};
use datafusion_postgres::pgwire::api::{ClientInfo, ErrorHandler, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::{DfSessionService, QueryHook};

use super::SqlError;
use super::guard::Cancels;

mod connection;
mod held;
pub use connection::MAX_MESSAGE_BYTES;
pub use held::{MAX_HELD, MAX_HELD_BYTES};

/// Client settings that drivers send on connect; accepted and ignored (the session is shared).
const HARMLESS_SETTINGS: [&str; 8] = [
    "extra_float_digits",
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "client_min_messages",
    "standard_conforming_strings",
    "search_path",
];

enum Verdict {
    Allow,
    /// A harmless client setting: answered `SET` and not applied.
    Acknowledge,
    Refuse(String),
}

fn verdict(statement: &Statement) -> Verdict {
    match statement {
        Statement::Query(_) | Statement::StartTransaction { .. } | Statement::Commit { .. } | Statement::Rollback { .. } => Verdict::Allow,
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => Verdict::Allow,
        Statement::Explain { statement, analyze, .. } if matches!(**statement, Statement::Query(_)) || !analyze => Verdict::Allow,
        _ => {
            let text = statement.to_string().to_ascii_lowercase();
            if text.starts_with("show ") {
                return Verdict::Allow;
            }
            if let Some(setting) = text.strip_prefix("set ") {
                let name = setting.trim_start_matches("session ").split([' ', '=']).next().unwrap_or_default();
                if name == "statement_timeout" {
                    return Verdict::Allow;
                }
                if HARMLESS_SETTINGS.contains(&name) {
                    return Verdict::Acknowledge;
                }
            }
            Verdict::Refuse(format!("bearwatch SQL is read only: `{statement}` is refused"))
        }
    }
}

/// Why the Postgres interface refuses `statement`, or `None` when it lets it through (a query, SHOW,
/// a transaction or cursor statement, or a harmless client SET).
pub fn refusal(statement: &Statement) -> Option<String> {
    match verdict(statement) {
        Verdict::Refuse(message) => Some(message),
        Verdict::Allow | Verdict::Acknowledge => None,
    }
}

/// A failure sent to the client as `severity` (ERROR, or FATAL, which ends the connection) with
/// SQLSTATE `code`.
fn failure(severity: &str, code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(severity.into(), code.into(), message)))
}

fn refused(message: String) -> PgWireError {
    failure("ERROR", "25006", message)
}

/// A statement over the size or nesting limits: `54000` program_limit_exceeded.
fn over_limit(statement: &Statement) -> Option<PgWireError> {
    let error = super::guard::check_statement(statement)
        .and_then(|()| super::guard::check_size(&statement.to_string()))
        .err()?;
    Some(failure("ERROR", "54000", error.to_string()))
}

/// Runs first: refuses writes, settings and statements over the limits before any other hook or
/// DataFusion sees them, and files the connection for cancel requests.
struct ReadOnly {
    cancels: Arc<Cancels>,
}

impl ReadOnly {
    fn admit(&self, statement: &Statement, client: &(dyn ClientInfo + Send + Sync)) -> Result<Verdict, PgWireError> {
        let (pid, secret) = client.pid_and_secret_key();
        self.cancels.register(pid, secret.to_bytes().to_vec());
        crate::query_bounds::next_statement();
        if let Some(error) = over_limit(statement) {
            return Err(error);
        }
        Ok(verdict(statement))
    }

    /// The answer to a statement about to run (simple or extended protocol): `None` lets it
    /// through to the next hook and DataFusion.
    fn respond(&self, statement: &Statement, client: &dyn HookClient) -> Option<PgWireResult<Response>> {
        let verdict = match self.admit(statement, client).and_then(|verdict| admit_cursors(statement, client).map(|()| verdict)) {
            Ok(verdict) => verdict,
            Err(error) => return Some(Err(error)),
        };
        match verdict {
            Verdict::Allow => None,
            Verdict::Acknowledge => Some(Ok(Response::Execution(Tag::new("SET")))),
            Verdict::Refuse(message) => Some(Err(refused(message))),
        }
    }
}

/// The cursors a `DECLARE` opens count against what the connection may hold.
fn admit_cursors(statement: &Statement, client: &dyn HookClient) -> Result<(), PgWireError> {
    if let Statement::Declare { stmts } = statement {
        for declare in stmts {
            let name = declare.names.first().map_or("", |name| name.value.as_str());
            let query_bytes = declare.for_query.as_ref().map_or(0, |query| query.to_string().len());
            held::admit_cursor(name, query_bytes, client.portal_store())?;
        }
    }
    Ok(())
}

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(&self, statement: &Statement, _: &SessionContext, client: &mut dyn HookClient) -> Option<PgWireResult<Response>> {
        self.respond(statement, client)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _: &SessionContext,
        client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        let verdict = match self.admit(statement, client) {
            Ok(verdict) => verdict,
            Err(error) => return Some(Err(error)),
        };
        match verdict {
            Verdict::Allow => None,
            Verdict::Acknowledge => Some(Ok(LogicalPlan::EmptyRelation(EmptyRelation {
                produce_one_row: false,
                schema: Arc::new(DFSchema::empty()),
            }))),
            Verdict::Refuse(message) => Some(Err(refused(message))),
        }
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _: &LogicalPlan,
        _: &ParamValues,
        _: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        self.respond(statement, client)
    }
}

/// The one user and password from `[server]`.
struct ConfiguredUser {
    user: String,
    password: String,
}

impl fmt::Debug for ConfiguredUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfiguredUser({})", self.user)
    }
}

#[async_trait]
impl AuthSource for ConfiguredUser {
    /// An unknown user gets a password no client can send (a Postgres password cannot hold a NUL
    /// byte), so it fails exactly as a wrong password does: the answer does not tell who exists.
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        if login.user() == Some(self.user.as_str()) {
            Ok(Password::new(None, self.password.as_bytes().to_vec()))
        } else {
            Ok(Password::new(None, b"\0unknown user".to_vec()))
        }
    }
}

/// Cancel requests arrive on a connection of their own, naming the key of the one to cancel.
struct CancelByKey(Arc<Cancels>);

#[async_trait]
impl CancelHandler for CancelByKey {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.0.cancel(request.pid, request.secret_key.to_bytes().to_vec());
    }
}

/// Failures that datafusion-postgres passes on as they came (each one `XX000`, internal): sent with
/// the message and class the HTTP API gives them, under Postgres' own SQLSTATE for that failure.
struct Sqlstates;

impl ErrorHandler for Sqlstates {
    fn on_error<C: ClientInfo>(&self, _: &C, error: &mut PgWireError) {
        // A result column of a type the wire encoding has no Postgres type for (a map, a list of
        // lists): arrow-pg's own error, sent as XX000; it is the query's to change.
        if let PgWireError::UserError(info) = error
            && info.code == "XX000"
            && (info.message.starts_with("Unsupported Datatype") || info.message.starts_with("Unsupported List Datatype"))
        {
            info.code = "0A000".into();
            info.message = format!("a result column has no Postgres type: {}", info.message);
            info.hint = Some("cast it to text (CAST(x AS VARCHAR)), or ask over HTTP for JSON or Arrow".into());
            return;
        }
        let PgWireError::ApiError(inner) = error else { return };
        let info = if let Some(failure) = inner.downcast_ref::<DataFusionError>() {
            let sql = super::classify(failure);
            let code = super::sqlstate(failure, &sql);
            let mut info = ErrorInfo::new("ERROR".into(), code.into(), sql.to_string());
            info.position = cursor(super::position(failure));
            if code == "40001" {
                info.hint = Some("a merge replaced a part of the tables while the query ran: run it again".into());
            }
            info
        } else if let Some(arrow) = inner.downcast_ref::<ArrowError>().filter(|e| super::data_exception(e)) {
            // A value the encoding cannot write (a timestamp in a time zone that does not exist).
            ErrorInfo::new("ERROR".into(), super::arrow_sqlstate(arrow).into(), SqlError::Data(arrow.to_string()).to_string())
        } else if let Some(syntax) = inner.downcast_ref::<ParserError>() {
            // datafusion-postgres' parser reports no location; DataFusion's own (the HTTP API's)
            // does, for the same statement, and its message is then the one sent.
            let message = reparsed().filter(|m| super::line_and_column(m).is_some()).unwrap_or_else(|| syntax.to_string());
            let mut info = ErrorInfo::new("ERROR".into(), "42601".into(), message);
            info.position = cursor(super::line_and_column(&info.message));
            info
        } else {
            return;
        };
        tracing::debug!(code = %info.code, message = %info.message, "postgres query failed");
        *error = PgWireError::UserError(Box::new(info));
    }
}

thread_local! {
    /// The SQL of the message whose error is being built, for the error's cursor position.
    static ANSWERING: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (the error handler, which sees only the error) with `sql` as the statement the error is
/// about: a Query's or a Parse's text, none for the other messages.
fn answering<T>(sql: Option<String>, f: impl FnOnce() -> T) -> T {
    ANSWERING.with(|a| *a.borrow_mut() = sql);
    let answer = f();
    ANSWERING.with(|a| a.borrow_mut().take());
    answer
}

/// Postgres' error cursor, which psql shows as `LINE 1: …` with a caret: the 1-based index, in
/// characters, of `(line, column)` in the statement being answered.
fn cursor(position: Option<(usize, usize)>) -> Option<String> {
    let (line, column) = position?;
    ANSWERING.with(|a| {
        let sql = a.borrow();
        let lines_before: usize = sql.as_deref()?.split('\n').take(line.checked_sub(1)?).map(|l| l.chars().count() + 1).sum();
        Some((lines_before + column).to_string())
    })
}

/// The syntax error DataFusion's own parser finds in the statement being answered, if any.
fn reparsed() -> Option<String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    ANSWERING.with(|a| {
        let sql = a.borrow();
        // sqlparser's own recursion limit (50) keeps this within a connection task's stack.
        let sql = sql.as_deref().filter(|sql| sql.len() <= super::guard::MAX_QUERY_BYTES)?;
        let parsed = Parser::new(&GenericDialect {}).try_with_sql(sql).and_then(|mut p| p.parse_statements());
        parsed.err().map(|e| e.to_string())
    })
}

struct Handlers {
    session: Arc<DfSessionService>,
    startup: Arc<CleartextPasswordAuthStartupHandler<ConfiguredUser, DefaultServerParameterProvider>>,
    cancel: Arc<CancelByKey>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::query::SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::query::ExtendedQueryHandler> {
        self.session.clone()
    }

    fn startup_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::auth::StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(Sqlstates)
    }
}

/// Connections served at once, so that idle connections cannot pile up without bound. Past it the
/// one logging in the longest is closed for a new one; with every place logged in, the new one is
/// closed at once (a client retries).
pub const MAX_CONNECTIONS: usize = 64;

/// datafusion-postgres' accept loop, with each connection in its own cancel scope and its messages
/// bounded.
/// What the listener logs about connections it could not take, while that repeats.
static LOGGED: crate::telemetry::Repeats = crate::telemetry::Repeats::new(std::time::Duration::from_secs(30));

async fn accept(listener: tokio::net::TcpListener, handlers: Arc<Handlers>) {
    let places = crate::net::Places::new(MAX_CONNECTIONS);
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(held) = LOGGED.admit(&format!("accept: {e}")) {
                    tracing::warn!(error = %e, "postgres accept failed{}", crate::telemetry::held_back(held));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((place, closing)) = places.admit().await else {
            // Per kind of line, not per connection: a flood of them must not flood the log too.
            if let Some(held) = LOGGED.admit("refused: too many") {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, "postgres connection refused: too many open{}", crate::telemetry::held_back(held));
            }
            connection::closed("too_many");
            continue;
        };
        let handlers = handlers.clone();
        tokio::spawn(Cancels::scope(crate::query_bounds::scope(async move {
            if let Err(e) = connection::serve(socket, handlers, place, closing).await {
                tracing::debug!(%peer, error = %e, "postgres connection ended");
            }
        })));
    }
}

/// A running listener; it stops with the process.
pub struct PostgresServer {
    _thread: JoinHandle<()>,
}

/// Listens on `addr` (host:port) with the tables of `ctx` and the pg_catalog clients expect.
pub fn serve(addr: &str, ctx: SessionContext, user: &str, password: &str) -> Result<PostgresServer, SqlError> {
    let failed = |reason: String| SqlError::Tables { path: addr.to_string(), reason };
    setup_pg_catalog(&ctx, "datafusion", Arc::new(datafusion_postgres::auth::AuthManager::new())).map_err(|e| failed(e.to_string()))?;
    let cancels = Arc::new(Cancels::default());
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(ReadOnly { cancels: cancels.clone() }),
        Arc::new(CursorStatementHook),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    let session = Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx), hooks));
    let auth = ConfiguredUser { user: user.to_string(), password: password.to_string() };
    let startup = Arc::new(CleartextPasswordAuthStartupHandler::new(auth, DefaultServerParameterProvider::default()));
    let handlers = Arc::new(Handlers { session, startup, cancel: Arc::new(CancelByKey(cancels)) });
    // Statements are parsed and planned on these threads (queries run on the query threads), so
    // they get the same large stacks.
    let runtime = super::guard::query_runtime("postgres", 2).map_err(|e| failed(e.to_string()))?;
    // Bind here, so that a port in use is an error at start rather than a log line later.
    let listener = std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)).map_err(|e| failed(e.to_string()))?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|e| failed(e.to_string()))?
    };
    let thread = std::thread::Builder::new()
        .name("postgres".into())
        .spawn(move || {
            connection::quiet_decoding_panics();
            runtime.block_on(accept(listener, handlers))
        })
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(addr, "postgres wire protocol listening");
    Ok(PostgresServer { _thread: thread })
}

//! The Postgres wire protocol (pgwire through `datafusion-postgres`, which also provides the
//! `pg_catalog` that psql's `\d` and Grafana query), so psql, Grafana and Postgres drivers connect.
//! Password auth (cleartext, as with `password` in pg_hba.conf) from `[server]`, and read only: a
//! hook runs before all others and refuses anything but queries, `SHOW`, harmless client `SET`s,
//! transactions and cursors.

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use datafusion::common::{DFSchema, ParamValues};
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password};
use datafusion_postgres::pgwire::api::results::{Response, Tag};
use datafusion_postgres::pgwire::api::{ClientInfo, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::{DfSessionService, QueryHook, ServerOptions};

use super::SqlError;

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

fn refused(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), "25006".into(), message)))
}

/// Runs first: refuses writes and settings before any other hook or DataFusion sees them.
struct ReadOnly;

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(&self, statement: &Statement, _: &SessionContext, _: &mut dyn HookClient) -> Option<PgWireResult<Response>> {
        match verdict(statement) {
            Verdict::Allow => None,
            Verdict::Acknowledge => Some(Ok(Response::Execution(Tag::new("SET")))),
            Verdict::Refuse(message) => Some(Err(refused(message))),
        }
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _: &SessionContext,
        _: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        match verdict(statement) {
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
        _: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        match verdict(statement) {
            Verdict::Allow => None,
            Verdict::Acknowledge => Some(Ok(Response::Execution(Tag::new("SET")))),
            Verdict::Refuse(message) => Some(Err(refused(message))),
        }
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
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        if login.user() == Some(self.user.as_str()) {
            Ok(Password::new(None, self.password.as_bytes().to_vec()))
        } else {
            Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".into(),
                "28P01".into(),
                format!("password authentication failed for user \"{}\"", login.user().unwrap_or_default()),
            ))))
        }
    }
}

struct Handlers {
    session: Arc<DfSessionService>,
    startup: Arc<CleartextPasswordAuthStartupHandler<ConfiguredUser, DefaultServerParameterProvider>>,
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
}

/// A running listener; it stops with the process.
pub struct PostgresServer {
    _thread: JoinHandle<()>,
}

/// Listens on `addr` (host:port) with the tables of `ctx` and the pg_catalog clients expect.
pub fn serve(addr: &str, ctx: SessionContext, user: &str, password: &str) -> Result<PostgresServer, SqlError> {
    let failed = |reason: String| SqlError::Tables { path: addr.to_string(), reason };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| failed("expected host:port".into()))?;
    let port: u16 = port.parse().map_err(|_| failed(format!("bad port in {addr}")))?;
    setup_pg_catalog(&ctx, "datafusion", Arc::new(datafusion_postgres::auth::AuthManager::new())).map_err(|e| failed(e.to_string()))?;
    let hooks: Vec<Arc<dyn QueryHook>> =
        vec![Arc::new(ReadOnly), Arc::new(CursorStatementHook), Arc::new(SetShowHook), Arc::new(TransactionStatementHook)];
    let session = Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx), hooks));
    let auth = ConfiguredUser { user: user.to_string(), password: password.to_string() };
    let startup = Arc::new(CleartextPasswordAuthStartupHandler::new(auth, DefaultServerParameterProvider::default()));
    let handlers = Arc::new(Handlers { session, startup });
    let options = ServerOptions::new().with_host(host.to_string()).with_port(port);
    // Bind here, so that a port in use is an error at start rather than a log line later.
    std::net::TcpListener::bind(addr).map_err(|e| failed(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| failed(e.to_string()))?;
    let thread = std::thread::Builder::new()
        .name("postgres".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Err(e) = datafusion_postgres::serve_with_handlers(handlers, &options).await {
                    tracing::error!(error = %e, "postgres listener stopped");
                }
            });
        })
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(addr, "postgres wire protocol listening");
    Ok(PostgresServer { _thread: thread })
}

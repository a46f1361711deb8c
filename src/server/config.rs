//! `[server]`: the HTTP API, the Postgres listener, their secrets and the limits of one query.

use serde::Deserialize;

use crate::config::{EnvString, FieldError, HumanDuration, within};
use crate::sql::Limits;

/// `[server]`: the HTTP API. Off unless `http` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address, e.g. "127.0.0.1:9464" (`${ENV}` expands).
    pub http: Option<EnvString>,
    /// When set, requests need `Authorization: Bearer <token>`.
    pub auth_token: Option<EnvString>,
    /// Longest a query may run, on the HTTP API and the Postgres wire protocol alike.
    #[serde(default = "thirty_seconds")]
    pub query_timeout: HumanDuration,
    /// Memory one query may use for sorts, joins and aggregations, in MiB.
    #[serde(default = "default_query_memory")]
    pub query_memory_mib: usize,
    /// Postgres wire protocol listen address, e.g. "127.0.0.1:5433" (psql, Grafana, drivers).
    pub postgres: Option<EnvString>,
    #[serde(default = "default_postgres_user")]
    pub postgres_user: EnvString,
    /// Required with `postgres`; e.g. "${BEARWATCH_PG_PASSWORD}".
    pub postgres_password: Option<EnvString>,
}

fn default_postgres_user() -> EnvString {
    EnvString::expand("bearwatch").expect("no references")
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: None,
            auth_token: None,
            query_timeout: thirty_seconds(),
            query_memory_mib: default_query_memory(),
            postgres: None,
            postgres_user: default_postgres_user(),
            postgres_password: None,
        }
    }
}

fn thirty_seconds() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_query_memory() -> usize {
    512
}

impl ServerConfig {
    pub fn query_limits(&self) -> Limits {
        Limits { memory_bytes: self.query_memory_mib << 20, timeout: self.query_timeout.0 }
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        within("server.query_memory_mib", self.query_memory_mib, 1, 1 << 20)?;
        let timeout = self.query_timeout.as_millis();
        if !(1..=86_400_000).contains(&timeout) {
            return Err(("server.query_timeout", format!("must be between 1ms and 24h, is {}", self.query_timeout)));
        }
        if self.postgres.is_some() && self.postgres_password.is_none() {
            return Err(("server.postgres_password", "the Postgres listener needs a password (e.g. \"${BEARWATCH_PG_PASSWORD}\")".into()));
        }
        let secrets = [("server.auth_token", &self.auth_token), ("server.postgres_password", &self.postgres_password)];
        for (field, secret) in secrets {
            if secret.as_ref().is_some_and(|s| s.as_str().trim().is_empty()) {
                return Err((field, "is empty (check the environment variable it names): an empty secret would let anyone in".into()));
            }
        }
        Ok(())
    }
}

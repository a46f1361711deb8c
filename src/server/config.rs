//! `[server]`: the HTTP API, the Postgres listener, their secrets and the limits of one query.

use serde::{Deserialize, Serialize};

use crate::config::{EnvString, FieldError, HumanDuration, within};
use crate::sql::Limits;

/// What a caller of the API may do; each role may also do everything of the roles before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The dashboard, SQL and the silences list.
    Viewer,
    /// Also feedback (labels, verdicts, missed events) and silences.
    Analyst,
    /// Also model promotion and rollback.
    Admin,
}

/// `[[server.users]]`: a named caller with a role and a bearer token of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Recorded as the analyst of every row this caller writes.
    pub name: String,
    pub role: Role,
    /// e.g. "${BEARWATCH_TOKEN_ANA}"; at least 16 characters.
    pub token: EnvString,
}

/// The most users one server knows.
pub const MAX_USERS: usize = 1000;
/// The user `auth_token` authenticates.
pub const AUTH_TOKEN_USER: &str = "admin";
/// The name of every caller of an open API: no user may take it.
pub const ANONYMOUS: &str = "anonymous";
/// The shortest token, `auth_token` and users' alike.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Why a token cannot work: too short, or with characters a bearer header cannot carry as sent
/// (spaces are trimmed from the header, and only visible ASCII fits in it).
fn token_problem(token: &str) -> Option<String> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Some("has spaces or characters other than visible ASCII: no bearer header could carry it (check the environment variable it names)".into());
    }
    (token.len() < MIN_TOKEN_CHARS).then(|| format!("is shorter than {MIN_TOKEN_CHARS} characters (check the environment variable it names)"))
}

/// `[server]`: the HTTP API. Off unless `http` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address, e.g. "127.0.0.1:9464" (`${ENV}` expands).
    pub http: Option<EnvString>,
    /// When set, requests need `Authorization: Bearer <token>`; this token is the admin user `admin`.
    pub auth_token: Option<EnvString>,
    /// Named users, each with a role and a token. Without users and `auth_token` the API is open and
    /// every caller acts as `anonymous` with the admin role (a local, single-user setup).
    #[serde(default)]
    pub users: Vec<UserConfig>,
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
    /// An open API (no users, no `auth_token`) listens on loopback only unless this is set: on any
    /// other address everyone who reaches the port would be an admin.
    #[serde(default)]
    pub allow_open: bool,
    /// Host names (besides IP addresses, `localhost` and the listen address's own) that requests may
    /// name in `Host`, e.g. "bearwatch.example.com": a name not listed is refused, which stops DNS
    /// rebinding. "*" accepts any.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Other origins whose pages may send writes, e.g. "https://grafana.example.com"; the page this
    /// server serves is always allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

fn default_postgres_user() -> EnvString {
    EnvString::expand("bearwatch").expect("no references")
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: None,
            auth_token: None,
            users: Vec::new(),
            query_timeout: thirty_seconds(),
            query_memory_mib: default_query_memory(),
            postgres: None,
            postgres_user: default_postgres_user(),
            postgres_password: None,
            allow_open: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
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
        if let Some(problem) = self.auth_token.as_ref().and_then(|t| token_problem(t.as_str())) {
            return Err(("server.auth_token", problem));
        }
        if let Some(http) = &self.http
            && self.is_open()
            && !self.allow_open
            && !crate::net::is_loopback(http.as_str())
        {
            return Err((
                "server.http",
                format!(
                    "{} is not a loopback address and the API has no auth_token or users: anyone who reaches the port would be an admin; set auth_token or [[server.users]], listen on 127.0.0.1, or set allow_open = true",
                    http.as_str()
                ),
            ));
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
                return Err(("server.allowed_origins", format!("{origin:?} is not an origin like \"https://grafana.example.com\"")));
            }
        }
        self.validate_users()
    }

    /// Whether the API has no users and no `auth_token`: every caller is the admin `anonymous`.
    pub fn is_open(&self) -> bool {
        self.auth_token.is_none() && self.users.is_empty()
    }

    fn validate_users(&self) -> Result<(), FieldError> {
        if self.users.len() > MAX_USERS {
            return Err(("server.users", format!("at most {MAX_USERS} users, found {}", self.users.len())));
        }
        // Names compare case-insensitively: `Admin` beside `admin` would read as the same person.
        let mut names = std::collections::BTreeSet::from([ANONYMOUS.to_string()]);
        let mut tokens = std::collections::BTreeSet::new();
        if let Some(token) = &self.auth_token {
            names.insert(AUTH_TOKEN_USER.to_string());
            tokens.insert(token.as_str());
        }
        for (i, user) in self.users.iter().enumerate() {
            let which = format!("user {} ({:?})", i + 1, user.name);
            let valid = (1..=64).contains(&user.name.len())
                && user.name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
            if !valid {
                return Err(("server.users", format!("{which}: a name is 1 to 64 letters, digits or . _ @ -")));
            }
            if !names.insert(user.name.to_ascii_lowercase()) {
                let lower = user.name.to_ascii_lowercase();
                let why = if lower == ANONYMOUS {
                    " (anonymous is every caller of an open API)"
                } else if lower == AUTH_TOKEN_USER && self.auth_token.is_some() {
                    " (auth_token is the user admin)"
                } else {
                    " (names compare without case)"
                };
                return Err(("server.users", format!("{which}: the name is taken{why}")));
            }
            if let Some(problem) = token_problem(user.token.as_str()) {
                return Err(("server.users", format!("{which}: the token {problem}")));
            }
            if !tokens.insert(user.token.as_str()) {
                return Err(("server.users", format!("{which}: another user has the same token")));
            }
        }
        Ok(())
    }

    /// Every token the server accepts, with who it authenticates; empty when the API is open.
    pub fn principals(&self) -> Vec<(String, Principal)> {
        let admin = self.auth_token.iter().map(|t| (t.as_str().to_string(), Principal { name: AUTH_TOKEN_USER.into(), role: Role::Admin }));
        let users = self.users.iter().map(|u| (u.token.as_str().to_string(), Principal { name: u.name.clone(), role: u.role }));
        admin.chain(users).collect()
    }
}

/// The caller a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// Who calls an open API (no users, no `auth_token`).
    pub fn anonymous() -> Principal {
        Principal { name: ANONYMOUS.into(), role: Role::Admin }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(toml: &str) -> ServerConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn users_need_unique_names_and_tokens_of_their_own() {
        let user = |name: &str, token: &str| format!("[[users]]\nname = \"{name}\"\nrole = \"analyst\"\ntoken = \"{token}\"\n");
        let long = "0123456789abcdef";
        let ok = server(&(format!("auth_token = \"{long}-admin\"\n") + &user("ana", long) + &user("bob", &format!("{long}-bob"))));
        ok.validate().unwrap();
        let principals = ok.principals();
        assert_eq!(principals.len(), 3);
        assert_eq!(principals[0].1, Principal { name: "admin".into(), role: Role::Admin });
        assert_eq!(principals[1], (long.to_string(), Principal { name: "ana".into(), role: Role::Analyst }));
        for (config, complaint) in [
            (user("ana", long) + &user("ana", &format!("{long}x")), "the name is taken"),
            (user("ana", long) + &user("Ana", &format!("{long}x")), "without case"),
            (user("Anonymous", long), "every caller of an open API"),
            (format!("auth_token = \"{long}-admin\"\n") + &user("Admin", long), "auth_token is the user admin"),
            (user("ana", "short"), "shorter than 16"),
            (user("ana", &format!(" {long}")), "visible ASCII"),
            (user("ana", &format!("{long}é")), "visible ASCII"),
            (user("ana", long) + &user("bob", long), "same token"),
            (user("a b", long), "letters, digits"),
        ] {
            let (field, message) = server(&config).validate().unwrap_err();
            assert_eq!(field, "server.users");
            assert!(message.contains(complaint), "{config}: {message}");
        }
        assert!(toml::from_str::<ServerConfig>(&user("ana", long).replace("analyst", "owner")).is_err(), "unknown role");
        assert!(Role::Viewer < Role::Analyst && Role::Analyst < Role::Admin);
    }

    #[test]
    fn auth_token_follows_the_users_token_rules() {
        for (token, complaint) in [("t", "shorter than 16"), (" 0123456789abcdef ", "visible ASCII"), ("0123456789abcdefü", "visible ASCII")] {
            let (field, message) = server(&format!("auth_token = \"{token}\"\n")).validate().unwrap_err();
            assert_eq!(field, "server.auth_token");
            assert!(message.contains(complaint), "{token:?}: {message}");
        }
        server("auth_token = \"0123456789abcdef\"\n").validate().unwrap();
    }

    #[test]
    fn an_open_api_listens_on_loopback_unless_allowed() {
        for listen in ["127.0.0.1:9464", "[::1]:9464", "localhost:9464", "127.0.0.1:0"] {
            server(&format!("http = \"{listen}\"\n")).validate().unwrap();
        }
        for listen in ["0.0.0.0:9464", "[::]:9464", "10.1.2.3:80", "bearwatch.example.com:9464"] {
            let (field, message) = server(&format!("http = \"{listen}\"\n")).validate().unwrap_err();
            assert_eq!(field, "server.http");
            assert!(message.contains("allow_open"), "{message}");
            server(&format!("http = \"{listen}\"\nallow_open = true\n")).validate().unwrap();
            server(&format!("http = \"{listen}\"\nauth_token = \"0123456789abcdef\"\n")).validate().unwrap();
        }
        let (field, _) = server("allowed_origins = [\"grafana.example.com\"]\n").validate().unwrap_err();
        assert_eq!(field, "server.allowed_origins");
    }
}

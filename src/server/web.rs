//! What a web page elsewhere could make a browser do to this API, refused before the token check:
//! - a `Host` that is not this server's (DNS rebinding: another site's name resolving to us) gets a
//!   403; IP addresses, `localhost`, the listen address's name and `[server] allowed_hosts` pass;
//! - a write from another origin (`Origin` other than the `Host` asked for, or than
//!   `[server] allowed_origins`) gets a 403;
//! - a write whose body is not `Content-Type: application/json` gets a 415: a form or a
//!   `text/plain` fetch, which a page may send anywhere without asking first, never writes.
//!
//! `POST /sql` is a read: it keeps its `text/plain` body, but not from a foreign origin.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::net::host_name;
use super::{AppState, error};

/// Who may reach the API from a browser.
#[derive(Debug, Clone, Default)]
pub struct WebPolicy {
    /// Lower-case host names besides IP addresses and `localhost`; "*" is any.
    hosts: Vec<String>,
    /// Lower-case origins ("https://grafana.example.com").
    origins: Vec<String>,
}

impl WebPolicy {
    pub fn new(listen: &str, allowed_hosts: &[String], allowed_origins: &[String]) -> WebPolicy {
        let listen_host = host_name(listen).to_ascii_lowercase();
        let hosts = allowed_hosts.iter().map(|h| host_name(h).to_ascii_lowercase()).chain(std::iter::once(listen_host)).collect();
        let origins = allowed_origins.iter().map(|o| o.to_ascii_lowercase()).collect();
        WebPolicy { hosts, origins }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.hosts.iter().any(|h| h == "*" || *h == name)
    }

    /// A page's origin may write when it is this very server (as the request names it) or listed.
    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        authority.is_some_and(|a| a.eq_ignore_ascii_case(host)) || self.origins.contains(&origin)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    value.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Refusals logged, while they repeat: each is a request anyone can send.
static REFUSED: crate::telemetry::Repeats = crate::telemetry::Repeats::new(std::time::Duration::from_secs(30));

fn refused(status: StatusCode, message: String) -> Response {
    let reason = if status == StatusCode::FORBIDDEN { "origin" } else { "content_type" };
    metrics::counter!("bearwatch_http_refused_total", "reason" => reason).increment(1);
    // By reason, not by message: the message names the origin, which the sender chooses.
    if let Some(held) = REFUSED.admit(reason) {
        tracing::warn!(status = status.as_u16(), message, "request refused{}", crate::telemetry::held_back(held));
    }
    error(status, message)
}

pub(super) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| request.uri().authority().map(|a| a.as_str())).unwrap_or("");
    if !state.web.host_allowed(host) {
        return refused(StatusCode::FORBIDDEN, format!("Host {host:?} is not this server's name: add it to [server] allowed_hosts"));
    }
    let reads = [Method::GET, Method::HEAD, Method::OPTIONS];
    if !reads.contains(request.method()) {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("null");
            if !state.web.origin_allowed(origin, host) {
                return refused(StatusCode::FORBIDDEN, format!("writes from the origin {origin:?} are refused: add it to [server] allowed_origins"));
            }
        }
        if request.method() == Method::POST && request.uri().path() != "/sql" && !is_json(headers) {
            return refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the body as Content-Type: application/json".into());
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_addresses_localhost_the_listen_name_or_listed() {
        let policy = WebPolicy::new("bearwatch.internal:9464", &["Dash.Example.com".into()], &[]);
        for host in ["127.0.0.1:9464", "[::1]:9464", "10.0.0.7", "localhost:9464", "bearwatch.internal:9464", "dash.example.com"] {
            assert!(policy.host_allowed(host), "{host}");
        }
        for host in ["evil.example:9464", "", "127.0.0.1.evil.example", "localhost.evil.example"] {
            assert!(!policy.host_allowed(host), "{host}");
        }
        assert!(WebPolicy::new("0.0.0.0:1", &["*".into()], &[]).host_allowed("anything.example"));
    }

    #[test]
    fn writes_come_from_this_server_or_a_listed_origin() {
        let policy = WebPolicy::new("127.0.0.1:9464", &[], &["https://grafana.example.com".into()]);
        assert!(policy.origin_allowed("http://127.0.0.1:9464", "127.0.0.1:9464"));
        assert!(policy.origin_allowed("https://Grafana.example.com", "127.0.0.1:9464"));
        for origin in ["http://evil.example", "null", "http://127.0.0.1:9999", "file://"] {
            assert!(!policy.origin_allowed(origin, "127.0.0.1:9464"), "{origin}");
        }
    }

    #[test]
    fn only_json_bodies_write() {
        let with = |value: &str| HeaderMap::from_iter([(header::CONTENT_TYPE, value.parse().unwrap())]);
        assert!(is_json(&with("application/json")) && is_json(&with("Application/JSON; charset=utf-8")));
        assert!(!is_json(&with("text/plain")) && !is_json(&with("application/x-www-form-urlencoded")) && !is_json(&HeaderMap::new()));
    }
}

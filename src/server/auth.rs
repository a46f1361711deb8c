//! Who is asking: bearer tokens to named users with roles (`[server] users`, `auth_token` as the
//! user `admin`), checked by each handler through the extractor of the role it needs.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::{AppState, error};
use crate::server::config::{Principal, Role};

/// The credentials of `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
}

/// Compares in time that depends on the lengths only, not on where the first difference is.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Every token the server accepts and who it is ([`crate::server::ServerConfig::principals`]);
/// none: the API is open. Shared, so that a reload of the pipeline file puts new tokens in force
/// (a token revoked is refused from the next request on).
#[derive(Clone, Default)]
pub struct Principals(std::sync::Arc<std::sync::RwLock<Vec<(String, Principal)>>>);

impl Principals {
    pub fn new(principals: Vec<(String, Principal)>) -> Principals {
        Principals(std::sync::Arc::new(std::sync::RwLock::new(principals)))
    }

    pub fn replace(&self, principals: Vec<(String, Principal)>) {
        *crate::sync::write(&self.0) = principals;
    }

    /// Who `token` is; `Some(anonymous)` for any caller when the API is open.
    fn who(&self, token: Option<&str>) -> Option<Principal> {
        let principals = crate::sync::read(&self.0);
        if principals.is_empty() {
            return Some(Principal::anonymous());
        }
        token.and_then(|given| principals.iter().find(|(token, _)| same(token, given))).map(|(_, principal)| principal.clone())
    }
}

/// Resolves the caller (or refuses with 401) and hands it to the handlers in the request's extensions.
pub(super) async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let Some(caller) = state.principals.who(given) else {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn caller(parts: &Parts, needs: Role) -> Result<Principal, Response> {
    let caller = parts.extensions.get::<Principal>().cloned().ok_or_else(|| error(StatusCode::UNAUTHORIZED, "not authenticated"))?;
    if caller.role < needs {
        let role = |r: Role| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        return Err(error(StatusCode::FORBIDDEN, format!("{} has the {} role; this needs the {} role", caller.name, role(caller.role), role(needs))));
    }
    Ok(caller)
}

/// A caller with at least the viewer role.
pub struct Viewer(pub Principal);
/// A caller with at least the analyst role.
pub struct Analyst(pub Principal);
/// A caller with the admin role.
pub struct Admin(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Viewer {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        caller(parts, Role::Viewer).map(Viewer)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Analyst {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        caller(parts, Role::Analyst).map(Analyst)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        caller(parts, Role::Admin).map(Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert_eq!(bearer("bearer  t0k"), Some("t0k"));
        assert_eq!(bearer("Basic t0k"), None);
    }
}

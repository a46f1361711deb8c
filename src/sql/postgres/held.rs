//! What one Postgres connection keeps between messages: prepared statements (their text), portals
//! (their bound parameters, and a suspended query) and cursors (a started query). pgwire keeps any
//! number of them for as long as the connection lives: 1,500 portals each bound with a 1 MB
//! parameter took 2.1 GB in 2.5 s, and 10,000 prepared statements of 60 KB 160 MB. Here one
//! connection holds at most [`MAX_HELD`] of them, of at most [`MAX_HELD_BYTES`] of text and
//! parameters together; past that, the message that would keep one more fails with SQLSTATE 54000
//! and the client can close some (Close, `DEALLOCATE`, `CLOSE`) and go on.
//!
//! The registry notes what each message asks to keep, by name. What pgwire frees by itself (the
//! unnamed portal at Sync, portals at a transaction's end, a statement that failed to parse) is
//! found when the registry is full, by asking the connection's store which names it still holds.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;

use datafusion_postgres::pgwire::api::DEFAULT_NAME;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::error::PgWireError;
use datafusion_postgres::pgwire::messages::PgWireFrontendMessage;
use datafusion_postgres::pgwire::messages::extendedquery::{TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT};

/// Prepared statements, portals and cursors one connection may hold; JDBC's statement cache keeps
/// 256 by default, asyncpg's 100.
pub const MAX_HELD: usize = 1_000;
/// Their text and bound parameters together: 64 connections hold at most 512 MiB.
pub const MAX_HELD_BYTES: usize = 8 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Statement,
    /// A portal of the extended protocol, or a cursor: pgwire keeps both as portals.
    Portal,
}

#[derive(Default)]
struct Held {
    bytes_of: HashMap<(Kind, String), usize>,
    bytes: usize,
}

tokio::task_local! {
    static HELD: RefCell<Held>;
}

/// Runs one connection's task with its own registry.
pub async fn scope<F: Future>(connection: F) -> F::Output {
    HELD.scope(RefCell::default(), connection).await
}

/// Checks a frontend message that would keep something and notes what it keeps; forgets what a
/// Close frees.
pub fn admit<S: PortalStore>(message: &PgWireFrontendMessage, store: &S) -> Result<(), PgWireError> {
    let name = |name: &Option<String>| name.as_deref().unwrap_or(DEFAULT_NAME).to_string();
    match message {
        PgWireFrontendMessage::Parse(parse) => keep(Kind::Statement, name(&parse.name), parse.query.len() + 4 * parse.type_oids.len(), store),
        PgWireFrontendMessage::Bind(bind) => {
            let bytes = bind.parameters.iter().map(|p| p.as_ref().map_or(0, |p| p.len())).sum();
            keep(Kind::Portal, name(&bind.portal_name), bytes, store)
        }
        PgWireFrontendMessage::Close(close) => {
            let kind = match close.target_type {
                TARGET_TYPE_BYTE_STATEMENT => Kind::Statement,
                TARGET_TYPE_BYTE_PORTAL => Kind::Portal,
                _ => return Ok(()),
            };
            let _ = HELD.try_with(|held| held.borrow_mut().forget(&(kind, name(&close.name))));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks a cursor that `DECLARE` opens, with the text of its query.
pub fn admit_cursor<S: PortalStore>(name: &str, query_bytes: usize, store: &S) -> Result<(), PgWireError> {
    keep(Kind::Portal, name.to_string(), query_bytes, store)
}

fn keep<S: PortalStore>(kind: Kind, name: String, bytes: usize, store: &S) -> Result<(), PgWireError> {
    // Outside a connection's task (no registry) nothing is kept across messages.
    HELD.try_with(|held| held.borrow_mut().keep((kind, name), bytes, |(kind, name)| still_held(store, *kind, name)))
        .unwrap_or(Ok(()))
}

fn still_held<S: PortalStore>(store: &S, kind: Kind, name: &str) -> bool {
    match kind {
        Kind::Statement => store.get_statement(name).is_some(),
        Kind::Portal => store.get_portal(name).is_some(),
    }
}

impl Held {
    /// Notes `key` with `bytes`, replacing what it held; refuses it when the registry would pass a
    /// bound even after dropping what `held` says the store no longer has.
    fn keep(&mut self, key: (Kind, String), bytes: usize, held: impl Fn(&(Kind, String)) -> bool) -> Result<(), PgWireError> {
        self.forget(&key);
        if self.over(bytes) {
            self.bytes_of.retain(|key, _| held(key));
            self.bytes = self.bytes_of.values().sum();
        }
        if self.over(bytes) {
            let message = format!(
                "this connection holds {} prepared statements, portals and cursors of {} bytes; the limits are {MAX_HELD} and {MAX_HELD_BYTES} bytes: close some (Close, DEALLOCATE, CLOSE) or use a new connection",
                self.bytes_of.len(),
                self.bytes
            );
            return Err(super::failure("ERROR", "54000", message));
        }
        self.bytes += bytes;
        self.bytes_of.insert(key, bytes);
        Ok(())
    }

    fn over(&self, more_bytes: usize) -> bool {
        self.bytes_of.len() >= MAX_HELD || self.bytes + more_bytes > MAX_HELD_BYTES
    }

    fn forget(&mut self, key: &(Kind, String)) {
        if let Some(bytes) = self.bytes_of.remove(key) {
            self.bytes -= bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion_postgres::pgwire::error::ErrorInfo;

    use super::*;

    fn statement(name: &str) -> (Kind, String) {
        (Kind::Statement, name.to_string())
    }

    #[test]
    fn past_either_bound_a_name_is_refused_until_some_are_freed() {
        let mut held = Held::default();
        let everything = |_: &(Kind, String)| true;
        for i in 0..MAX_HELD {
            held.keep(statement(&i.to_string()), 10, everything).unwrap();
        }
        let refused = held.keep(statement("one more"), 10, everything).unwrap_err();
        assert!(ErrorInfo::from(refused).code == "54000");
        // Replacing a name keeps the count.
        held.keep(statement("7"), 20, everything).unwrap();
        held.forget(&statement("7"));
        held.keep(statement("one more"), 10, everything).unwrap();

        let mut held = Held::default();
        held.keep((Kind::Portal, "big".into()), MAX_HELD_BYTES - 5, everything).unwrap();
        assert!(held.keep((Kind::Portal, "small".into()), 6, everything).is_err());
        held.keep((Kind::Portal, "small".into()), 5, everything).unwrap();
        // A portal the store no longer has (closed by a transaction's end, say) frees its place.
        held.keep((Kind::Portal, "next".into()), 100, |key: &(Kind, String)| key.1 != "big").unwrap();
        assert_eq!((held.bytes_of.len(), held.bytes), (2, 105));
    }
}

//! What the HTTP and Postgres listeners share about their clients' connections: a client that
//! stops reading its answer (a large SQL result held in the kernel's buffers) must not hold its
//! connection, its query and the query's memory for good ([`WriteDeadline`]), and clients that
//! hold connections doing nothing must not keep others out ([`Places`]). And what the listeners
//! and the notifiers read of an address: its host, and whether that is this machine.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Sleep;

/// A stream whose writes fail once the client has accepted no byte for `timeout`.
pub struct WriteDeadline<S> {
    stream: S,
    timeout: Duration,
    /// Counts the cut (a metric of the listener's).
    on_timeout: fn(),
    /// Started when a write first waits on the client; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(stream: S, timeout: Duration, on_timeout: fn()) -> Self {
        WriteDeadline { stream, timeout, on_timeout, stalled: None }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    fn within_deadline<T>(&mut self, cx: &mut Context<'_>, written: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(self.timeout)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = None;
        (self.on_timeout)();
        let message = format!("the client took no byte of the answer for {} s", self.timeout.as_secs());
        Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message)))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.within_deadline(cx, written)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.within_deadline(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        this.within_deadline(cx, flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A listener's bounded places for connections. When every place is taken, a new connection does
/// not simply wait or go away: the connection that has been closable the longest (idle between
/// requests, or still logging in) is closed to make room. So clients that open connections and
/// send nothing, or a request head a byte at a time, cannot keep everyone else out; a connection
/// busy with a request, or a logged-in session, is never closed for another.
#[derive(Clone)]
pub struct Places {
    open: Arc<Semaphore>,
    connections: Arc<Mutex<Connections>>,
}

#[derive(Default)]
struct Connections {
    next: u64,
    by_id: HashMap<u64, Connection>,
}

struct Connection {
    /// Requests in flight: closable only at 0.
    busy: usize,
    /// Never closed for another (a logged-in session).
    kept: bool,
    /// Since when it has been closable.
    since: Instant,
    close: Option<oneshot::Sender<()>>,
}

impl Places {
    pub fn new(places: usize) -> Places {
        Places { open: Arc::new(Semaphore::new(places)), connections: Arc::default() }
    }

    /// A place for a new connection: a free one, else that of the connection closable the longest,
    /// closed for it; `None` when no connection can be closed. The receiver resolves when this
    /// place is taken for a newer connection in turn: the connection should then end.
    pub async fn admit(&self) -> Option<(Place, oneshot::Receiver<()>)> {
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !self.close_longest_closable() {
                    return None;
                }
                // The closed connection's task ends at its next poll and hands its place over.
                tokio::time::timeout(Duration::from_secs(1), self.open.clone().acquire_owned()).await.ok()?.ok()?
            }
        };
        let (close, closing) = oneshot::channel();
        let mut connections = self.connections.lock().expect("connections");
        let id = connections.next;
        connections.next += 1;
        connections.by_id.insert(id, Connection { busy: 0, kept: false, since: Instant::now(), close: Some(close) });
        Some((Place { id, connections: self.connections.clone(), _permit: permit }, closing))
    }

    fn close_longest_closable(&self) -> bool {
        let mut connections = self.connections.lock().expect("connections");
        let longest = connections.by_id.values_mut().filter(|c| !c.kept && c.busy == 0 && c.close.is_some()).min_by_key(|c| c.since);
        longest.and_then(|c| c.close.take()).is_some_and(|close| close.send(()).is_ok())
    }
}

/// One connection's place, given back when it is dropped.
pub struct Place {
    id: u64,
    connections: Arc<Mutex<Connections>>,
    _permit: OwnedSemaphorePermit,
}

impl Place {
    /// Not closable while the returned guard lives (a request in flight, its answer included).
    pub fn busy(&self) -> Busy {
        self.update(|c| c.busy += 1);
        Busy { id: self.id, connections: self.connections.clone() }
    }

    /// Never closable from now on (a session that logged in).
    pub fn keep(&self) {
        self.update(|c| c.kept = true);
    }

    fn update(&self, change: impl FnOnce(&mut Connection)) {
        if let Some(connection) = self.connections.lock().expect("connections").by_id.get_mut(&self.id) {
            change(connection);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.connections.lock().expect("connections").by_id.remove(&self.id);
    }
}

/// A request in flight on a connection; when the last one ends, the connection is closable again.
pub struct Busy {
    id: u64,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(connection) = self.connections.lock().expect("connections").by_id.get_mut(&self.id) {
            connection.busy -= 1;
            if connection.busy == 0 {
                connection.since = Instant::now();
            }
        }
    }
}

/// The host of "name:port", "[v6]:port" or a bare name or address: a listen address or a `Host`.
pub fn host_name(authority: &str) -> &str {
    let authority = authority.trim();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Whether a listen address ("127.0.0.1:9464", "[::1]:80", "localhost:9464") or a host name is on
/// loopback only.
pub fn is_loopback(listen: &str) -> bool {
    let host = host_name(listen);
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_listener_closes_the_connection_closable_the_longest_and_never_a_busy_or_kept_one() {
        let places = Places::new(3);
        let (oldest, oldest_closing) = places.admit().await.unwrap();
        let (kept, _) = places.admit().await.unwrap();
        kept.keep();
        let (newest, _newest_closing) = places.admit().await.unwrap();
        let busy = newest.busy();
        // Full: the oldest closable one makes room.
        let admitted = tokio::spawn({
            let places = places.clone();
            async move { places.admit().await }
        });
        oldest_closing.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!admitted.is_finished(), "its place is not free until it ends");
        drop(oldest);
        // Now the others are kept and busy: the fourth goes next.
        let (fourth, fourth_closing) = admitted.await.unwrap().unwrap();
        let fifth = tokio::spawn({
            let places = places.clone();
            async move { places.admit().await }
        });
        fourth_closing.await.unwrap();
        drop(fourth);
        let (fifth, _) = fifth.await.unwrap().unwrap();
        // With the fifth busy too, nothing can be closed.
        let _also_busy = fifth.busy();
        assert!(places.admit().await.is_none());
        // The request ends: the connection is closable again.
        drop(busy);
        assert!(places.close_longest_closable());
        drop(kept);
    }
}

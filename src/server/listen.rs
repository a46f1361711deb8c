//! The HTTP accept loop. axum's `serve` bounds neither the open connections nor how long a client
//! may take to send a request head (it gives hyper no timer, so hyper's header timeout never runs):
//! a client that opened connections and sent nothing, or a header a byte at a time, kept each one
//! for good, until the process ran out of file descriptors and refused everyone. Here a connection
//! past [`MAX_CONNECTIONS`] is closed at once (as the Postgres listener does), and each connection
//! must send its next request head within [`HEAD_TIMEOUT`], which also closes keep-alive
//! connections left idle that long. A client that stops reading its answer (a large SQL result
//! held in the kernel's buffers) is cut off once it has taken no byte for [`WRITE_TIMEOUT`]; the
//! body's own deadline is the server's `read_body` middleware.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

use crate::net::WriteDeadline;

/// Connections open at once; the dashboard, a scraper and a few scripts need a handful.
pub const MAX_CONNECTIONS: usize = 256;
/// From a connection's open, or its previous response, to the end of its next request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an answer may wait for the client to take any of it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long requests in flight at shutdown may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop` fires, then gives requests in flight [`DRAIN_TIMEOUT`].
pub async fn serve(listener: TcpListener, app: Router, mut stop: oneshot::Receiver<()>) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    // Tells every connection to finish its request in flight and close (idle ones close at once).
    let (closing, closed) = tokio::sync::watch::channel(false);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => break,
            // Reap finished connections as they end, so the set stays as small as the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait a little instead of spinning.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "http connection refused: too many open");
            metrics::counter!("bearwatch_http_connections_refused_total").increment(1);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut closed = closed.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(WriteDeadline::new(stream, WRITE_TIMEOUT, count_write_timeout)), service);
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = closed.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
            drop(permit);
        });
    }
    let _ = closing.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        connections.shutdown().await;
    }
}

fn count_write_timeout() {
    metrics::counter!("bearwatch_http_write_timeouts_total").increment(1);
}

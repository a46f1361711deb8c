//! The HTTP accept loop. axum's `serve` bounds neither the open connections nor how long a client
//! may take to send a request head (it gives hyper no timer, so hyper's header timeout never runs):
//! a client that opened connections and sent nothing, or a header a byte at a time, kept each one
//! for good, until the process ran out of file descriptors and refused everyone. Here at most
//! [`MAX_CONNECTIONS`] are open; past that, the connection idle the longest (between requests, or
//! still sending its head) is closed for the new one (`net::Places`, as the Postgres listener does
//! with connections still logging in), and only when every one is busy with a request is the new
//! one closed at once. Each connection must send its next request head within [`HEAD_TIMEOUT`],
//! which also closes keep-alive connections left idle that long. A client that stops reading its
//! answer (a large SQL result held in the kernel's buffers) is cut off once it has taken no byte
//! for [`WRITE_TIMEOUT`]; the body's own deadline is the server's `read_body` middleware.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::net::{Busy, Place, Places, WriteDeadline};

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
    let places = Places::new(MAX_CONNECTIONS);
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
        let Some((place, mut taken)) = places.admit().await else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "http connection refused: every open one is busy");
            metrics::counter!("bearwatch_http_connections_refused_total").increment(1);
            continue;
        };
        let service = Busying { app: TowerToHyperService::new(app.clone()), place: Arc::new(place) };
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
                // Idle the longest when every place was taken: closed for a new connection.
                _ = &mut taken => {
                    metrics::counter!("bearwatch_http_connections_closed_idle_total").increment(1);
                    Ok(())
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
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

/// The app, with each request marking its connection busy until its answer is sent, so that only
/// connections between requests (or still sending a head) are closed to make room.
struct Busying {
    app: TowerToHyperService<Router>,
    place: Arc<Place>,
}

impl hyper::service::Service<axum::http::Request<Incoming>> for Busying {
    type Response = axum::http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: axum::http::Request<Incoming>) -> Self::Future {
        let busy = self.place.busy();
        let answer = self.app.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Body::new(BusyBody { body, _busy: busy })))
        })
    }
}

/// An answer's body, its connection busy until it is sent or dropped.
struct BusyBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

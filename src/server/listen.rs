//! The HTTP accept loop. axum's `serve` bounds neither the open connections nor how long a client
//! may take to send a request head (it gives hyper no timer, so hyper's header timeout never runs):
//! a client that opened connections and sent nothing, or a header a byte at a time, kept each one
//! for good, until the process ran out of file descriptors and refused everyone. Here at most
//! [`MAX_CONNECTIONS`] are open; past that, the connection idle the longest (between requests, or
//! still sending its head or body) is closed for the new one (`net::Places`, as the Postgres
//! listener does with connections still logging in), and only when every one is busy with a
//! request is the new one closed at once. A request counts as busy from the end of its body (see
//! [`busy_while_answering`]) until its answer is sent. Each connection must send its next request
//! head within [`HEAD_TIMEOUT`], which also closes keep-alive connections left idle that long. A
//! client that stops reading its answer (a large SQL result held in the kernel's buffers) is cut
//! off once it has taken no byte for [`WRITE_TIMEOUT`]; the body's own deadline is the server's
//! `read_body` middleware.

use std::convert::Infallible;
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

/// What the listener logs about connections it could not take, while that repeats.
static LOGGED: crate::telemetry::Repeats = crate::telemetry::Repeats::new(Duration::from_secs(30));

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
                if let Some(held) = LOGGED.admit(&format!("accept: {e}")) {
                    tracing::warn!(error = %e, "http accept failed{}", crate::telemetry::held_back(held));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((place, mut taken)) = places.admit().await else {
            // Per kind of line, not per connection: a flood of them must not flood the log too.
            if let Some(held) = LOGGED.admit("refused: busy") {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, "http connection refused: every open one is busy{}", crate::telemetry::held_back(held));
            }
            metrics::counter!("bearwatch_http_connections_refused_total").increment(1);
            continue;
        };
        let service = WithPlace { app: TowerToHyperService::new(app.clone()), place: Arc::new(place) };
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

/// The app, with each request carrying its connection's place for [`busy_while_answering`].
struct WithPlace {
    app: TowerToHyperService<Router>,
    place: Arc<Place>,
}

impl hyper::service::Service<axum::http::Request<Incoming>> for WithPlace {
    type Response = axum::http::Response<Body>;
    type Error = Infallible;
    type Future = <TowerToHyperService<Router> as hyper::service::Service<axum::http::Request<Incoming>>>::Future;

    fn call(&self, mut request: axum::http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(RequestPlace(self.place.clone()));
        self.app.call(request)
    }
}

/// A request's connection place, in the request's extensions.
#[derive(Clone)]
struct RequestPlace(Arc<Place>);

/// Runs the rest of the app with the request's connection busy until its answer is sent or
/// dropped. The server calls this once the request's body is in: until then nothing has acted on
/// the request, so a connection still sending its body (a byte a second, say) counts as idle and
/// may be closed for another, as one still sending its head may.
pub async fn busy_while_answering(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let busy = request.extensions().get::<RequestPlace>().map(|place| place.0.busy());
    let response = next.run(request).await;
    match busy {
        Some(busy) => response.map(|body| Body::new(BusyBody { body, _busy: busy })),
        None => response,
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

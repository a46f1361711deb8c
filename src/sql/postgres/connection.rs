//! One Postgres client connection, driven here instead of by pgwire's `process_socket` so that a
//! client cannot make it hold without bound what it sends or what it is sent:
//! - pgwire accepts a Query, Parse, Bind or CopyData message of up to 1 GB and holds all of it until
//!   the last byte arrives, so 64 connections could make the process hold 64 GB. Here each
//!   message's declared length is checked as its header comes in, and one over
//!   [`MAX_MESSAGE_BYTES`] ends the connection with SQLSTATE 54000 before its body is read;
//! - a client that takes no byte of an answer for [`WRITE_TIMEOUT`] is cut off, as over HTTP, so
//!   that its query and the query's memory are not held for good;
//! - what a connection keeps between messages is bounded by `held`;
//! - a connection still logging in may have its place taken for a newer one when every place is
//!   taken (`net::Places`), so that clients which connect and never log in cannot keep everyone
//!   out; a logged-in session keeps its place.
//!
//! The rest is pgwire's own loop: SSL and GSS encryption requests are refused (no TLS here), the
//! startup and password exchange must end within [`STARTUP_TIMEOUT`], and every message goes to
//! pgwire's handlers.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Once;
use std::task::{Context, Poll};
use std::time::Duration;

use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore, DefaultClient, ErrorHandler, PgWireConnectionState, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError};
use datafusion_postgres::pgwire::messages::response::{GssEncResponse, SslResponse};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage, SslNegotiationMetaMessage};
use datafusion_postgres::pgwire::tokio::server::{PgWireMessageServerCodec, process_error, process_message};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

use crate::net::{Place, WriteDeadline};

/// The largest message a client may send: a query's text or a statement's bound parameters. The
/// same as an HTTP request body.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// How long an answer may wait for the client to take any of it, as over HTTP.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// From connect to the end of authentication, as pgwire and Postgres' `authentication_timeout`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a refused connection takes what its client still sends before it closes.
const LINGER: Duration = Duration::from_secs(1);

/// The codes of the two requests that come before the startup message, in place of a protocol version.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Serves one client until it leaves, breaks the protocol or sends a message over the bound, or is
/// closed while logging in to make room for another.
pub async fn serve<H: PgWireServerHandlers>(tcp: TcpStream, handlers: H, place: Place, closing: oneshot::Receiver<()>) -> io::Result<()> {
    super::held::scope(drive(tcp, handlers, place, closing)).await
}

/// Why no message could be read.
enum Unreadable {
    /// pgwire's decoder panicked on the body (its fields run past its length), with the panic's text.
    Malformed(String),
    Failed(PgWireError),
}

/// The next message from the client. pgwire's decoder panics on some malformed bodies (a Bind or
/// Parse whose counts run past its end; found by sending random bodies, 60 panics in 300 sessions):
/// such a message is the client's protocol violation, answered as one, not a crash of the task.
async fn next_message<S>(socket: &mut Framed<BoundedMessages, PgWireMessageServerCodec<S>>) -> Option<Result<PgWireFrontendMessage, Unreadable>> {
    match AssertUnwindSafe(Decoding(socket.next())).catch_unwind().await {
        Ok(next) => next.map(|read| read.map_err(Unreadable::Failed)),
        Err(panic) => {
            let text = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            Some(Err(Unreadable::Malformed(text.unwrap_or_default())))
        }
    }
}

thread_local! {
    /// Set while this thread polls pgwire's decoder.
    static DECODING: Cell<bool> = const { Cell::new(false) };
}

/// A panic while pgwire decodes is a malformed message, which the loop counts and answers: the
/// process-wide panic hook stays quiet about those and passes every other panic on. Installed when
/// the listener starts.
pub fn quiet_decoding_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Polls a read of the next message with [`DECODING`] set.
struct Decoding<F>(F);

impl<F: Future + Unpin> Future for Decoding<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        struct Unset;
        impl Drop for Unset {
            fn drop(&mut self) {
                DECODING.with(|decoding| decoding.set(false));
            }
        }
        DECODING.with(|decoding| decoding.set(true));
        let _unset = Unset;
        Pin::new(&mut self.0).poll(cx)
    }
}

async fn drive<H: PgWireServerHandlers>(tcp: TcpStream, handlers: H, place: Place, mut closing: oneshot::Receiver<()>) -> io::Result<()> {
    let peer = tcp.peer_addr()?;
    tcp.set_nodelay(true)?;
    let tcp = WriteDeadline::new(tcp, WRITE_TIMEOUT, || closed("write_timeout"));
    let mut socket = Framed::new(BoundedMessages::new(tcp), PgWireMessageServerCodec::new(DefaultClient::new(peer, false)));
    let startup = tokio::time::sleep(STARTUP_TIMEOUT);
    tokio::pin!(startup);
    let (startup_handler, simple, extended, copy, cancel, errors) = (
        handlers.startup_handler(),
        handlers.simple_query_handler(),
        handlers.extended_query_handler(),
        handlers.copy_handler(),
        handlers.cancel_handler(),
        handlers.error_handler(),
    );
    socket.set_state(PgWireConnectionState::AwaitingSslRequest);
    let mut logged_in = false;
    loop {
        let in_startup = matches!(
            socket.state(),
            PgWireConnectionState::AwaitingSslRequest | PgWireConnectionState::AwaitingStartup | PgWireConnectionState::AuthenticationInProgress
        );
        let next = if in_startup {
            tokio::select! {
                _ = &mut startup => return Ok(()),
                // Its place was taken for a newer connection.
                _ = &mut closing => {
                    closed("closed_logging_in");
                    return Ok(());
                }
                next = next_message(&mut socket) => next,
            }
        } else {
            if !logged_in {
                logged_in = true;
                place.keep();
            }
            next_message(&mut socket).await
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(Unreadable::Malformed(panic))) => {
                tracing::debug!(%peer, panic, "postgres message malformed");
                closed("malformed_message");
                let error = super::failure("FATAL", "08P01", "invalid message: its fields run past its length".into());
                process_error(&mut socket, error, false).await?;
                return Ok(());
            }
            Some(Err(Unreadable::Failed(e))) => {
                if let Some(length) = socket.get_ref().refused {
                    let message = format!("a message of {length} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes");
                    process_error(&mut socket, super::failure("FATAL", "54000", message), false).await?;
                    linger(socket.into_inner().io.into_inner()).await;
                    return Ok(());
                }
                return Err(io::Error::other(e.to_string()));
            }
            None => return Ok(()),
        };
        match message {
            PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::PostgresSsl(_)) => {
                socket.send(PgWireBackendMessage::SslResponse(SslResponse::Refuse)).await?;
            }
            PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::PostgresGss(_)) => {
                socket.send(PgWireBackendMessage::GssEncResponse(GssEncResponse::Refuse)).await?;
            }
            // The next message is the startup message (or a cancel request); pgwire reads it in
            // this state.
            PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::None) => socket.set_state(PgWireConnectionState::AwaitingStartup),
            // The client is leaving: close, as some clients wait for the server to.
            PgWireFrontendMessage::Terminate(_) => return Ok(()),
            message => {
                let sql = match &message {
                    PgWireFrontendMessage::Query(query) => Some(query.query.clone()),
                    PgWireFrontendMessage::Parse(parse) => Some(parse.query.clone()),
                    _ => None,
                };
                let extended_protocol = match socket.state() {
                    PgWireConnectionState::CopyInProgress(extended_protocol) => extended_protocol,
                    _ => message.is_extended_query(),
                };
                let handled = match super::held::admit(&message, socket.portal_store()) {
                    Ok(()) => {
                        process_message(message, &mut socket, startup_handler.clone(), simple.clone(), extended.clone(), copy.clone(), cancel.clone())
                            .await
                    }
                    Err(refused) => Err(refused),
                };
                if let Err(mut e) = handled {
                    // The socket failed (a client that took no byte for WRITE_TIMEOUT): there is
                    // no one to tell.
                    if let PgWireError::IoError(e) = e {
                        return Err(e);
                    }
                    super::answering(sql, || errors.on_error(&socket, &mut e));
                    let error = ErrorInfo::from(e);
                    let fatal = error.is_fatal();
                    process_error(&mut socket, PgWireError::UserError(Box::new(error)), extended_protocol).await?;
                    // A failed login, say: pgwire's own loop read on after it, so a client that
                    // was refused could still send until the startup timeout.
                    if fatal {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Closes our side and takes what the client still sends for up to [`LINGER`] before closing: a
/// socket closed with unread bytes resets the connection, and the reset can make the client drop
/// the error it was sent.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::AsyncReadExt;
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut scratch = vec![0u8; 64 << 10];
    let _ = tokio::time::timeout(LINGER, async {
        while tcp.read(&mut scratch).await.is_ok_and(|n| n > 0) {}
    })
    .await;
}

/// The client's byte stream, with each message's declared length checked against
/// [`MAX_MESSAGE_BYTES`] as its header arrives.
struct BoundedMessages {
    io: WriteDeadline<TcpStream>,
    frames: Frames,
    /// The length of the message that was refused, once one was.
    refused: Option<usize>,
}

impl BoundedMessages {
    fn new(io: WriteDeadline<TcpStream>) -> Self {
        BoundedMessages { io, frames: Frames::default(), refused: None }
    }
}

/// Where the client's stream is: message boundaries follow from the lengths in the headers.
/// Before the startup message a header is a length and a code (SSLRequest, GSSENCRequest,
/// CancelRequest or the protocol version); after it, a type byte and a length. Lengths count
/// themselves.
#[derive(Default)]
struct Frames {
    started: bool,
    header: [u8; 8],
    header_read: usize,
    body_left: usize,
}

impl Frames {
    /// Follows `bytes`, the next ones from the client; the length of the first message over the
    /// bound, if one begins here.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), usize> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skipped = self.body_left.min(bytes.len());
                self.body_left -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let header_len = if self.started { 5 } else { 8 };
            let taken = (header_len - self.header_read).min(bytes.len());
            self.header[self.header_read..self.header_read + taken].copy_from_slice(&bytes[..taken]);
            self.header_read += taken;
            bytes = &bytes[taken..];
            if self.header_read < header_len {
                continue;
            }
            self.header_read = 0;
            let at = usize::from(self.started);
            let length = u32::from_be_bytes(self.header[at..at + 4].try_into().expect("4 bytes")) as usize;
            if length > MAX_MESSAGE_BYTES {
                return Err(length);
            }
            self.body_left = length.saturating_sub(header_len - at);
            if !self.started {
                let code = u32::from_be_bytes(self.header[4..8].try_into().expect("4 bytes"));
                self.started = !matches!(code, SSL_REQUEST | GSSENC_REQUEST);
            }
        }
        Ok(())
    }
}

impl AsyncRead for BoundedMessages {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(length) = this.refused {
            return Poll::Ready(Err(too_large(length)));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read
            && let Err(length) = this.frames.follow(&buf.filled()[before..])
        {
            this.refused = Some(length);
            closed("message_too_large");
            return Poll::Ready(Err(too_large(length)));
        }
        read
    }
}

/// Counts a connection this module closed, by why.
pub fn closed(reason: &'static str) {
    metrics::counter!("bearwatch_postgres_connections_closed_total", "reason" => reason).increment(1);
}

fn too_large(length: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("a message of {length} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes"))
}

impl AsyncWrite for BoundedMessages {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untyped(length: u32, code: u32) -> Vec<u8> {
        let mut bytes = length.to_be_bytes().to_vec();
        bytes.extend(code.to_be_bytes());
        bytes.resize(length as usize, 0);
        bytes
    }

    fn typed(kind: u8, length: u32) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend(length.to_be_bytes());
        bytes.resize(1 + length as usize, b'x');
        bytes
    }

    #[test]
    fn messages_are_followed_across_any_split_and_the_first_over_the_bound_is_named() {
        let mut stream = untyped(8, SSL_REQUEST);
        stream.extend(untyped(8, GSSENC_REQUEST));
        stream.extend(untyped(40, 196_608));
        stream.extend(typed(b'p', 7));
        stream.extend(typed(b'Q', MAX_MESSAGE_BYTES as u32));
        let good = stream.len();
        stream.extend(typed(b'Q', MAX_MESSAGE_BYTES as u32 + 1));
        for piece in [1, 3, 7, 4096, stream.len()] {
            let mut frames = Frames::default();
            let mut refused = None;
            for (i, chunk) in stream.chunks(piece).enumerate() {
                if let Err(length) = frames.follow(chunk) {
                    refused = Some((length, i * piece + chunk.len()));
                    break;
                }
            }
            let (length, at) = refused.expect("the last message is over the bound");
            assert_eq!(length, MAX_MESSAGE_BYTES + 1);
            assert!(at > good && at <= good + 5 + piece, "refused in its header, at byte {at} (piece {piece})");
        }
    }

    #[test]
    fn a_negative_length_is_over_the_bound() {
        let mut frames = Frames::default();
        assert!(frames.follow(&untyped(9, 196_608)).is_ok());
        let mut header = vec![b'Q'];
        header.extend((-1i32).to_be_bytes());
        assert_eq!(frames.follow(&header), Err(u32::MAX as usize));
    }
}

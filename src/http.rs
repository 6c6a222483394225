//! The operational HTTP endpoint: `/metrics`, `/healthz` and `/readyz`.
//!
//! A deliberately tiny HTTP/1.1 server on plain tokio, with no HTTP crate:
//! each connection carries one request, whose request line is read (headers
//! are read up to the blank line and ignored), answered, and the connection
//! closed. It serves Prometheus and Kubernetes probes, nothing else.
//!
//! * `GET /metrics`: [`Metrics::render`], content type
//!   `text/plain; version=0.0.4`.
//! * `GET /healthz`: 200 `ok` while the work loops are alive
//!   ([`Health::set_alive`]), 503 otherwise.
//! * `GET /readyz`: 200 `ready` once [`Health::set_ready`]`(true, _)`, 503
//!   with the reason otherwise (it starts as `starting`).
//! * Known path with another method: 405; any other path: 404.
//!
//! Every connection runs in its own task with a read deadline
//! ([`READ_TIMEOUT`]) and a request size cap ([`MAX_REQUEST_BYTES`]), and at
//! most [`MAX_CONNECTIONS`] are served at once, so slow or hostile clients
//! cannot hold the server. Errors on one connection are logged and never stop
//! the server.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::metrics::Metrics;

/// How long a client has to send its complete request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers) accepted; larger gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; further connections are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// After answering, how long (and how much) unread request bytes, such as a
/// POST body, are drained so closing does not reset the connection and
/// destroy the response before the client has read it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_MAX_BYTES: usize = 64 * 1024;

/// Liveness and readiness, shared between the work loops that set them and
/// the HTTP server that reports them. Cheap to clone; clones share state.
///
/// A new `Health` is alive and not ready, with reason `starting`.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    alive: AtomicBool,
    /// `Ok(())` when ready, `Err(reason)` when not.
    ready: Mutex<Result<(), String>>,
}

impl Health {
    /// Alive, not ready (`starting`).
    pub fn new() -> Health {
        Health {
            inner: Arc::new(HealthInner {
                alive: AtomicBool::new(true),
                ready: Mutex::new(Err("starting".to_owned())),
            }),
        }
    }

    /// Marks the process ready (`reason` is ignored) or not ready because of
    /// `reason` (shown by `/readyz`; `not ready` when empty).
    pub fn set_ready(&self, ready: bool, reason: &str) {
        let state = if ready {
            Ok(())
        } else if reason.is_empty() {
            Err("not ready".to_owned())
        } else {
            Err(reason.to_owned())
        };
        *self.lock_ready() = state;
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.lock_ready().is_ok()
    }

    /// `Ok(())` when ready, otherwise `Err(reason)`.
    pub fn readiness(&self) -> Result<(), String> {
        self.lock_ready().clone()
    }

    /// Marks the work loops alive or dead; `/healthz` answers 503 once dead,
    /// so the orchestrator restarts the process.
    pub fn set_alive(&self, alive: bool) {
        self.inner.alive.store(alive, Ordering::SeqCst);
    }

    /// Whether `/healthz` answers 200.
    pub fn is_alive(&self) -> bool {
        self.inner.alive.load(Ordering::SeqCst)
    }

    fn lock_ready(&self) -> std::sync::MutexGuard<'_, Result<(), String>> {
        // The guarded value is always whole, so a poisoned lock is still
        // usable.
        self.inner.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

/// Binds the listener `serve` takes, e.g. `bind("127.0.0.1:9464")`; port 0
/// picks a free port (read it back with `local_addr`).
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown` completes, then closes the listener, aborts connections still
/// open and returns.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = joined {
                    tracing::error!(error = %err, "http connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        tracing::warn!(%peer, limit = MAX_CONNECTIONS, "too many http connections, closing new one");
                        drop(stream);
                        continue;
                    }
                    let metrics = metrics.clone();
                    let health = health.clone();
                    connections.spawn(async move {
                        handle_connection(stream, peer, &metrics, &health).await;
                    });
                }
                Err(err) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, and keep serving.
                    tracing::warn!(error = %err, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    connections.shutdown().await;
    tracing::debug!("http server stopped");
}

/// One request, one response, close; logs instead of failing.
async fn handle_connection(mut stream: TcpStream, peer: SocketAddr, metrics: &Metrics, health: &Health) {
    if let Err(err) = exchange(&mut stream, metrics, health).await {
        match err.kind() {
            // Idle, slow or vanished clients: routine, not worth a warning.
            io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => {
                tracing::debug!(%peer, error = %err, "http connection closed early");
            }
            _ => tracing::warn!(%peer, error = %err, "http connection failed"),
        }
    }
}

async fn exchange(stream: &mut TcpStream, metrics: &Metrics, health: &Health) -> io::Result<()> {
    let head = match timeout(READ_TIMEOUT, read_head(stream)).await {
        Ok(head) => head?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request before the read timeout",
            ));
        }
    };
    let response = match head {
        Head::Closed => return Ok(()),
        Head::TooLarge => Response::text(431, "request too large"),
        Head::Complete(bytes) => respond(&bytes, metrics, health),
    };
    let bytes = response.into_bytes();
    match timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(written) => written?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response not taken before the write timeout",
            ));
        }
    }
    // Best effort; the response is already sent.
    let _ = timeout(DRAIN_TIMEOUT, drain(stream)).await;
    Ok(())
}

enum Head {
    /// The client closed without sending anything.
    Closed,
    /// No end of headers within `MAX_REQUEST_BYTES`.
    TooLarge,
    /// The request head (or all the client sent before closing its side).
    Complete(Vec<u8>),
}

/// Reads up to the blank line ending the headers.
async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // The client half-closed: answer what it sent, if anything.
            return Ok(if buf.is_empty() {
                Head::Closed
            } else {
                Head::Complete(buf)
            });
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = end_of_head(&buf, searched_from) {
            if end > MAX_REQUEST_BYTES {
                return Ok(Head::TooLarge);
            }
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// Index just past the first `\r\n\r\n` or `\n\n` at or after `from`.
fn end_of_head(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Reads and discards until the client closes or the budget is spent.
async fn drain(stream: &mut TcpStream) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    let mut total = 0;
    while total < DRAIN_MAX_BYTES {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(())
}

/// Routes one request head to its response.
fn respond(head: &[u8], metrics: &Metrics, health: &Health) -> Response {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Response::text(400, "bad request");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Response::text(400, "bad request");
    };
    if method.is_empty() || !target.starts_with('/') {
        return Response::text(400, "bad request");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text(404, "not found");
    }
    if method != "GET" {
        return Response::text(405, "method not allowed").header("Allow", "GET");
    }
    match path {
        "/metrics" => Response::new(200, prometheus::TEXT_FORMAT, metrics.render()),
        "/healthz" if health.is_alive() => Response::text(200, "ok"),
        "/healthz" => Response::text(503, "not alive"),
        _ => match health.readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(reason) => Response::text(503, &reason),
        },
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    extra_headers: Vec<(&'static str, &'static str)>,
    body: String,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            extra_headers: Vec::new(),
            body,
        }
    }

    /// A short plain-text body, newline-terminated for terminals.
    fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Response {
        self.extra_headers.push((name, value));
        self
    }

    fn into_bytes(self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Unknown",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.extra_headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str, health: &Health) -> u16 {
        respond(head.as_bytes(), &Metrics::new(), health).status
    }

    #[test]
    fn routes_by_path_then_method() {
        let health = Health::new();
        assert_eq!(status("GET /metrics HTTP/1.1\r\n\r\n", &health), 200);
        assert_eq!(status("GET /metrics?x=1 HTTP/1.1\r\n\r\n", &health), 200);
        assert_eq!(status("GET /healthz HTTP/1.0\n\n", &health), 200);
        assert_eq!(status("GET /readyz HTTP/1.1\r\n\r\n", &health), 503);
        assert_eq!(status("GET /nope HTTP/1.1\r\n\r\n", &health), 404);
        assert_eq!(status("POST /metrics HTTP/1.1\r\n\r\n", &health), 405);
        assert_eq!(status("HEAD /readyz HTTP/1.1\r\n\r\n", &health), 405);
        assert_eq!(status("garbage\r\n\r\n", &health), 400);
        assert_eq!(status("GET metrics HTTP/1.1\r\n\r\n", &health), 400);
        assert_eq!(status("\r\n\r\n", &health), 400);
    }

    #[test]
    fn health_transitions() {
        let health = Health::new();
        assert_eq!(health.readiness(), Err("starting".to_owned()));
        health.clone().set_ready(true, "ignored");
        assert!(health.is_ready());
        health.set_ready(false, "");
        assert_eq!(health.readiness(), Err("not ready".to_owned()));
        health.set_ready(false, "matrix invalid");
        assert_eq!(health.readiness(), Err("matrix invalid".to_owned()));
        assert!(health.is_alive());
        health.set_alive(false);
        assert_eq!(status("GET /healthz HTTP/1.1\r\n\r\n", &health), 503);
    }

    #[test]
    fn finds_end_of_head() {
        assert_eq!(end_of_head(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        assert_eq!(end_of_head(b"GET /\n\n", 0), Some(7));
        assert_eq!(end_of_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
    }
}

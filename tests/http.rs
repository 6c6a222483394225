//! The operational HTTP endpoint, through a real TCP client.

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::http::{Health, bind, serve};
use switchboard::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Generous bound on any single exchange, so a hang fails instead of
/// blocking the suite.
const DEADLINE: Duration = Duration::from_secs(3);

struct Server {
    addr: SocketAddr,
    health: Health,
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start() -> Server {
    let listener = bind("127.0.0.1:0").await.expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let metrics = Metrics::new();
    let health = Health::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, metrics.clone(), health.clone(), async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        health,
        metrics,
        stop: Some(stop),
        task,
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` verbatim and reads the whole reply.
async fn send(addr: SocketAddr, request: &str) -> Reply {
    timeout(DEADLINE, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read reply");
        let text = String::from_utf8(raw).expect("utf-8 reply");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        Reply {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    })
    .await
    .expect("reply within deadline")
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"),
    )
    .await
}

#[tokio::test]
async fn metrics_are_served_in_text_format() {
    let server = start().await;
    server.metrics.events_allowed_total.inc_by(3);
    let reply = get(server.addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.head.contains("Content-Type: text/plain; version=0.0.4"),
        "{}",
        reply.head
    );
    assert!(
        reply.body.contains("switchboard_events_allowed_total 3"),
        "{}",
        reply.body
    );
    let length = format!("Content-Length: {}", reply.body.len());
    assert!(reply.head.contains(&length), "{}", reply.head);
}

#[tokio::test]
async fn readyz_follows_health() {
    let server = start().await;
    let reply = get(server.addr, "/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body.trim(), "starting");

    server.health.set_ready(true, "");
    let reply = get(server.addr, "/readyz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.trim(), "ready");

    server.health.set_ready(false, "matrix reload failed");
    let reply = get(server.addr, "/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body.trim(), "matrix reload failed");
}

#[tokio::test]
async fn healthz_follows_liveness() {
    let server = start().await;
    let reply = get(server.addr, "/healthz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.trim(), "ok");

    server.health.set_alive(false);
    assert_eq!(get(server.addr, "/healthz").await.status, 503);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let server = start().await;
    assert_eq!(get(server.addr, "/nope").await.status, 404);
    assert_eq!(get(server.addr, "/").await.status, 404);
}

#[tokio::test]
async fn non_get_is_405() {
    let server = start().await;
    let reply = send(
        server.addr,
        "POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(reply.status, 405);
    assert!(reply.head.contains("Allow: GET"), "{}", reply.head);
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused() {
    let server = start().await;
    assert_eq!(send(server.addr, "nonsense\r\n\r\n").await.status, 400);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    assert_eq!(send(server.addr, &huge).await.status, 431);
    // The server is still fine afterwards.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn silent_clients_do_not_block_others() {
    let server = start().await;
    // One client that connects and sends nothing, one that stalls mid-line.
    let _silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut stalled = TcpStream::connect(server.addr).await.expect("connect");
    stalled.write_all(b"GET /met").await.expect("write");

    for _ in 0..3 {
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        assert_eq!(get(server.addr, "/metrics").await.status, 200);
    }
}

#[tokio::test]
async fn server_stops_when_shutdown_completes() {
    let mut server = start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    // An idle connection must not keep the server alive.
    let _idle = TcpStream::connect(server.addr).await.expect("connect");

    server.stop.take().expect("stop sender").send(()).expect("send");
    timeout(DEADLINE, &mut server.task)
        .await
        .expect("serve returns after shutdown")
        .expect("serve task did not panic");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener still accepting after shutdown"
    );
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_read_timeout() {
    let server = start().await;
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    let mut rest = Vec::new();
    let read = timeout(
        switchboard::http::READ_TIMEOUT + Duration::from_secs(3),
        idle.read_to_end(&mut rest),
    )
    .await
    .expect("server closes an idle connection");
    // Closed without an answer (or reset): either way, not held open.
    if let Ok(n) = read {
        assert_eq!(n, 0, "unexpected reply: {:?}", String::from_utf8_lossy(&rest));
    }
}

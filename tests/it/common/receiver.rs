//! A real HTTP/1.1 receiver on 127.0.0.1 (a minimal responder on a tokio
//! listener, scripted per test), for the `http` handler's tests and the
//! failure notifications' webhooks: it answers with its script's replies in
//! order (the last one repeats), records every request and counts the
//! connections and the requests it holds unanswered at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A scripted reply: status, body, and a delay before it is sent.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body (sent as `application/json`, whatever it is).
    pub body: &'static str,
    /// Wait before answering.
    pub delay: Duration,
    /// A `location` header (redirects).
    pub location: Option<String>,
    /// Never answer: hold the connection until the client closes it.
    pub hang: bool,
}

/// `status` with `body`, at once.
pub fn reply(status: u16, body: &'static str) -> Reply {
    Reply {
        status,
        body,
        delay: Duration::ZERO,
        location: None,
        hang: false,
    }
}

/// Accepts the request and never answers (until the client gives up and
/// closes the connection).
pub fn hang() -> Reply {
    Reply {
        hang: true,
        ..reply(200, "")
    }
}

/// `statuses` in order (the last one repeats), empty bodies, at once.
pub fn statuses(statuses: &[u16]) -> Vec<Reply> {
    statuses.iter().map(|s| reply(*s, "")).collect()
}

/// A request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8).
    pub body: String,
}

impl Seen {
    /// The first value of header `name` (lower case), or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("the body is JSON")
    }
}

/// The receiver (runs until the test's runtime ends).
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// Counts a request from when it was read until it is answered or its
/// connection closes.
struct Open {
    open: Arc<AtomicUsize>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Receiver {
    /// On 127.0.0.1, a free port.
    pub async fn start(script: Vec<Reply>) -> Receiver {
        Self::start_on("127.0.0.1:0", script).await
    }

    /// On `bind` (e.g. `127.0.0.2:0`).
    pub async fn start_on(bind: &str, script: Vec<Reply>) -> Receiver {
        assert!(!script.is_empty(), "a script of at least one reply");
        let listener = TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let r = Receiver {
            addr,
            seen: Arc::new(Mutex::new(Vec::new())),
            connections: Arc::new(AtomicUsize::new(0)),
            open: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        };
        let script = Arc::new(Mutex::new(script));
        let (seen, connections, open, peak) = (
            Arc::clone(&r.seen),
            Arc::clone(&r.connections),
            Arc::clone(&r.open),
            Arc::clone(&r.peak),
        );
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (seen, script, open, peak) = (
                    Arc::clone(&seen),
                    Arc::clone(&script),
                    Arc::clone(&open),
                    Arc::clone(&peak),
                );
                tokio::spawn(async move {
                    let (rd, mut wr) = sock.into_split();
                    let mut rd = BufReader::new(rd);
                    let mut line = String::new();
                    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or_default().to_string();
                    let target = parts.next().unwrap_or_default().to_string();
                    let mut headers = Vec::new();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if rd.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                            if k == "content-length" {
                                len = v.parse().unwrap_or(0);
                            }
                            headers.push((k, v));
                        }
                    }
                    let mut body = vec![0u8; len];
                    let _ = rd.read_exact(&mut body).await;
                    let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                    let _open = Open { open };
                    peak.fetch_max(now_open, Ordering::SeqCst);
                    seen.lock().unwrap().push(Seen {
                        method,
                        target,
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    });
                    let r = {
                        let mut sc = script.lock().unwrap();
                        if sc.len() > 1 {
                            sc.remove(0)
                        } else {
                            sc[0].clone()
                        }
                    };
                    if r.hang {
                        // Until the client closes its side.
                        let mut sink = [0u8; 256];
                        while rd.read(&mut sink).await.unwrap_or(0) > 0 {}
                        return;
                    }
                    tokio::time::sleep(r.delay).await;
                    let location = r
                        .location
                        .map(|l| format!("location: {l}\r\n"))
                        .unwrap_or_default();
                    let head = format!(
                        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{location}connection: close\r\n\r\n",
                        r.status,
                        r.body.len()
                    );
                    let _ = wr.write_all(head.as_bytes()).await;
                    let _ = wr.write_all(r.body.as_bytes()).await;
                    let _ = wr.shutdown().await;
                });
            }
        });
        r
    }

    /// `http://127.0.0.1:<port>/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    /// The requests so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far (a request or not).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests read and not answered yet (nor closed by the client).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The most requests it held unanswered at once so far.
    pub fn peak_open(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Waits (at most 30 s) until at least `n` requests came; returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let seen = self.seen();
                if seen.len() >= n {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} requests within 30 s; got {}", self.seen().len()))
    }
}

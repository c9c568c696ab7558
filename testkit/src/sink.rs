//! A webhook sink for tests and benchmarks: a small HTTP/1.1 server on a free loopback port (or on a
//! node's bridge gateway, [`Sink::start_on`], for workers running in pods) that records
//! every request (its `webhook-id`, headers and arrival time) and answers as told: 200, a status (with
//! an optional `Retry-After`), after a delay, or not at all (a stalled endpoint that holds the
//! connection open).
//!
//! Written on plain tokio sockets so that it can misbehave in ways a framework would not let it, and so
//! that it counts connections as the worker opens them.
//!
//! [`Sink::start_tls`] serves HTTPS with a certificate from a test CA ([`crate::pki::TestCa`]), and with
//! a client CA it requires a client certificate (mTLS): a TLS front terminates each connection with
//! rustls and relays the plain bytes to the same recorder, counting the handshakes it refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the sink answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `status` (200 by default), after `delay`, with a `Retry-After: retry_after` when set.
    Answer {
        status: u16,
        delay: Duration,
        retry_after: Option<String>,
    },
    /// Read the request, then answer nothing and keep the connection open until the mode changes
    /// (then answer per the new mode).
    Stall,
    /// Of every `failures + 1` requests (counted across connections), the first `failures` answer
    /// `status` and the last 200, each after `delay`: an endpoint whose failures outnumber its
    /// successes without ever failing many times in a row (a circuit breaker never opens on it).
    Flaky {
        status: u16,
        failures: u32,
        delay: Duration,
    },
}

impl Mode {
    pub fn ok() -> Self {
        Self::status(200)
    }

    pub fn status(status: u16) -> Self {
        Mode::Answer {
            status,
            delay: Duration::ZERO,
            retry_after: None,
        }
    }

    pub fn delayed(status: u16, delay: Duration) -> Self {
        Mode::Answer {
            status,
            delay,
            retry_after: None,
        }
    }

    pub fn flaky(status: u16, failures: u32, delay: Duration) -> Self {
        Mode::Flaky {
            status,
            failures,
            delay,
        }
    }
}

/// One request as the sink saw it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub id: Option<String>,
    pub at: Instant,
    pub status: u16,
    pub method: String,
    /// The request target's path (`/hooks/acme`), without the query.
    pub path: String,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct Stats {
    hits: Mutex<Vec<Hit>>,
    open: AtomicUsize,
    peak_open: AtomicUsize,
    connections: AtomicU64,
    requests: AtomicU64,
    /// Requests with this `webhook-id` are never answered (a *poison* message: one the worker cannot
    /// get past); each arrival is counted.
    poison: Mutex<Option<String>>,
    poison_arrivals: AtomicU64,
    /// When set, a request whose `Authorization` is not one of these is answered 401.
    accepted_authorization: Mutex<Option<HashSet<String>>>,
    /// Requests answered in [`Mode::Flaky`], to pick failure or success.
    flaky_seq: AtomicU64,
}

/// What an HTTPS sink presents and asks for (PEM).
#[derive(Clone, Debug)]
pub struct SinkTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// Require a client certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<String>,
}

struct TlsFront {
    addr: SocketAddr,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// A running sink; stops when dropped.
pub struct Sink {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    stats: Arc<Stats>,
    record_bodies: bool,
    task: tokio::task::JoinHandle<()>,
    tls: Option<TlsFront>,
}

impl Sink {
    /// Starts a sink answering 200, recording each request (bodies too).
    pub async fn start() -> Result<Self> {
        Self::start_with(true).await
    }

    /// A sink that records ids and headers but not bodies (for benchmarks).
    pub async fn start_with(record_bodies: bool) -> Result<Self> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), record_bodies).await
    }

    /// A sink listening on `ip` (a free port): with hookfleet-e2e's `Cluster::host_addr`, pods reach it, and
    /// [`Sink::url`] names that address.
    pub async fn start_on(ip: IpAddr, record_bodies: bool) -> Result<Self> {
        let listener = TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("binding the sink to {ip}"))?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::ok());
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    // EMFILE on our side: back off a little instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let st = st.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let open = st.open.fetch_add(1, Ordering::SeqCst) + 1;
                    st.peak_open.fetch_max(open, Ordering::SeqCst);
                    st.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = serve(sock, st.clone(), rx, record_bodies).await;
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self {
            addr,
            mode,
            stats,
            record_bodies,
            task,
            tls: None,
        })
    }

    /// An HTTPS sink on `ip` (a free port): TLS with `tls`, the requests recorded as by any sink.
    pub async fn start_tls(ip: IpAddr, record_bodies: bool, tls: SinkTls) -> Result<Self> {
        let mut sink = Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), record_bodies).await?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&tls)?));
        let listener = TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("binding the TLS sink to {ip}"))?;
        let addr = listener.local_addr()?;
        let inner = sink.addr;
        let refused = Arc::new(AtomicU64::new(0));
        let refused_count = refused.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, refused) = (acceptor.clone(), refused_count.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(sock).await {
                        Ok(t) => t,
                        Err(_) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let Ok(mut plain) = TcpStream::connect(inner).await else {
                        return;
                    };
                    let _ = plain.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        sink.tls = Some(TlsFront { addr, refused, task });
        Ok(sink)
    }

    /// The address the worker connects to (the TLS front's for an HTTPS sink).
    pub fn addr(&self) -> SocketAddr {
        self.tls.as_ref().map_or(self.addr, |t| t.addr)
    }

    /// `http://<address>:<port>/hook` (127.0.0.1 unless started with [`Sink::start_on`]), or
    /// `https://…` for a sink started with [`Sink::start_tls`].
    pub fn url(&self) -> String {
        match &self.tls {
            Some(t) => format!("https://{}/hook", t.addr),
            None => format!("http://{}/hook", self.addr),
        }
    }

    /// TLS handshakes the HTTPS sink refused (no client certificate, or one it does not trust; or a
    /// client that gave up on the sink's certificate).
    pub fn tls_refused(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.refused.load(Ordering::SeqCst))
    }

    /// Answer 401 to requests whose `Authorization` is not one of `values` (`None`: accept any).
    pub fn set_accepted_authorization(&self, values: Option<&[&str]>) {
        *self.stats.accepted_authorization.lock().unwrap() =
            values.map(|v| v.iter().map(|s| s.to_string()).collect());
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn records_bodies(&self) -> bool {
        self.record_bodies
    }

    /// Every request so far, in arrival order.
    /// Never answer requests whose `webhook-id` is `id` (hold them until the peer goes away).
    pub fn set_poison(&self, id: Option<&str>) {
        *self.stats.poison.lock().unwrap() = id.map(str::to_owned);
    }

    /// Requests that carried the poison id so far.
    pub fn poison_arrivals(&self) -> u64 {
        self.stats.poison_arrivals.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.stats.hits.lock().unwrap().clone()
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Connections open now, and the most open at once.
    pub fn open_connections(&self) -> (usize, usize) {
        (
            self.stats.open.load(Ordering::SeqCst),
            self.stats.peak_open.load(Ordering::SeqCst),
        )
    }

    pub fn connections_accepted(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// Ids answered with a 2xx, each with how many times.
    pub fn delivered(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for h in self.stats.hits.lock().unwrap().iter() {
            if (200..300).contains(&h.status)
                && let Some(id) = &h.id
            {
                *m.entry(id.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Arrival times of each id's requests, whatever the answer.
    pub fn attempts(&self) -> HashMap<String, Vec<Instant>> {
        let mut m: HashMap<String, Vec<Instant>> = HashMap::new();
        for h in self.stats.hits.lock().unwrap().iter() {
            if let Some(id) = &h.id {
                m.entry(id.clone()).or_default().push(h.at);
            }
        }
        m
    }

    /// Waits until every id in `ids` was answered 2xx at least once; fails after `timeout` naming how
    /// many are missing.
    pub async fn wait_delivered(&self, ids: &HashSet<String>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.delivered();
            let missing = ids.iter().filter(|i| !got.contains_key(*i)).count();
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{missing} of {} ids not delivered after {timeout:?} ({} requests seen)",
                    ids.len(),
                    self.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self.tls {
            t.task.abort();
        }
    }
}

fn server_config(tls: &SinkTls) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the sink's certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).context("the sink's key PEM")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.context("the client CA PEM")?)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn serve(sock: TcpStream, st: Arc<Stats>, mut mode: watch::Receiver<Mode>, bodies: bool) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Head.
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p;
            }
            if buf.len() > 64 * 1024 {
                anyhow::bail!("request head too large");
            }
            let mut chunk = [0u8; 8192];
            let n = read_some(&sock, &mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("");
        let path = target.split('?').next().unwrap_or("").to_owned();
        let mut headers = BTreeMap::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        while buf.len() < body_start + len {
            let mut chunk = [0u8; 8192];
            let n = read_some(&sock, &mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[body_start..body_start + len].to_vec();
        buf.drain(..body_start + len);
        let close = headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));

        let poisoned = {
            let p = st.poison.lock().unwrap();
            p.is_some() && p.as_deref() == headers.get("webhook-id").map(String::as_str)
        };
        if poisoned {
            st.poison_arrivals.fetch_add(1, Ordering::SeqCst);
            // Hold it until the worker goes away.
            let mut probe = [0u8; 1];
            loop {
                match sock.peek(&mut probe).await {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }

        let unauthorized = match st.accepted_authorization.lock().unwrap().as_ref() {
            Some(accepted) => !headers.get("authorization").is_some_and(|a| accepted.contains(a)),
            None => false,
        };

        // Decide, stalling while told to.
        let (status, delay, retry_after) = loop {
            if unauthorized {
                break (401, Duration::ZERO, None);
            }
            let current = mode.borrow_and_update().clone();
            match current {
                Mode::Answer {
                    status,
                    delay,
                    retry_after,
                } => break (status, delay, retry_after),
                Mode::Flaky {
                    status,
                    failures,
                    delay,
                } => {
                    let n = st.flaky_seq.fetch_add(1, Ordering::SeqCst);
                    let status = if n % (u64::from(failures) + 1) < u64::from(failures) {
                        status
                    } else {
                        200
                    };
                    break (status, delay, None);
                }
                Mode::Stall => {
                    // Hold the connection open; a closed peer ends the wait too.
                    let mut probe = [0u8; 1];
                    tokio::select! {
                        changed = mode.changed() => { if changed.is_err() { return Ok(()); } }
                        r = sock.peek(&mut probe) => { if matches!(r, Ok(0) | Err(_)) { return Ok(()); } tokio::time::sleep(Duration::from_millis(50)).await; }
                    }
                }
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        st.requests.fetch_add(1, Ordering::Relaxed);
        st.hits.lock().unwrap().push(Hit {
            id: headers.get("webhook-id").cloned(),
            at: Instant::now(),
            status,
            method,
            path,
            body: if bodies { body } else { Vec::new() },
            headers,
        });
        let mut resp = format!("HTTP/1.1 {status} {}\r\ncontent-length: 0\r\n", reason(status));
        if let Some(ra) = retry_after {
            resp.push_str(&format!("retry-after: {ra}\r\n"));
        }
        if close {
            resp.push_str("connection: close\r\n");
        }
        resp.push_str("\r\n");
        write_all(&sock, resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

// Plain readiness-based I/O: the harness builds tokio without `io-util`.
async fn read_some(sock: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        sock.readable().await?;
        match sock.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(sock: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        sock.writable().await?;
        match sock.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

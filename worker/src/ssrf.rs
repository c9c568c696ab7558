//! SSRF protection: destinations that resolve to private, loopback, link-local (cloud metadata) or
//! other non-public addresses are refused unless `--allow-private-networks`.
//!
//! The check is a DNS resolver ([`GuardedResolver`]) that wraps the real one: reqwest asks it for the
//! addresses of every new connection and connects to exactly the addresses it returns, so the
//! addresses checked are the addresses connected to. A name whose answer changes between a check and
//! a connect (DNS rebinding: public for the check, 127.0.0.1 for the connect) cannot slip through,
//! because there is no second resolution: each connection's one answer is filtered before use.
//! IP literals in the URL never reach a resolver: the configuration refuses them at start.
//! Which addresses are forbidden is `hookfleet_crds::address` (the operator's validation refuses a
//! literal in the spec with it too).

use std::net::SocketAddr;
use std::sync::Arc;

use hookfleet_crds::address::forbidden;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The system's resolver (getaddrinfo on a blocking thread, through tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// A resolver that drops forbidden addresses from `inner`'s answer and fails when none is left.
#[derive(Clone)]
pub struct GuardedResolver {
    pub allow_private: bool,
    inner: Arc<dyn Resolve>,
}

impl GuardedResolver {
    /// Guards the system resolver.
    pub fn new(allow_private: bool) -> Self {
        Self::with_inner(allow_private, Arc::new(SystemResolver))
    }

    /// Guards `inner` (tests pass one whose answers they control).
    pub fn with_inner(allow_private: bool, inner: Arc<dyn Resolve>) -> Self {
        Self { allow_private, inner }
    }
}

impl std::fmt::Debug for GuardedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedResolver")
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_private;
        let host = name.as_str().to_owned();
        let answer = self.inner.resolve(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = answer.await?.collect();
            let total = addrs.len();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| {
                    if allow {
                        return true;
                    }
                    match forbidden(a.ip()) {
                        Some(kind) => {
                            refused.get_or_insert((a.ip(), kind));
                            false
                        }
                        None => true,
                    }
                })
                .collect();
            if allowed.is_empty() {
                let msg = match refused {
                    None if total == 0 => format!("{host} has no addresses"),
                    Some((ip, kind)) => format!(
                        "{host} resolves only to addresses the SSRF guard refuses (e.g. {ip}, {kind}); \
                         set --allow-private-networks to allow them"
                    ),
                    None => format!("{host} has no usable address"),
                };
                return Err(msg.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::net::IpAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers each resolution with the next of its answers (the last one for ever), counting calls.
    struct Scripted {
        answers: Mutex<VecDeque<Vec<IpAddr>>>,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(answers: &[&[&str]]) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(
                    answers
                        .iter()
                        .map(|a| a.iter().map(|s| s.parse().unwrap()).collect())
                        .collect(),
                ),
                calls: AtomicUsize::new(0),
            })
        }
    }

    impl Resolve for Scripted {
        fn resolve(&self, _name: Name) -> Resolving {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut a = self.answers.lock().unwrap();
            let ips = if a.len() > 1 {
                a.pop_front().unwrap()
            } else {
                a[0].clone()
            };
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Box::pin(async move { Ok(Box::new(addrs.into_iter()) as Addrs) })
        }
    }

    async fn resolve(r: &GuardedResolver, host: &str) -> Result<Vec<IpAddr>, String> {
        match r.resolve(host.parse().unwrap()).await {
            Ok(a) => Ok(a.map(|a| a.ip()).collect()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_to_forbidden_addresses() {
        for ip in [
            "127.0.0.1",
            "10.0.0.7",
            "169.254.169.254",
            "::1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
            "198.18.0.1",
            "240.0.0.1",
            "0.0.0.0",
            "fd12::1",
        ] {
            let r = GuardedResolver::with_inner(false, Scripted::new(&[&[ip]]));
            let err = resolve(&r, "hooks.example.com").await.expect_err(ip);
            assert!(
                err.contains("SSRF guard") && err.contains("hooks.example.com"),
                "{ip}: {err}"
            );
            // Allowed with the setting.
            let r = GuardedResolver::with_inner(true, Scripted::new(&[&[ip]]));
            assert_eq!(
                resolve(&r, "hooks.example.com").await.unwrap(),
                [ip.parse::<IpAddr>().unwrap()]
            );
        }
        // A mixed answer keeps only the public addresses: those are what reqwest connects to.
        let r = GuardedResolver::with_inner(false, Scripted::new(&[&["127.0.0.1", "93.184.216.34", "::1"]]));
        assert_eq!(
            resolve(&r, "mixed.example.com").await.unwrap(),
            ["93.184.216.34".parse::<IpAddr>().unwrap()]
        );
    }

    /// DNS rebinding: the name answers a public address first and 127.0.0.1 second. A guard that
    /// checked one resolution and let the connector resolve again would connect to the loopback
    /// listener; here every connection's addresses come from one guarded resolution, so the second
    /// attempt is refused and the listener never sees a connection. With `allow_private` the same
    /// client does reach it (the test can fail).
    #[tokio::test]
    async fn an_answer_that_changes_between_check_and_connect_cannot_bypass_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        let client = |allow: bool, inner: Arc<Scripted>| {
            reqwest::Client::builder()
                .dns_resolver(GuardedResolver::with_inner(allow, inner))
                .no_proxy()
                .connect_timeout(std::time::Duration::from_millis(300))
                .build()
                .unwrap()
        };
        let url = format!("http://rebind.example.com:{port}/hook");
        // 192.0.2.1 (TEST-NET-1) passes the guard and is unreachable here: the attempt fails to connect.
        let inner = Scripted::new(&[&["192.0.2.1"], &["127.0.0.1"]]);
        let c = client(false, inner.clone());
        let first = c
            .post(&url)
            .send()
            .await
            .expect_err("nothing listens on 192.0.2.1");
        assert!(first.is_connect() || first.is_timeout(), "{first:?}");
        let second = c.post(&url).send().await.expect_err("refused by the guard");
        let chain = format!("{:?}", second);
        assert!(chain.contains("SSRF guard"), "{chain}");
        assert_eq!(
            inner.calls.load(Ordering::SeqCst),
            2,
            "one resolution per connection"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing reached 127.0.0.1");

        let inner = Scripted::new(&[&["127.0.0.1"]]);
        let resp = client(true, inner).post(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        server.abort();
    }
}

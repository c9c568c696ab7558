//! SSRF protection: destinations that resolve to private, loopback, link-local (cloud metadata) or
//! other non-public addresses are refused unless `--allow-private-networks`. The check runs at DNS
//! resolution, for every new connection, so a name that later resolves somewhere private is caught.

use std::net::{IpAddr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why `ip` may not be a destination, if it may not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || o[0] == 0 {
                Some("non-routable")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("private")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("non-routable")
            } else {
                None
            }
        }
    }
}

/// A resolver that drops forbidden addresses and fails when none is left.
#[derive(Clone, Copy, Debug)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let total = addrs.len();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| allow || forbidden(a.ip()).is_none())
                .collect();
            if allowed.is_empty() {
                let msg = if total == 0 {
                    format!("{host} has no addresses")
                } else {
                    format!("{host} resolves only to private/loopback/link-local addresses (SSRF guard)")
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

    #[test]
    fn classifies_addresses() {
        let f = |s: &str| forbidden(s.parse().unwrap());
        assert_eq!(f("127.0.0.1"), Some("loopback"));
        assert_eq!(f("10.1.2.3"), Some("private"));
        assert_eq!(f("172.16.0.1"), Some("private"));
        assert_eq!(f("192.168.1.1"), Some("private"));
        assert_eq!(f("100.64.0.1"), Some("private"));
        assert_eq!(f("169.254.169.254"), Some("link-local"));
        assert_eq!(f("0.0.0.0"), Some("non-routable"));
        assert_eq!(f("::1"), Some("loopback"));
        assert_eq!(f("fd00::1"), Some("private"));
        assert_eq!(f("fe80::1"), Some("link-local"));
        assert_eq!(f("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(f("93.184.216.34"), None);
        assert_eq!(f("2606:2800:220:1::1"), None);
    }
}

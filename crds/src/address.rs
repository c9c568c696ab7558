//! Which destination addresses are refused unless `allowPrivateNetworks` (SSRF): private, loopback,
//! link-local (cloud metadata) and other non-public ranges, in IPv4 and in the IPv6 forms that carry an
//! IPv4 address. The worker checks every address its resolver returns and an IP literal in the URL at
//! start; `validate` checks the literal before anything rolls.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` may not be a destination, if it may not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let o = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        // RFC 1918 and CGNAT (100.64.0.0/10).
        Some("private")
    } else if v4.is_link_local() {
        // 169.254.0.0/16, cloud metadata (169.254.169.254) included.
        Some("link-local")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        // 198.18.0.0/15: benchmarking, used inside some clouds and proxies.
        Some("benchmarking")
    } else if o[0] >= 240 {
        // 240.0.0.0/4 (reserved) and the broadcast address.
        Some("reserved")
    } else if o[0] == 0 || v4.is_multicast() || (o[0] == 192 && o[1] == 0 && o[2] == 0) {
        // 0.0.0.0/8 ("this network"; 0.0.0.0 reaches the local host), multicast, 192.0.0.0/24
        // (IETF protocol assignments).
        Some("non-routable")
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address carries, in the forms that reach it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4
/// (`2002:aabb:ccdd::/16`).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        // IPv4-compatible (not :: or ::1, which are IPv6's own).
        return Some(v4(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(v4(s[1], s[2]));
    }
    None
}

fn forbidden_v6(v6: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(v6) {
        return forbidden_v4(v4);
    }
    let s = v6.segments();
    if v6.is_loopback() {
        Some("loopback")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        // fc00::/7, unique local.
        Some("private")
    } else if (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
        // fe80::/10 link-local, fec0::/10 (deprecated site-local).
        Some("link-local")
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // 64:ff9b:1::/48, local-use NAT64 (RFC 8215): translates into the operator's own network.
        Some("private")
    } else if v6.is_unspecified() || v6.is_multicast() {
        Some("non-routable")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_addresses() {
        let f = |s: &str| forbidden(s.parse().unwrap());
        for (ip, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "private"),
            ("169.254.169.254", "link-local"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "reserved"),
            ("0.0.0.0", "non-routable"),
            ("0.1.2.3", "non-routable"),
            ("224.0.0.1", "non-routable"),
            ("::1", "loopback"),
            ("::", "non-routable"),
            ("fd00::1", "private"),
            ("fc00::1", "private"),
            ("fe80::1", "link-local"),
            ("ff02::1", "non-routable"),
            // IPv4 inside IPv6: mapped, compatible, NAT64, 6to4.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::c612:1", "benchmarking"),
            ("64:ff9b:1::1", "private"),
            ("2002:7f00:1::1", "loopback"),
            ("2002:a00:1::", "private"),
            ("2002:a9fe:a9fe::1", "link-local"),
        ] {
            assert_eq!(f(ip), Some(kind), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "172.32.0.1",
            "198.20.0.1",
            "100.128.0.1",
            "2606:2800:220:1::1",
            "64:ff9b::5db8:d822",
            "2002:5db8:d822::1",
            "::ffff:93.184.216.34",
        ] {
            assert_eq!(f(ip), None, "{ip} is public");
        }
    }
}

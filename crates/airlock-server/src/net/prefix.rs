//! How source addresses are grouped, the one definition every per-address limit uses.
//!
//! An [`address_key`] is what one host usually holds: an IPv4 address, or an IPv6 /64 (providers hand a host a whole /64, so counting single IPv6 addresses would give it 2^64 budgets).
//! A [`network_key`] is what one customer of a provider cheaply holds: an IPv6 /48 (65,536 /64s, from any tunnel broker or IPv6 host) or an IPv4 /24.
//! An IPv4-mapped IPv6 address is its IPv4 address in both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The key a source address is counted under: IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6 by its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match unmapped(ip) {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// The network a source address belongs to: an IPv4 /24, or an IPv6 /48.
pub fn network_key(ip: IpAddr) -> IpAddr {
    match unmapped(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, 0))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
        }
    }
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_counted_by_ipv4_address_and_ipv6_slash_64() {
        assert_eq!(address_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(address_key(ip("2001:db8:1:2:ffff::1")), ip("2001:db8:1:2::"));
        assert_ne!(address_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(address_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(address_key(ip("10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn networks_are_ipv4_slash_24_and_ipv6_slash_48() {
        assert_eq!(network_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1::"));
        assert_eq!(network_key(ip("2001:db8:1:ffff::1")), ip("2001:db8:1::"));
        assert_ne!(network_key(ip("2001:db8:2::1")), ip("2001:db8:1::"));
        assert_eq!(network_key(ip("::ffff:10.0.0.9")), ip("10.0.0.0"));
        assert_eq!(network_key(ip("10.0.0.255")), ip("10.0.0.0"));
        assert_ne!(network_key(ip("10.0.1.1")), ip("10.0.0.0"));
    }
}

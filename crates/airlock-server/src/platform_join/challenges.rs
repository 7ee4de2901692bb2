//! Join challenges: short-lived, single-use nonces a platform proof must carry.
//!
//! Anyone may ask for one (an appliance has no credential yet), so what they hold is bounded by
//! [`crate::net::anonymous`]: at most [`BUDGET`]`.per_address` outstanding per source address (an
//! IPv6 /64 counting as one), `per_network` per IPv6 /48 or IPv4 /24, and `total` in all, about
//! 100 bytes each; expired ones are dropped whenever a level is full before a request is refused.
//! A challenge is asked for before anything names a tenant (the proof that names one spends it),
//! and a name the peer chose would be the attacker's to pick, so challenges are split by network
//! only: filling the table takes [`crate::net::anonymous::Budget::networks_to_fill`] networks.
//! Each is bound to the target the appliance asked for it with ([`JoinTarget`]: the tenant or
//! environment its join will pin, chosen by the peer and so no party to split by), and spending it
//! for another target fails, so a proof that carries the challenge cannot be steered elsewhere.
//! They live in memory only: a restart forgets them, which costs an appliance one retry, and
//! nothing an anonymous peer does reaches the store. The limits are per process, as the store is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::Timestamp;
use airlock_proto::join::JoinTarget;
use data_encoding::BASE64URL_NOPAD;

use crate::net::anonymous::{Budget, Holder, Holdings, Over};

/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// What challenges anonymous peers may hold at once. No party: see the module's comment.
pub const BUDGET: Budget =
    Budget { per_address: 16, per_network: 128, per_party: 10_000, reserved_per_party: 0, total: 10_000 };

/// Why no challenge was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeLimit {
    /// This address (an IPv6 /64) holds its share of unexpired challenges.
    PerAddress,
    /// This address's network (an IPv6 /48, an IPv4 /24) holds its share.
    PerNetwork,
    /// The table of unexpired challenges is full.
    Global,
}

/// Why a challenge was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeRefusal {
    /// Never issued, already answered once, or forgotten by a restart.
    Unknown,
    Expired,
    /// Asked for with another target than the join that answers it pins.
    OtherTarget,
}

/// An issued challenge.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub nonce: String,
    pub expires_at: Timestamp,
}

#[derive(Debug)]
struct Issued {
    expires_at: Timestamp,
    /// The tenant or environment the join must pin.
    target: JoinTarget,
    /// Where it counts.
    holder: Holder<()>,
}

#[derive(Debug)]
struct Table {
    by_nonce: HashMap<String, Issued>,
    held: Holdings<()>,
}

impl Default for Table {
    fn default() -> Self {
        Self { by_nonce: HashMap::new(), held: Holdings::new(BUDGET) }
    }
}

impl Table {
    fn remove(&mut self, nonce: &str) -> Option<Issued> {
        let issued = self.by_nonce.remove(nonce)?;
        self.held.remove(&issued.holder);
        Some(issued)
    }

    fn prune(&mut self, now: Timestamp) {
        let expired: Vec<String> =
            self.by_nonce.iter().filter(|(_, i)| now >= i.expires_at).map(|(n, _)| n.clone()).collect();
        for nonce in expired {
            self.remove(&nonce);
        }
    }
}

/// The outstanding challenges.
#[derive(Debug, Default)]
pub struct Challenges {
    table: Mutex<Table>,
}

impl Challenges {
    /// Issues a challenge to `from` for a join pinned to `target`, unless its address, its network or everyone holds
    /// too many.
    pub fn issue(
        &self,
        from: Option<IpAddr>,
        now: Timestamp,
        random: [u8; 32],
        target: JoinTarget,
    ) -> Result<Challenge, ChallengeLimit> {
        let holder = Holder::new(from, None);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.held.over(&holder).is_some() {
            // Only when full: a sweep of at most `BUDGET.total` entries, not one per request.
            t.prune(now);
            match t.held.over(&holder) {
                None => {}
                Some(Over::Address) => return Err(ChallengeLimit::PerAddress),
                Some(Over::Network) => return Err(ChallengeLimit::PerNetwork),
                Some(Over::Party | Over::Total) => return Err(ChallengeLimit::Global),
            }
        }
        let nonce = BASE64URL_NOPAD.encode(&random);
        let expires_at = now.saturating_add(CHALLENGE_TTL);
        t.held.add(&holder);
        t.by_nonce.insert(nonce.clone(), Issued { expires_at, target, holder });
        Ok(Challenge { nonce, expires_at })
    }

    /// Spends `nonce`: the first answer takes it, whatever happens to the join after, so
    /// neither the challenge nor a proof carrying it is accepted twice; and only by a join pinned
    /// to the `target` it was issued for.
    pub fn spend(&self, nonce: &str, now: Timestamp, target: JoinTarget) -> Result<(), ChallengeRefusal> {
        let issued =
            self.table.lock().unwrap_or_else(|e| e.into_inner()).remove(nonce).ok_or(ChallengeRefusal::Unknown)?;
        if now >= issued.expires_at {
            Err(ChallengeRefusal::Expired)
        } else if issued.target != target {
            Err(ChallengeRefusal::OtherTarget)
        } else {
            Ok(())
        }
    }

    /// Challenges outstanding (expired ones not yet swept included).
    pub fn outstanding(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).by_nonce.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: JoinTarget = JoinTarget { tenant: None, environment: None };

    fn r(n: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b
    }

    #[test]
    fn a_challenge_is_spent_once_and_expires() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let a = c.issue(None, t0, r(1), ANY).unwrap();
        assert_eq!(c.spend(&a.nonce, t0, ANY), Ok(()));
        assert_eq!(c.spend(&a.nonce, t0, ANY), Err(ChallengeRefusal::Unknown), "replayed");
        let b = c.issue(None, t0, r(2), ANY).unwrap();
        assert_eq!(c.spend(&b.nonce, t0.saturating_add(CHALLENGE_TTL), ANY), Err(ChallengeRefusal::Expired));
        assert_eq!(c.spend("made-up", t0, ANY), Err(ChallengeRefusal::Unknown));
        // Bound to its target: spent by a join pinned elsewhere, it is refused, and gone.
        let alpha = JoinTarget { tenant: Some(airlock_core::TenantId::from_random([1; 16])), environment: None };
        let beta = JoinTarget { tenant: Some(airlock_core::TenantId::from_random([2; 16])), environment: None };
        let d = c.issue(None, t0, r(3), alpha).unwrap();
        assert_eq!(c.spend(&d.nonce, t0, beta), Err(ChallengeRefusal::OtherTarget));
        assert_eq!(c.spend(&d.nonce, t0, alpha), Err(ChallengeRefusal::Unknown), "a refused answer spends it");
        let e = c.issue(None, t0, r(4), alpha).unwrap();
        assert_eq!(c.spend(&e.nonce, t0, ANY), Err(ChallengeRefusal::OtherTarget), "nor unpinned");
        let f = c.issue(None, t0, r(5), alpha).unwrap();
        assert_eq!(c.spend(&f.nonce, t0, alpha), Ok(()));
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn one_address_holds_a_few_and_everyone_a_bounded_number() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let peer: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        for i in 0..BUDGET.per_address as u32 {
            c.issue(Some(peer), t0, r(i), ANY).unwrap();
        }
        assert_eq!(c.issue(Some(same_64), t0, r(999), ANY).unwrap_err(), ChallengeLimit::PerAddress);
        // Once they expire, the address is served again.
        assert!(c.issue(Some(peer), t0.saturating_add(CHALLENGE_TTL), r(1000), ANY).is_ok());
        // Many IPv4 networks, each at its share, fill the table.
        let c = Challenges::default();
        for i in 0..BUDGET.total as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (i / 16) * 256 + i % 16));
            c.issue(Some(ip), t0, r(i), ANY).unwrap();
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(c.issue(Some(newcomer), t0, r(u32::MAX), ANY).unwrap_err(), ChallengeLimit::Global);
        assert_eq!(c.outstanding(), BUDGET.total);
        assert!(
            c.issue(Some(newcomer), t0.saturating_add(CHALLENGE_TTL), r(u32::MAX), ANY).is_ok(),
            "expired ones swept"
        );
        assert_eq!(c.outstanding(), 1);
    }

    #[test]
    fn a_slash_48_flood_leaves_challenges_for_everyone_else() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        // Every /64 of one /48 asks for its full share: only the network's share is issued.
        let mut issued = 0;
        for subnet in 0..=u16::MAX {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x48, subnet, 0, 0, 0, 1));
            for k in 0..BUDGET.per_address as u32 {
                match c.issue(Some(ip), t0, r(u32::from(subnet) << 5 | k), ANY) {
                    Ok(_) => issued += 1,
                    Err(limit) => {
                        assert_eq!(limit, ChallengeLimit::PerNetwork);
                        break;
                    }
                }
            }
        }
        assert_eq!(issued, BUDGET.per_network);
        assert_eq!(c.outstanding(), BUDGET.per_network);
        // An appliance on another /48, or on IPv4, still gets its challenge and can spend it.
        let elsewhere = c.issue(Some("2001:db8:49::1".parse().unwrap()), t0, r(u32::MAX), ANY).unwrap();
        assert_eq!(c.spend(&elsewhere.nonce, t0, ANY), Ok(()));
        assert!(c.issue(Some("198.51.100.7".parse().unwrap()), t0, r(u32::MAX - 1), ANY).is_ok());
    }
}

//! Join challenges: short-lived, single-use nonces a platform proof must carry.
//!
//! Anyone may ask for one (an appliance has no credential yet), so what they hold is bounded:
//! at most [`MAX_PER_ADDRESS`] outstanding per source address (an IPv6 /64 counting as one)
//! and [`MAX_OUTSTANDING`] in all, about 100 bytes each; expired ones are dropped whenever the
//! table is full before a request is refused. They live in memory only: a restart forgets them,
//! which costs an appliance one retry, and nothing an anonymous peer does reaches the store.
//! The limits are per process, as the store is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::Timestamp;
use data_encoding::BASE64URL_NOPAD;

/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Challenges outstanding at once, across all peers.
pub const MAX_OUTSTANDING: usize = 10_000;
/// Challenges one source address may hold at once.
pub const MAX_PER_ADDRESS: usize = 16;

/// Why no challenge was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeLimit {
    /// This address holds [`MAX_PER_ADDRESS`] unexpired challenges.
    PerAddress,
    /// [`MAX_OUTSTANDING`] unexpired challenges are out.
    Global,
}

/// Why a challenge was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeRefusal {
    /// Never issued, already answered once, or forgotten by a restart.
    Unknown,
    Expired,
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
    /// The address it counts against (`None`: an in-memory caller with no address).
    from: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct Table {
    by_nonce: HashMap<String, Issued>,
    per_address: HashMap<Option<IpAddr>, usize>,
}

impl Table {
    fn remove(&mut self, nonce: &str) -> Option<Issued> {
        let issued = self.by_nonce.remove(nonce)?;
        if let Some(n) = self.per_address.get_mut(&issued.from) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&issued.from);
            }
        }
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
    /// Issues a challenge to `from`, unless it or everyone holds too many.
    pub fn issue(&self, from: Option<IpAddr>, now: Timestamp, random: [u8; 32]) -> Result<Challenge, ChallengeLimit> {
        let from = from.map(crate::net::slots::address_key);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let full = |t: &Table| {
            if t.per_address.get(&from).copied().unwrap_or(0) >= MAX_PER_ADDRESS {
                Some(ChallengeLimit::PerAddress)
            } else if t.by_nonce.len() >= MAX_OUTSTANDING {
                Some(ChallengeLimit::Global)
            } else {
                None
            }
        };
        if full(&t).is_some() {
            // Only when full: a sweep of at most MAX_OUTSTANDING entries, not one per request.
            t.prune(now);
            if let Some(limit) = full(&t) {
                return Err(limit);
            }
        }
        let nonce = BASE64URL_NOPAD.encode(&random);
        let expires_at = now.saturating_add(CHALLENGE_TTL);
        t.by_nonce.insert(nonce.clone(), Issued { expires_at, from });
        *t.per_address.entry(from).or_default() += 1;
        Ok(Challenge { nonce, expires_at })
    }

    /// Spends `nonce`: the first answer takes it, whatever happens to the join after, so
    /// neither the challenge nor a proof carrying it is accepted twice.
    pub fn spend(&self, nonce: &str, now: Timestamp) -> Result<(), ChallengeRefusal> {
        let issued =
            self.table.lock().unwrap_or_else(|e| e.into_inner()).remove(nonce).ok_or(ChallengeRefusal::Unknown)?;
        if now >= issued.expires_at { Err(ChallengeRefusal::Expired) } else { Ok(()) }
    }

    /// Challenges outstanding (expired ones not yet swept included).
    pub fn outstanding(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).by_nonce.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b
    }

    #[test]
    fn a_challenge_is_spent_once_and_expires() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let a = c.issue(None, t0, r(1)).unwrap();
        assert_eq!(c.spend(&a.nonce, t0), Ok(()));
        assert_eq!(c.spend(&a.nonce, t0), Err(ChallengeRefusal::Unknown), "replayed");
        let b = c.issue(None, t0, r(2)).unwrap();
        assert_eq!(c.spend(&b.nonce, t0.saturating_add(CHALLENGE_TTL)), Err(ChallengeRefusal::Expired));
        assert_eq!(c.spend("made-up", t0), Err(ChallengeRefusal::Unknown));
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn one_address_holds_a_few_and_everyone_a_bounded_number() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let peer: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        for i in 0..MAX_PER_ADDRESS as u32 {
            c.issue(Some(peer), t0, r(i)).unwrap();
        }
        assert_eq!(c.issue(Some(same_64), t0, r(999)).unwrap_err(), ChallengeLimit::PerAddress);
        // Once they expire, the address is served again.
        assert!(c.issue(Some(peer), t0.saturating_add(CHALLENGE_TTL), r(1000)).is_ok());
        let c = Challenges::default();
        for i in 0..MAX_OUTSTANDING as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            c.issue(Some(ip), t0, r(i)).unwrap();
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(c.issue(Some(newcomer), t0, r(u32::MAX)).unwrap_err(), ChallengeLimit::Global);
        assert_eq!(c.outstanding(), MAX_OUTSTANDING);
        assert!(c.issue(Some(newcomer), t0.saturating_add(CHALLENGE_TTL), r(u32::MAX)).is_ok(), "expired ones swept");
        assert_eq!(c.outstanding(), 1);
    }
}

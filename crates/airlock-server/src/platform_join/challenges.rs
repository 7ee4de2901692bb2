//! Join challenges: short-lived, single-use nonces a platform proof must carry.
//!
//! Anyone may ask for one (an appliance has no credential yet), so issuing one keeps nothing:
//! a challenge is its own record: a random part and its expiry under a MAC with a key this
//! process drew at start, and a second MAC binding it to the target the appliance asked for it
//! with ([`JoinTarget`]: the tenant or environment its join will pin). No one can hold
//! challenges to deny them to others (the table an earlier design kept could be filled from
//! enough networks), and a proof that carries one cannot be presented for another target.
//! What is kept is the spent ones, until they expire, so none is answered twice: at most
//! [`MAX_SPENT`] (about 50 bytes each, ordered by expiry so forgetting the expired ones never
//! scans the rest), which an anonymous peer fills only by answering that
//! many challenges within [`CHALLENGE_TTL`], each a join request with a valid CSR.
//! A restart draws a new key and forgets them, which costs an appliance one retry; nothing an
//! anonymous peer does reaches the store. They are per process, as the key is.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use airlock_core::Timestamp;
use airlock_proto::join::JoinTarget;
use data_encoding::BASE64URL_NOPAD;
use ring::hmac;

/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// The most spent, unexpired challenges remembered; past it, answers wait until some expire.
pub const MAX_SPENT: usize = 1_000_000;

/// Random bytes, expiry (Unix milliseconds, big-endian), the MAC of both, and the MAC binding
/// them to the target, in that order. The second is shorter: it tells a genuine challenge's
/// target apart, and forging one still needs the key.
const RANDOM_BYTES: usize = 16;
const EXPIRY_BYTES: usize = 8;
const TAG_BYTES: usize = 16;
const TARGET_TAG_BYTES: usize = 8;
const NONCE_BYTES: usize = RANDOM_BYTES + EXPIRY_BYTES + TAG_BYTES + TARGET_TAG_BYTES;

/// Why a challenge was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeRefusal {
    /// Never issued by this process, already answered once, or forgotten by a restart.
    Unknown,
    Expired,
    /// Asked for with another target than the join that answers it pins.
    OtherTarget,
    /// More challenges were answered within their lifetime than are remembered.
    Busy,
}

/// An issued challenge.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub nonce: String,
    pub expires_at: Timestamp,
}

/// At most this many expired challenges are forgotten per spend: a spend after a quiet minute
/// does not stall on the whole set, and since a spend adds at most one, the expired still drain
/// faster than they come.
const FORGET_PER_SPEND: usize = 64;

#[derive(Debug, Default)]
struct Spent {
    /// By (expiry in Unix milliseconds, random part): the expiry is in the nonce under its MAC,
    /// so a spend looks its own one up exactly, and the expired ones are the first, forgotten a
    /// few at a time as spends come (O(log n) each, never a scan of the unexpired: a refusal when
    /// full costs no more than an answer).
    by_expiry: BTreeSet<(i64, [u8; RANDOM_BYTES])>,
    /// The latest time a spend was judged at. Time is never judged earlier than this: a clock
    /// stepped back (or a request that read it before another took the lock) would otherwise
    /// accept a spent challenge once it has been forgotten as expired.
    latest: i64,
}

/// Issues challenges and remembers the spent ones.
#[derive(Debug)]
pub struct Challenges {
    key: hmac::Key,
    spent: Mutex<Spent>,
}

impl Default for Challenges {
    fn default() -> Self {
        Self::with_key(&crate::state::random())
    }
}

impl Challenges {
    fn with_key(key: &[u8; 32]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, key), spent: Mutex::default() }
    }

    fn tag(&self, random: &[u8], expiry: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"airlock join challenge v1\0");
        ctx.update(random);
        ctx.update(expiry);
        ctx.sign()
    }

    fn target_tag(&self, random: &[u8], target: JoinTarget) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"airlock join challenge target v1\0");
        ctx.update(random);
        // Two fields, an absent one empty, ids never holding the separator: no two targets alike.
        let tenant = target.tenant.map(|t| t.to_string()).unwrap_or_default();
        let environment = target.environment.map(|e| e.to_string()).unwrap_or_default();
        ctx.update(tenant.as_bytes());
        ctx.update(b"\0");
        ctx.update(environment.as_bytes());
        ctx.sign()
    }

    /// Issues a challenge for a join pinned to `target`.
    pub fn issue(&self, now: Timestamp, random: [u8; 32], target: JoinTarget) -> Challenge {
        let expires_at = now.saturating_add(CHALLENGE_TTL);
        let expiry = expires_at.unix_millis().to_be_bytes();
        let random = &random[..RANDOM_BYTES];
        let mut nonce = Vec::with_capacity(NONCE_BYTES);
        nonce.extend_from_slice(random);
        nonce.extend_from_slice(&expiry);
        nonce.extend_from_slice(&self.tag(random, &expiry).as_ref()[..TAG_BYTES]);
        nonce.extend_from_slice(&self.target_tag(random, target).as_ref()[..TARGET_TAG_BYTES]);
        Challenge { nonce: BASE64URL_NOPAD.encode(&nonce), expires_at }
    }

    /// Spends `nonce`: the first answer takes it, whatever happens to the join after, so
    /// neither the challenge nor a proof carrying it is accepted twice; and only by a join pinned
    /// to the `target` it was issued for.
    pub fn spend(&self, nonce: &str, now: Timestamp, target: JoinTarget) -> Result<(), ChallengeRefusal> {
        // Decoded only at its exact length: a longer string costs nothing to refuse.
        if nonce.len() != BASE64URL_NOPAD.encode_len(NONCE_BYTES) {
            return Err(ChallengeRefusal::Unknown);
        }
        let bytes = BASE64URL_NOPAD.decode(nonce.as_bytes()).map_err(|_| ChallengeRefusal::Unknown)?;
        let (random, rest) = bytes.split_at(RANDOM_BYTES);
        let (expiry, rest) = rest.split_at(EXPIRY_BYTES);
        let (tag, target_tag) = rest.split_at(TAG_BYTES);
        // Compared in the same time wherever the tags differ.
        use subtle::ConstantTimeEq;
        let genuine: bool = self.tag(random, expiry).as_ref()[..TAG_BYTES].ct_eq(tag).into();
        if !genuine {
            return Err(ChallengeRefusal::Unknown);
        }
        let ours: bool = self.target_tag(random, target).as_ref()[..TARGET_TAG_BYTES].ct_eq(target_tag).into();
        let mut expires = [0u8; EXPIRY_BYTES];
        expires.copy_from_slice(expiry);
        let expires = i64::from_be_bytes(expires);
        let mut key = [0u8; RANDOM_BYTES];
        key.copy_from_slice(random);
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        // Judged under the lock, at no earlier time than any spend before (see `Spent::latest`).
        let now = now.unix_millis().max(spent.latest);
        spent.latest = now;
        if now >= expires {
            return Err(ChallengeRefusal::Expired);
        }
        for _ in 0..FORGET_PER_SPEND {
            if spent.by_expiry.first().is_none_or(|(e, _)| *e > now) {
                break;
            }
            spent.by_expiry.pop_first();
        }
        if spent.by_expiry.contains(&(expires, key)) {
            return Err(ChallengeRefusal::Unknown);
        }
        if spent.by_expiry.len() >= MAX_SPENT {
            return Err(ChallengeRefusal::Busy);
        }
        // Spent even when answered for another target: whoever steered it gets no second try.
        spent.by_expiry.insert((expires, key));
        if ours { Ok(()) } else { Err(ChallengeRefusal::OtherTarget) }
    }

    /// Spent challenges remembered (expired ones not yet forgotten included).
    pub fn remembered(&self) -> usize {
        self.spent.lock().unwrap_or_else(|e| e.into_inner()).by_expiry.len()
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
        let a = c.issue(t0, r(1), ANY);
        assert_eq!(c.spend(&a.nonce, t0, ANY), Ok(()));
        assert_eq!(c.spend(&a.nonce, t0, ANY), Err(ChallengeRefusal::Unknown), "replayed");
        assert_eq!(c.spend("made-up", t0, ANY), Err(ChallengeRefusal::Unknown));
        // Bound to its target: answered by a join pinned elsewhere, or unpinned, it is refused.
        let alpha = JoinTarget { tenant: Some(airlock_core::TenantId::from_random([1; 16])), environment: None };
        let beta = JoinTarget { tenant: Some(airlock_core::TenantId::from_random([2; 16])), environment: None };
        let d = c.issue(t0, r(3), alpha);
        assert_eq!(c.spend(&d.nonce, t0, beta), Err(ChallengeRefusal::OtherTarget));
        assert_eq!(c.spend(&d.nonce, t0, alpha), Err(ChallengeRefusal::Unknown), "a refused answer spends it");
        let e = c.issue(t0, r(4), alpha);
        assert_eq!(c.spend(&e.nonce, t0, ANY), Err(ChallengeRefusal::OtherTarget), "nor unpinned");
        let f = c.issue(t0, r(5), alpha);
        assert_eq!(c.spend(&f.nonce, t0, alpha), Ok(()));
        assert_eq!(c.remembered(), 4);
        let b = c.issue(t0, r(2), ANY);
        assert_eq!(c.spend(&b.nonce, t0.saturating_add(CHALLENGE_TTL), ANY), Err(ChallengeRefusal::Expired));
    }

    #[test]
    fn a_forged_or_altered_challenge_or_another_processs_is_refused() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let a = c.issue(t0, r(1), ANY);
        let mut bytes = BASE64URL_NOPAD.decode(a.nonce.as_bytes()).unwrap();
        // A later expiry, written in by the peer.
        bytes[RANDOM_BYTES] ^= 0x01;
        assert_eq!(c.spend(&BASE64URL_NOPAD.encode(&bytes), t0, ANY), Err(ChallengeRefusal::Unknown));
        // Another process (or this one before a restart) drew another key.
        let other = Challenges::default().issue(t0, r(1), ANY);
        assert_eq!(c.spend(&other.nonce, t0, ANY), Err(ChallengeRefusal::Unknown));
        assert_eq!(c.spend(&format!("{}A", a.nonce), t0, ANY), Err(ChallengeRefusal::Unknown), "too long");
        assert_eq!(c.remembered(), 0, "nothing refused is remembered");
        assert_eq!(c.spend(&a.nonce, t0, ANY), Ok(()), "the genuine one still answers");
    }

    #[test]
    fn issuing_keeps_nothing_and_spent_ones_are_forgotten_once_expired() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        // However many are asked for, nothing is held: no one can deny challenges to others.
        let issued: Vec<Challenge> = (0..5_000).map(|i| c.issue(t0, r(i), ANY)).collect();
        assert_eq!(c.remembered(), 0);
        for ch in &issued {
            assert_eq!(c.spend(&ch.nonce, t0, ANY), Ok(()));
        }
        assert_eq!(c.remembered(), 5_000);
        // A minute on, those have expired and are forgotten as new ones are spent.
        let t1 = t0.saturating_add(CHALLENGE_TTL);
        for i in 0..5_000 {
            let ch = c.issue(t1, r(10_000 + i), ANY);
            assert_eq!(c.spend(&ch.nonce, t1, ANY), Ok(()));
        }
        assert_eq!(c.remembered(), 5_000);
    }

    #[test]
    fn when_full_answers_are_refused_busy_until_some_expire_and_a_refusal_keeps_nothing() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let later = t0.saturating_add(Duration::from_secs(30));
        // Filled as a flood would fill it (built directly: a million spends would be slow here).
        c.spent.lock().unwrap().by_expiry.extend((0..MAX_SPENT as u32).map(|i| {
            let mut k = [0u8; RANDOM_BYTES];
            k[..4].copy_from_slice(&i.to_be_bytes());
            // Half expire with t0's challenges, half 30 s later.
            let expires = if i % 2 == 0 { t0 } else { later }.saturating_add(CHALLENGE_TTL).unix_millis();
            (expires, k)
        }));
        let a = c.issue(t0, r(u32::MAX), ANY);
        assert_eq!(c.spend(&a.nonce, t0, ANY), Err(ChallengeRefusal::Busy));
        assert_eq!(c.remembered(), MAX_SPENT, "a busy refusal remembers nothing");
        // Once t0's have expired, a few are forgotten at each spend, and answers are taken again.
        let t1 = t0.saturating_add(CHALLENGE_TTL);
        let b = c.issue(t1, r(u32::MAX - 1), ANY);
        assert_eq!(c.spend(&b.nonce, t1, ANY), Ok(()));
        assert_eq!(c.remembered(), MAX_SPENT - FORGET_PER_SPEND + 1);
        assert_eq!(c.spend(&b.nonce, t1, ANY), Err(ChallengeRefusal::Unknown), "and spent once");
    }

    #[test]
    fn a_clock_stepped_back_does_not_revive_a_forgotten_challenge() {
        let c = Challenges::default();
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let a = c.issue(t0, r(1), ANY);
        assert_eq!(c.spend(&a.nonce, t0, ANY), Ok(()));
        // A spend a minute on forgets `a` as expired.
        let t1 = t0.saturating_add(CHALLENGE_TTL);
        let b = c.issue(t1, r(2), ANY);
        assert_eq!(c.spend(&b.nonce, t1, ANY), Ok(()));
        assert_eq!(c.remembered(), 1);
        // The clock steps back (or a request read it before the other took the lock): `a` is still expired.
        assert_eq!(c.spend(&a.nonce, t0, ANY), Err(ChallengeRefusal::Expired));
    }
}

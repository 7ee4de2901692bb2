//! The durable record of spent grant nonces, so an approval is used once, across restarts.
//!
//! `consume` checks and records under one lock and syncs before it answers: two concurrent uses
//! of one approval cannot both succeed, and a nonce answered as spent stays spent after a crash.
//! Entries are kept until their approval expires (after which its window refuses it anyway),
//! and pruned when the store is opened; the pruned file replaces the old one with
//! `crate::files::replace`, directory synced, before anything is appended.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use airlock_core::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ApplianceError;
use crate::files::{self, Mode};

pub(crate) const NONCE_FILE: &str = "used-nonces.jsonl";

#[derive(Serialize, Deserialize)]
struct Entry {
    nonce: String,
    not_after: Timestamp,
}

pub(crate) struct NonceStore {
    inner: Mutex<(std::fs::File, BTreeMap<String, Timestamp>)>,
}

impl NonceStore {
    /// Opens the store, dropping nonces whose grants expired before `now`.
    pub(crate) fn open(state_dir: &Path, now: Timestamp) -> Result<Self, ApplianceError> {
        let path = state_dir.join(NONCE_FILE);
        let err = |e: String| ApplianceError::Customer(format!("used-nonce record {}: {e}", path.display()));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        let mut live = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            match serde_json::from_str::<Entry>(line) {
                Ok(e) if e.not_after > now => {
                    live.insert(e.nonce, e.not_after);
                }
                Ok(_) => {}
                // Only the last line can be cut by a crash, and its use was never acknowledged.
                Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => {}
                Err(_) => return Err(err(format!("line {} is damaged; refusing to forget spent nonces", i + 1))),
            }
        }
        // Rewrite compactly (atomically), then append from there.
        let compact: String = live
            .iter()
            .map(|(nonce, not_after)| {
                serde_json::to_string(&Entry { nonce: nonce.clone(), not_after: *not_after }).unwrap_or_default() + "\n"
            })
            .collect();
        files::replace(&path, compact.as_bytes(), Mode::Private).map_err(|e| err(e.to_string()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| err(e.to_string()))?;
        Ok(Self { inner: Mutex::new((file, live)) })
    }

    pub(crate) fn is_used(&self, nonce: &str) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1.contains_key(nonce)
    }

    /// Records `nonce` as spent. `Ok(false)` if it already was: the caller must not proceed.
    pub(crate) fn consume(&self, nonce: &str, not_after: Timestamp) -> Result<bool, ApplianceError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (file, live) = &mut *guard;
        if live.contains_key(nonce) {
            return Ok(false);
        }
        let line = serde_json::to_string(&Entry { nonce: nonce.to_owned(), not_after })
            .map_err(|e| ApplianceError::Internal(e.to_string()))?;
        file.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| ApplianceError::Customer(format!("recording a spent nonce: {e}")))?;
        live.insert(nonce.to_owned(), not_after);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    #[test]
    fn nonce_is_spent_once_and_stays_spent_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = NonceStore::open(dir.path(), t(0)).unwrap();
        assert!(store.consume("n-1", t(1_000)).unwrap());
        assert!(!store.consume("n-1", t(1_000)).unwrap(), "replay in the same run");
        drop(store);
        let store = NonceStore::open(dir.path(), t(500)).unwrap();
        assert!(store.is_used("n-1"));
        assert!(!store.consume("n-1", t(1_000)).unwrap(), "replay after restart");
        assert!(store.consume("n-2", t(1_000)).unwrap());
    }

    #[test]
    fn expired_nonces_are_pruned_but_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = NonceStore::open(dir.path(), t(0)).unwrap();
        store.consume("old", t(100)).unwrap();
        store.consume("live", t(10_000)).unwrap();
        drop(store);
        let store = NonceStore::open(dir.path(), t(5_000)).unwrap();
        assert!(!store.is_used("old"));
        assert!(store.is_used("live"));
        let text = std::fs::read_to_string(dir.path().join(NONCE_FILE)).unwrap();
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn concurrent_uses_of_one_nonce_admit_exactly_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(NonceStore::open(dir.path(), t(0)).unwrap());
        let wins: usize = (0..8)
            .map(|_| {
                let s = store.clone();
                std::thread::spawn(move || s.consume("same", t(1_000)).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(wins, 1);
    }

    #[test]
    fn damaged_record_is_refused_but_a_cut_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = NonceStore::open(dir.path(), t(0)).unwrap();
        store.consume("a", t(1_000)).unwrap();
        drop(store);
        let path = dir.path().join(NONCE_FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"nonce\":\"b\",\"not_af").unwrap();
        let store = NonceStore::open(dir.path(), t(0)).unwrap();
        assert!(store.is_used("a") && !store.is_used("b"));
        drop(store);
        std::fs::write(&path, "garbage\n{\"nonce\":\"a\",\"not_after\":1000}\n").unwrap();
        assert!(NonceStore::open(dir.path(), t(0)).is_err());
    }
}

//! Hot reads served from memory until the next write.
//!
//! Every `WriteTx` that commits a change other readers could see bumps one generation counter ([`Generation`]) before its caller is answered; an entry read at an older generation is a miss.
//! So a revocation, a join or a last-seen batch is seen by the very next request, with no per-table invalidation to forget.
//! The generation is read before the database is, so a write that lands between the two leaves an entry already stale, never a stale entry marked fresh.
//! Only group-committed audit records skip the bump: they change no table a cached read returns, and bumping on them would empty the cache on every read.
//! The server holds the data directory's lock, so every write goes through this process, but for `airlock server tenant create`, which only adds rows no cached read can hold (unknown tokens are not cached); editing the database under a running server is unsupported.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts committed writes.
#[derive(Debug, Default)]
pub(super) struct Generation(AtomicU64);

impl Generation {
    pub(super) fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub(super) fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A bounded map of reads, each valid for the generation it was read at.
#[derive(Debug)]
pub(super) struct ReadCache<K, V> {
    entries: Mutex<HashMap<K, (u64, V)>>,
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> ReadCache<K, V> {
    pub(super) fn new(capacity: usize) -> Self {
        Self { entries: Mutex::new(HashMap::new()), capacity }
    }

    pub(super) fn get(&self, generation: u64, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(key).filter(|(g, _)| *g == generation).map(|(_, v)| v.clone())
    }

    /// Keeps `value` as read at `generation`. A full cache starts over rather than tracking
    /// recency: misses cost one query, and the bound is what matters.
    pub(super) fn insert(&self, generation: u64, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(key, (generation, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_read_before_a_write_is_a_miss_after_it() {
        let generation = Generation::default();
        let cache = ReadCache::new(4);
        let g = generation.current();
        cache.insert(g, "k", 1);
        assert_eq!(cache.get(generation.current(), &"k"), Some(1));
        generation.bump();
        assert_eq!(cache.get(generation.current(), &"k"), None);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let cache = ReadCache::new(2);
        for k in 0..10 {
            cache.insert(0, k, k);
        }
        assert!(cache.entries.lock().unwrap().len() <= 2);
        assert_eq!(cache.get(0, &9), Some(9));
    }
}

//! Compiled templates, kept by content and compiled off the async workers.
//!
//! Loading a template compiles its variable patterns: bounded by core's limits, but still up to
//! milliseconds of CPU for a template at every cap. Push, list and request all load templates,
//! so they go through here: a compile runs on the blocking pool, at most [`COMPILE_PERMITS`] at
//! once, and its result is kept for the next caller. One tenant pushing costly templates can
//! then take those permits, but never the workers that answer everyone else.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use airlock_core::template::{Template, TemplateError};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Templates kept compiled; the least recently used is dropped first.
pub(crate) const CACHED_TEMPLATES: usize = 64;
/// Compiles running at once on the blocking pool.
pub(crate) const COMPILE_PERMITS: usize = 2;

/// Why a template could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The blocking task did not finish (the runtime is shutting down, or it panicked).
    #[error("compiling the template did not finish")]
    Interrupted,
}

/// A bounded map of compiled templates, keyed by the SHA-256 of the exact manifest and script.
#[derive(Debug)]
pub struct CompiledTemplates {
    cache: Mutex<Lru>,
    permits: Arc<Semaphore>,
}

impl Default for CompiledTemplates {
    fn default() -> Self {
        Self::new(CACHED_TEMPLATES)
    }
}

impl CompiledTemplates {
    pub fn new(capacity: usize) -> Self {
        Self { cache: Mutex::new(Lru::new(capacity)), permits: Arc::new(Semaphore::new(COMPILE_PERMITS)) }
    }

    /// The template made of `manifest_toml` and `script`, from the cache or compiled now.
    /// Refusals are not kept: over a limit, they are refused before any costly work.
    pub async fn load(&self, manifest_toml: &str, script: &str) -> Result<Arc<Template>, CompileError> {
        let key = key(manifest_toml, script);
        if let Some(t) = self.cached(&key) {
            return Ok(t);
        }
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| CompileError::Interrupted)?;
        // Another caller may have compiled it while this one waited for a permit.
        if let Some(t) = self.cached(&key) {
            return Ok(t);
        }
        let (manifest_toml, script) = (manifest_toml.to_owned(), script.to_owned());
        // The permit goes with the compile: a caller that stops waiting (a reset stream) must not
        // free it while the compile still runs on the blocking pool.
        let template = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            Template::new(&manifest_toml, &script)
        })
        .await
        .map_err(|_| CompileError::Interrupted)??;
        let template = Arc::new(template);
        self.lock().insert(key, template.clone());
        Ok(template)
    }

    /// How many templates are kept compiled.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Arc<Template>> {
        self.lock().get(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The map holds no invariant a panic could break halfway: keep using it.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Length-prefixed, so no split of the same bytes between manifest and script collides.
fn key(manifest_toml: &str, script: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((manifest_toml.len() as u64).to_be_bytes());
    h.update(manifest_toml.as_bytes());
    h.update(script.as_bytes());
    h.finalize().into()
}

/// Least recently used first in `order`; small enough that a linear scan is the cheap choice.
#[derive(Debug)]
struct Lru {
    capacity: usize,
    map: HashMap<[u8; 32], Arc<Template>>,
    order: VecDeque<[u8; 32]>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), map: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&mut self, key: &[u8; 32]) -> Option<Arc<Template>> {
        let t = self.map.get(key)?.clone();
        self.touch(key);
        Some(t)
    }

    fn insert(&mut self, key: [u8; 32], template: Arc<Template>) {
        if self.map.insert(key, template).is_some() {
            self.touch(&key);
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn touch(&mut self, key: &[u8; 32]) {
        if let Some(i) = self.order.iter().position(|k| k == key) {
            self.order.remove(i);
            self.order.push_back(*key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str) -> String {
        format!(
            "name = \"{name}\"\ndescription = \"d\"\nphase = \"operate\"\nbody = \"run.sh\"\n\
             [[variables]]\nname = \"service\"\npattern = \"[a-z]+\"\n"
        )
    }

    #[tokio::test]
    async fn a_template_is_compiled_once_and_the_least_recently_used_is_dropped() {
        let cache = CompiledTemplates::new(2);
        let a = cache.load(&manifest("a"), "echo a\n").await.unwrap();
        let again = cache.load(&manifest("a"), "echo a\n").await.unwrap();
        assert!(Arc::ptr_eq(&a, &again), "served from the cache");
        cache.load(&manifest("b"), "echo b\n").await.unwrap();
        cache.load(&manifest("a"), "echo a\n").await.unwrap(); // `b` is now the oldest
        cache.load(&manifest("c"), "echo c\n").await.unwrap();
        assert_eq!(cache.len(), 2);
        let a_after = cache.load(&manifest("a"), "echo a\n").await.unwrap();
        assert!(Arc::ptr_eq(&a, &a_after), "`a` was used recently and stayed");
    }

    #[tokio::test]
    async fn a_refused_template_is_not_kept_and_says_why() {
        let cache = CompiledTemplates::default();
        let err = cache.load(&manifest("a").replace("[a-z]+", r"\\w{100}"), "echo\n").await.unwrap_err();
        assert!(matches!(err, CompileError::Template(TemplateError::Limit(_))), "{err}");
        assert!(cache.is_empty());
    }

    #[test]
    fn the_key_tells_where_the_manifest_ends() {
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }
}

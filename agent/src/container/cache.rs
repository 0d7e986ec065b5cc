//! Runtime answers per container ID, so that a container's processes connecting again and
//! again cost one runtime call per [`TTL`], not one each.
//!
//! Bounded: at most [`MAX_ENTRIES`]; entries older than [`TTL`] are not used, and are
//! dropped when the cache is full. An entry is dropped at once when its container is seen
//! gone (its first process exited: a restart gives it a new one) or unknown to every
//! runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Known;

/// How long an answer is used. Labels and the image never change for a container ID; the
/// name can (`docker rename`), and is seen at most this late.
pub const TTL: Duration = Duration::from_secs(30);

/// Containers remembered at most.
pub const MAX_ENTRIES: usize = 4096;

/// The cache.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<String, (Arc<Known>, Instant)>>,
}

impl Cache {
    /// A fresh answer about `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<Arc<Known>> {
        let entries = self.entries.lock().ok()?;
        let (facts, at) = entries.get(id)?;
        (at.elapsed() < TTL).then(|| facts.clone())
    }

    /// Remembers an answer.
    pub fn insert(&self, facts: Arc<Known>) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, at)| at.elapsed() < TTL);
        }
        if entries.len() >= MAX_ENTRIES {
            // Still full of fresh answers (a flood of containers): start again; the cost
            // is one runtime call per container.
            entries.clear();
        }
        entries.insert(facts.facts.id.clone(), (facts, Instant::now()));
    }

    /// Forgets `id` (its container is gone, or restarted).
    pub fn remove(&self, id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(id);
        }
    }

    /// Entries held (fresh or not).
    pub fn held(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::container::cgroup::{ContainerRef, PathKind};
    use crate::container::docker_api::ContainerFacts;

    fn facts(id: &str) -> Arc<Known> {
        Arc::new(Known {
            facts: ContainerFacts {
                id: id.into(),
                name: "n".into(),
                image_id: "sha256:ab".into(),
                image: None,
                labels: Default::default(),
                running: true,
                init_pid: 1,
                runtime: "podman",
                namespace: None,
            },
            init: ContainerRef {
                id: id.into(),
                kind: PathKind::Podman,
                namespace: None,
                places: vec![format!("0::/libpod_parent/libpod-{id}")],
            },
        })
    }

    #[test]
    fn bounded_and_removable() {
        let c = Cache::default();
        c.insert(facts("a"));
        assert_eq!(c.get("a").unwrap().facts.id, "a");
        c.remove("a");
        assert!(c.get("a").is_none());
        for i in 0..MAX_ENTRIES + 10 {
            c.insert(facts(&i.to_string()));
        }
        assert!(c.held() <= MAX_ENTRIES);
        assert!(c.get(&(MAX_ENTRIES + 9).to_string()).is_some());
    }
}

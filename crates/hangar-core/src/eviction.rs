//! Which cached image layers to evict under a disk budget (seed 000: least recently used
//! first, never while a VM uses them).
//!
//! Layers form trees (each non-OS layer was built over a parent). Only leaves are evicted
//! (a layer whose children are all gone), so that no cached layer is left without the
//! layer it was built over; a layer in use by a VM, or pinned (the image of a promoted,
//! often requested service), is never evicted, and neither are its ancestors.

use std::collections::{BTreeMap, BTreeSet};

/// A cached layer as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub id: String,
    pub parent: Option<String>,
    pub size_bytes: u64,
    /// When a VM last started with it (or when it was built, if never used).
    pub last_used_ms: u64,
    /// A VM (running, paused, sleeping or archived) has it as a disk.
    pub in_use: bool,
    /// Part of a promoted service's image.
    pub pinned: bool,
}

/// The layers to evict, in order, so that the rest fits in `budget_bytes` (or as close as
/// the layers in use and pinned allow).
pub fn choose_evictions(layers: &[Cached], budget_bytes: u64) -> Vec<String> {
    let by_id: BTreeMap<&str, &Cached> = layers.iter().map(|l| (l.id.as_str(), l)).collect();
    // A layer kept for a VM or a pin keeps its ancestors.
    let mut protected: BTreeSet<&str> = BTreeSet::new();
    for layer in layers.iter().filter(|l| l.in_use || l.pinned) {
        let mut current = Some(layer);
        while let Some(l) = current {
            if !protected.insert(l.id.as_str()) {
                break;
            }
            current = l.parent.as_deref().and_then(|p| by_id.get(p).copied());
        }
    }
    let mut children: BTreeMap<&str, usize> = BTreeMap::new();
    for layer in layers {
        if let Some(parent) = layer.parent.as_deref()
            && by_id.contains_key(parent)
        {
            *children.entry(parent).or_default() += 1;
        }
    }
    let mut total: u64 = layers.iter().map(|l| l.size_bytes).sum();
    let mut evicted: Vec<String> = Vec::new();
    let mut gone: BTreeSet<&str> = BTreeSet::new();
    while total > budget_bytes {
        let victim = layers
            .iter()
            .filter(|l| !gone.contains(l.id.as_str()) && !protected.contains(l.id.as_str()))
            .filter(|l| children.get(l.id.as_str()).copied().unwrap_or(0) == 0)
            .min_by(|a, b| {
                a.last_used_ms
                    .cmp(&b.last_used_ms)
                    .then_with(|| a.id.cmp(&b.id))
            });
        let Some(victim) = victim else {
            break;
        };
        gone.insert(victim.id.as_str());
        total -= victim.size_bytes;
        if let Some(parent) = victim.parent.as_deref()
            && let Some(count) = children.get_mut(parent)
        {
            *count -= 1;
        }
        evicted.push(victim.id.clone());
    }
    evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(id: &str, parent: Option<&str>, size: u64, used: u64) -> Cached {
        Cached {
            id: id.into(),
            parent: parent.map(str::to_owned),
            size_bytes: size,
            last_used_ms: used,
            in_use: false,
            pinned: false,
        }
    }

    #[test]
    fn evicts_least_recently_used_leaves_until_it_fits() {
        let layers = [
            layer("os", None, 60, 10),
            layer("redis", Some("os"), 10, 5),
            layer("nginx", Some("os"), 5, 30),
            layer("pg", Some("os"), 40, 20),
        ];
        assert!(choose_evictions(&layers, 200).is_empty());
        // 115 bytes, budget 106: the oldest leaf (redis) goes first, which is enough.
        assert_eq!(choose_evictions(&layers, 106), ["redis"]);
        // Budget 65: redis, then pg (older than nginx).
        assert_eq!(choose_evictions(&layers, 65), ["redis", "pg"]);
        // Budget 0: every leaf, then the OS layer once it has no children.
        assert_eq!(choose_evictions(&layers, 0), ["redis", "pg", "nginx", "os"]);
    }

    #[test]
    fn never_evicts_what_a_vm_uses_or_its_ancestors() {
        let mut layers = vec![
            layer("os", None, 60, 1),
            layer("redis", Some("os"), 10, 2),
            layer("app", Some("redis"), 1, 3),
            layer("nginx", Some("os"), 5, 50),
        ];
        layers[2].in_use = true;
        assert_eq!(choose_evictions(&layers, 0), ["nginx"]);
        layers[2].in_use = false;
        layers[3].pinned = true;
        assert_eq!(choose_evictions(&layers, 0), ["app", "redis"]);
    }
}

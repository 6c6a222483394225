//! The seen-action index: how a redelivered action is recognised and never
//! opens a second approval.
//!
//! Every action the route stage handles leaves a record keyed by its
//! `action_id` in the compacted `switchboard.pending` changelog. The index is
//! the set of those keys, rebuilt from the changelog at start (so it
//! survives restarts) and kept current by tailing it (so it learns what other
//! instances routed). An action is added only once the transaction or
//! delivery that routed it is durable, so an aborted batch is routed again.

use dashmap::DashSet;

/// Ids come from agents, so the hasher is seeded at random; foldhash
/// rather than SipHash, which was 2 to 3% of the route stage's time.
#[derive(Debug, Default)]
pub struct SeenIndex {
    ids: DashSet<String, foldhash::fast::RandomState>,
}

impl SeenIndex {
    pub fn contains(&self, action_id: &str) -> bool {
        self.ids.contains(action_id)
    }

    pub fn insert(&self, action_id: String) {
        self.ids.insert(action_id);
    }

    /// Marks an id read back from the changelog. Most are this instance's
    /// own, marked already when their batch became durable: those cost a
    /// read, not an allocation and a write lock the routing thread waits on.
    pub fn note(&self, action_id: &str) {
        if !self.ids.contains(action_id) {
            self.ids.insert(action_id.to_string());
        }
    }

    pub fn remove(&self, action_id: &str) {
        self.ids.remove(action_id);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_noted_inserted_and_removed() {
        let seen = SeenIndex::default();
        seen.insert("a-1".to_string());
        seen.note("a-1");
        seen.note("a-2");
        assert_eq!(seen.len(), 2);
        assert!(seen.contains("a-1") && seen.contains("a-2"));
        seen.remove("a-1");
        assert!(!seen.contains("a-1") && seen.contains("a-2"));
    }
}

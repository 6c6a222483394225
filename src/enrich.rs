//! Enrich: join an action with the reference tables the matrix declares.
//!
//! A matrix may declare `directory` tables (for example `accounts`, keyed by
//! `target.account_id`), fed from compacted `directory.<table>` topics. The
//! join is a pure lookup here; keeping the tables current is the route
//! stage's job. What a join finds is matched by rules, carried in packets,
//! and used to resolve escalation assignees such as the account's lead.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;

use crate::action::AgentAction;
use crate::matrix::Matrix;

/// One record of a directory table: field name → value.
pub type Record = BTreeMap<String, String>;

/// What enrichment added to one action: table name → the matching record,
/// shared with the directory rather than copied for every action.
pub type Enrichment = BTreeMap<String, Arc<Record>>;

/// Keys come from agents (an action's account id), so the hasher is seeded
/// at random; foldhash rather than SipHash, which hashed each lookup's two
/// keys in about as many instructions as the rest of the join.
type Hasher = foldhash::fast::RandomState;

/// The current contents of every directory table: table → key → record.
/// Shared between the table readers that keep it current and the workers
/// that read it, without a global lock.
#[derive(Debug, Default)]
pub struct Directory {
    tables: DashMap<String, DashMap<String, Arc<Record>, Hasher>, Hasher>,
}

impl Directory {
    /// Inserts or replaces a record (a compacted topic's latest value).
    pub fn upsert(&self, table: &str, key: &str, record: Record) {
        self.tables
            .entry(table.to_string())
            .or_default()
            .insert(key.to_string(), Arc::new(record));
    }

    /// Removes a record (a tombstone on the compacted topic).
    pub fn remove(&self, table: &str, key: &str) {
        if let Some(t) = self.tables.get(table) {
            t.remove(key);
        }
    }

    /// One record, shared.
    pub fn get(&self, table: &str, key: &str) -> Option<Arc<Record>> {
        Some(self.tables.get(table)?.get(key)?.clone())
    }

    pub fn len(&self) -> usize {
        self.tables.iter().map(|t| t.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one directory-topic record: a JSON object whose values become
    /// the record's fields (non-string values as their JSON text), or a
    /// tombstone. Returns false for a value that is not a JSON object.
    pub fn apply(&self, table: &str, key: &[u8], value: Option<&[u8]>) -> bool {
        let Ok(key) = std::str::from_utf8(key) else {
            return false;
        };
        let Some(value) = value else {
            self.remove(table, key);
            return true;
        };
        match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(value) {
            Ok(object) => {
                let record = object
                    .into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect();
                self.upsert(table, key, record);
                true
            }
            Err(_) => false,
        }
    }
}

/// Looks the action up in every table the matrix declares. A table whose key
/// field is absent from the action, or that has no record for it, adds
/// nothing: rules on its fields then see them as absent.
pub fn enrich(matrix: &Matrix, action: &AgentAction, directory: &Directory) -> Enrichment {
    let empty = Enrichment::new();
    let mut out = Enrichment::new();
    for table in &matrix.directory {
        let key = match table.key.get(action, &empty) {
            crate::matrix::Val::Text(k) => k,
            _ => continue,
        };
        if let Some(record) = directory.get(&table.name, key) {
            out.insert(table.name.clone(), record);
        }
    }
    out
}

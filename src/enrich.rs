//! Enrich: join an action with the reference tables the matrix declares.
//!
//! A matrix may declare `directory` tables (for example `accounts`, keyed by
//! `target.account_id`), fed from compacted `directory.<table>` topics. The
//! join is a pure lookup here; keeping the tables current is the route
//! stage's job. What a join finds is matched by rules, carried in packets,
//! and used to resolve escalation assignees such as the account's lead.

use std::collections::{BTreeMap, HashMap};

use crate::action::AgentAction;
use crate::matrix::Matrix;

/// One record of a directory table: field name → value.
pub type Record = BTreeMap<String, String>;

/// What enrichment added to one action: table name → the matching record.
pub type Enrichment = BTreeMap<String, Record>;

/// The current contents of every directory table: table → key → record.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    tables: HashMap<String, HashMap<String, Record>>,
}

impl Directory {
    /// Inserts or replaces a record (a compacted topic's latest value).
    pub fn upsert(&mut self, table: &str, key: &str, record: Record) {
        self.tables
            .entry(table.to_string())
            .or_default()
            .insert(key.to_string(), record);
    }

    /// Removes a record (a tombstone on the compacted topic).
    pub fn remove(&mut self, table: &str, key: &str) {
        if let Some(t) = self.tables.get_mut(table) {
            t.remove(key);
        }
    }

    pub fn get(&self, table: &str, key: &str) -> Option<&Record> {
        self.tables.get(table)?.get(key)
    }

    pub fn len(&self) -> usize {
        self.tables.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            out.insert(table.name.clone(), record.clone());
        }
    }
    out
}

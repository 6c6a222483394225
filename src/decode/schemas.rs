//! Where Avro writer schemas come from, by Confluent schema id.
//!
//! [`SchemaSource`] is the one seam: today a folder with an id map
//! (`schemas/ids.json`), bundled into the binary by default; a Confluent
//! Schema Registry client can implement the same trait later without the
//! decoder changing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use apache_avro::Schema;

/// Why a schema id could not be resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown schema id")]
    Unknown,
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("invalid schema {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Resolves a Confluent schema id to a parsed Avro schema.
pub trait SchemaSource: Send + Sync {
    fn schema(&self, id: u32) -> Result<Arc<Schema>, SchemaError>;
}

/// Schemas from a folder: `ids.json` maps ids to `.avsc` files beside it.
#[derive(Debug, Clone)]
pub struct SchemaDir {
    by_id: HashMap<u32, Arc<Schema>>,
}

/// The repository's `schemas/` folder, compiled in so the binary needs no
/// files to decode the standard Avro events.
const BUNDLED_IDS: &str = include_str!("../../schemas/ids.json");
const BUNDLED: &[(&str, &str)] = &[
    (
        "agent_action.avsc",
        include_str!("../../schemas/agent_action.avsc"),
    ),
    ("decision.avsc", include_str!("../../schemas/decision.avsc")),
];

/// The schema id the bundled `ids.json` gives the AgentAction schema.
pub const AGENT_ACTION_SCHEMA_ID: u32 = 1;

impl SchemaDir {
    /// The bundled schemas. They are checked by the test suite, so failing
    /// to parse them here would be a build defect, not an input problem.
    pub fn bundled() -> Self {
        Self::from_ids(BUNDLED_IDS, "schemas/ids.json", |file| {
            BUNDLED
                .iter()
                .find(|(name, _)| *name == file)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| SchemaError::Read {
                    path: file.to_string(),
                    message: "not bundled".into(),
                })
        })
        .expect("bundled schemas are valid: checked by tests/decode.rs")
    }

    /// Loads `dir/ids.json` and the schemas it names.
    pub fn load(dir: &Path) -> Result<Self, SchemaError> {
        let ids_path = dir.join("ids.json");
        let ids = std::fs::read_to_string(&ids_path).map_err(|e| SchemaError::Read {
            path: ids_path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_ids(&ids, &ids_path.display().to_string(), |file| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|e| SchemaError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        })
    }

    fn from_ids(
        ids: &str,
        ids_path: &str,
        read: impl Fn(&str) -> Result<String, SchemaError>,
    ) -> Result<Self, SchemaError> {
        let map: HashMap<String, String> = serde_json::from_str(ids).map_err(|e| SchemaError::Invalid {
            path: ids_path.to_string(),
            message: e.to_string(),
        })?;
        let mut by_id = HashMap::new();
        for (id, file) in map {
            let id: u32 = id.parse().map_err(|_| SchemaError::Invalid {
                path: ids_path.to_string(),
                message: format!("{id:?} is not a schema id"),
            })?;
            let text = read(&file)?;
            let schema = Schema::parse_str(&text).map_err(|e| SchemaError::Invalid {
                path: file.clone(),
                message: e.to_string(),
            })?;
            by_id.insert(id, Arc::new(schema));
        }
        Ok(SchemaDir { by_id })
    }
}

impl SchemaSource for SchemaDir {
    fn schema(&self, id: u32) -> Result<Arc<Schema>, SchemaError> {
        self.by_id.get(&id).cloned().ok_or(SchemaError::Unknown)
    }
}

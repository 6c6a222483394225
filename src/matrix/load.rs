//! Loading: YAML text → a fully validated [`Matrix`], or the first problem
//! with its `file:line:column`.
//!
//! Everything that can be checked before runtime is checked here (unknown
//! keys, unknown lanes and fields, bad patterns, unparsable amounts, duplicate
//! names, looping escalation chains), so that a matrix that loads can only
//! route. Defaults are resolved here too: a step without its own SLA gets its
//! lane's, and `then: <lane>` is flattened into the chain.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::cases::TestCase;
use super::condition::{Cmp, Condition, Matcher, Pattern};
use super::field::{Field, FieldType};
use super::yaml::{self, Node, Pos, Value};
use super::{
    ContextItem, ContextSource, DEFAULT_REMIND, DirectoryTable, Lane, LaneId, Matrix, Percent, Rule, Step,
};

/// Why a matrix was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatrixError {
    #[error("{file}: {message}")]
    Read { file: String, message: String },
    #[error("{file}:{line}:{col}: {message}")]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
}

type Result<T> = std::result::Result<T, MatrixError>;

pub(super) fn load_file(path: &Path) -> Result<Matrix> {
    let text = std::fs::read_to_string(path).map_err(|e| MatrixError::Read {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    load_str(&text, &path.display().to_string())
}

pub(super) fn load_str(text: &str, source: &str) -> Result<Matrix> {
    let loader = Loader { file: source };
    let root = yaml::parse(text).map_err(|e| loader.err(e.pos, e.message))?;
    loader.matrix(&root)
}

struct Loader<'f> {
    file: &'f str,
}

/// A mapping's entries, with unknown and duplicate keys already refused.
struct Entries<'n> {
    items: Vec<(&'n str, &'n Node)>,
}

impl<'n> Entries<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.items.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// A lane as written, before chains are flattened.
struct LaneSpec<'n> {
    lane: Lane,
    steps: Vec<(&'n Node, Step)>,
    then: Option<(&'n Node, LaneId)>,
}

const TOP_KEYS: &[&str] = &["description", "directory", "lanes", "rules", "tests"];
const LANE_KEYS: &[&str] = &[
    "description",
    "topic",
    "sla",
    "owner",
    "roster",
    "context",
    "optional_context",
    "escalation",
    "then",
    "remind",
];
const STEP_KEYS: &[&str] = &[
    "description",
    "lane",
    "assignee",
    "from",
    "roster",
    "sla",
    "remind",
];
const RULE_KEYS: &[&str] = &["name", "description", "lane", "when", "only_when_no_other_lane"];
const TABLE_KEYS: &[&str] = &["description", "topic", "key"];
const TEST_KEYS: &[&str] = &[
    "name",
    "description",
    "event",
    "enrichment",
    "lanes",
    "rules",
    "missing_context",
];

impl<'f> Loader<'f> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> MatrixError {
        MatrixError::Invalid {
            file: self.file.to_string(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
        }
    }

    fn matrix(&self, root: &Node) -> Result<Matrix> {
        let top = self.map(root, "the matrix", TOP_KEYS)?;
        let directory = match top.get("directory") {
            Some(node) => self.directory(node)?,
            None => Vec::new(),
        };
        let tables: HashSet<&str> = directory.iter().map(|t| t.name.as_str()).collect();
        let lanes_node = top
            .get("lanes")
            .ok_or_else(|| self.err(root.pos, "the matrix needs `lanes`"))?;
        let lanes = self.lanes(lanes_node, &tables)?;
        let rules_node = top
            .get("rules")
            .ok_or_else(|| self.err(root.pos, "the matrix needs `rules`"))?;
        let rules = self.rules(rules_node, &lanes, &tables)?;
        let tests = match top.get("tests") {
            Some(node) => self.tests(node, &lanes, &rules, &tables)?,
            None => Vec::new(),
        };
        Ok(Matrix {
            version: version(root),
            source: self.file.to_string(),
            lanes,
            rules,
            directory,
            tests,
        })
    }

    // ---- lanes and chains ----

    fn lanes(&self, node: &Node, tables: &HashSet<&str>) -> Result<Vec<Lane>> {
        let entries = self.map(node, "`lanes`", &[])?;
        if entries.items.is_empty() {
            return Err(self.err(node.pos, "`lanes` must name at least one lane"));
        }
        let names: Vec<&str> = entries.items.iter().map(|(k, _)| *k).collect();
        for ((name, _), key) in entries.items.iter().zip(self.keys(node)) {
            if !is_name(name) {
                return Err(self.err(
                    key.pos,
                    format!("lane name {name:?} must be lowercase letters, digits, '-' or '_'"),
                ));
            }
        }
        let mut specs = Vec::new();
        for (name, spec) in &entries.items {
            specs.push(self.lane(name, spec, &names, tables)?);
        }
        let mut topics: BTreeMap<&str, &str> = BTreeMap::new();
        for ((name, spec_node), spec) in entries.items.iter().zip(&specs) {
            if let Some(other) = topics.insert(&spec.lane.topic, name) {
                return Err(self.err(
                    spec_node.pos,
                    format!(
                        "lanes {other:?} and {name:?} both use topic {:?}",
                        spec.lane.topic
                    ),
                ));
            }
        }
        let mut lanes = Vec::new();
        for id in 0..specs.len() {
            let mut lane = specs[id].lane.clone();
            lane.escalation = self.chain(id, &specs, &mut vec![id])?;
            lanes.push(lane);
        }
        Ok(lanes)
    }

    fn lane<'n>(
        &self,
        name: &str,
        node: &'n Node,
        names: &[&str],
        tables: &HashSet<&str>,
    ) -> Result<LaneSpec<'n>> {
        let what = format!("lane {name:?}");
        let e = self.map(node, &what, LANE_KEYS)?;
        let topic = match e.get("topic") {
            Some(t) => self.topic(t)?,
            None => format!("approvals.{name}"),
        };
        let sla = self.duration(self.require(&e, node, "sla", &what)?)?;
        let owner = self
            .string(self.require(&e, node, "owner", &what)?, "`owner`")?
            .to_string();
        let roster = self.roster(self.require(&e, node, "roster", &what)?)?;
        let remind = match e.get("remind") {
            Some(r) => self.remind(r)?,
            None => Some(DEFAULT_REMIND),
        };
        let context = match e.get("context") {
            Some(c) => self.context(c, tables)?,
            None => Vec::new(),
        };
        let optional_context = match e.get("optional_context") {
            Some(c) => self.context(c, tables)?,
            None => Vec::new(),
        };
        let lane_id = |n: &Node| -> Result<LaneId> {
            let target = self.string(n, "a lane")?;
            names.iter().position(|l| *l == target).ok_or_else(|| {
                self.err(
                    n.pos,
                    format!("unknown lane {target:?} (lanes: {})", names.join(", ")),
                )
            })
        };
        let own_id = names.iter().position(|l| *l == name).unwrap_or_default();
        let mut steps = Vec::new();
        if let Some(list) = e.get("escalation") {
            for step_node in self.seq(list, "`escalation`")? {
                let s = self.map(step_node, "an escalation step", STEP_KEYS)?;
                let lane = match s.get("lane") {
                    Some(l) => lane_id(l)?,
                    None => own_id,
                };
                let assignee = match s.get("assignee") {
                    Some(a) => Some(self.string(a, "`assignee`")?.to_string()),
                    None => None,
                };
                let from = match s.get("from") {
                    Some(f) => match self.field(f, tables)? {
                        field @ Field::Enrichment { .. } => Some(field),
                        _ => {
                            return Err(self.err(
                                f.pos,
                                "`from` names a directory field, written enrichment.<table>.<field>",
                            ));
                        }
                    },
                    None => None,
                };
                let roster = match s.get("roster") {
                    Some(r) => Some(self.roster(r)?),
                    None => None,
                };
                let sla = match s.get("sla") {
                    Some(d) => self.duration(d)?,
                    None => sla,
                };
                let remind = match s.get("remind") {
                    Some(r) => self.remind(r)?,
                    None => remind,
                };
                if assignee.is_none() && s.get("lane").is_none() {
                    return Err(self.err(
                        step_node.pos,
                        "an escalation step needs an `assignee` or a `lane`",
                    ));
                }
                // Defaults from the step's lane are filled in once all lanes are read.
                steps.push((
                    step_node,
                    Step {
                        lane,
                        assignee: assignee.unwrap_or_default(),
                        from,
                        roster: roster.unwrap_or_default(),
                        sla,
                        remind,
                    },
                ));
            }
        }
        let then = match e.get("then") {
            Some(t) => Some((t, lane_id(t)?)),
            None => None,
        };
        Ok(LaneSpec {
            lane: Lane {
                name: name.to_string(),
                topic,
                sla,
                owner,
                roster,
                remind,
                context,
                optional_context,
                escalation: Vec::new(),
            },
            steps,
            then,
        })
    }

    /// The flattened chain of lane `id`: its steps with defaults from their
    /// target lanes, then (for `then: X`) X's owner and X's own chain.
    fn chain(&self, id: LaneId, specs: &[LaneSpec<'_>], visiting: &mut Vec<LaneId>) -> Result<Vec<Step>> {
        let spec = &specs[id];
        let mut chain = Vec::new();
        // Level 0 is the lane's owner: no step may ask that person again.
        let mut seen = HashSet::from([(id, spec.lane.owner.clone())]);
        for (node, step) in &spec.steps {
            let target = &specs[step.lane].lane;
            let mut step = step.clone();
            if step.assignee.is_empty() {
                step.assignee = target.owner.clone();
            }
            if step.roster.is_empty() {
                step.roster = target.roster.clone();
            }
            if !seen.insert((step.lane, step.assignee.clone())) {
                return Err(self.err(
                    node.pos,
                    format!(
                        "escalation chain of {:?} asks {:?} on lane {:?} twice: chains must not loop",
                        spec.lane.name, step.assignee, target.name
                    ),
                ));
            }
            chain.push(step);
        }
        if let Some((node, next)) = spec.then {
            if visiting.contains(&next) {
                let mut path: Vec<&str> = visiting.iter().map(|l| specs[*l].lane.name.as_str()).collect();
                path.push(&specs[next].lane.name);
                return Err(self.err(node.pos, format!("escalation chain loops: {}", path.join(" → "))));
            }
            let target = &specs[next].lane;
            chain.push(Step {
                lane: next,
                assignee: target.owner.clone(),
                from: None,
                roster: target.roster.clone(),
                sla: target.sla,
                remind: target.remind,
            });
            visiting.push(next);
            chain.extend(self.chain(next, specs, visiting)?);
            visiting.pop();
            for step in &chain[spec.steps.len()..] {
                if !seen.insert((step.lane, step.assignee.clone())) {
                    return Err(self.err(
                        node.pos,
                        format!(
                            "escalation chain of {:?} asks {:?} on lane {:?} twice through `then`: chains must not loop",
                            spec.lane.name, step.assignee, specs[step.lane].lane.name
                        ),
                    ));
                }
            }
        }
        Ok(chain)
    }

    fn context(&self, node: &Node, tables: &HashSet<&str>) -> Result<Vec<ContextItem>> {
        let entries = self.map(node, "`context`", &[])?;
        let mut items = Vec::new();
        for (name, source) in entries.items {
            let source = match &source.value {
                Value::Map(_) => {
                    let v = self.map(source, "a fixed context value", &["value"])?;
                    let value = v.get("value").ok_or_else(|| {
                        self.err(source.pos, "a fixed context value is written {value: ...}")
                    })?;
                    ContextSource::Value(self.string(value, "`value`")?.to_string())
                }
                Value::Seq(paths) => {
                    if paths.is_empty() {
                        return Err(self.err(source.pos, format!("context {name:?} lists no fields")));
                    }
                    ContextSource::Fields(
                        paths
                            .iter()
                            .map(|p| self.field(p, tables))
                            .collect::<Result<_>>()?,
                    )
                }
                Value::Scalar { .. } => ContextSource::Fields(vec![self.field(source, tables)?]),
            };
            items.push(ContextItem {
                name: name.to_string(),
                source,
            });
        }
        Ok(items)
    }

    // ---- directory ----

    fn directory(&self, node: &Node) -> Result<Vec<DirectoryTable>> {
        let entries = self.map(node, "`directory`", &[])?;
        let mut tables = Vec::new();
        for (name, spec) in entries.items {
            if !is_name(name) {
                return Err(self.err(
                    spec.pos,
                    format!("table name {name:?} must be lowercase letters, digits, '-' or '_'"),
                ));
            }
            let e = self.map(spec, &format!("table {name:?}"), TABLE_KEYS)?;
            let key_node = self.require(&e, spec, "key", &format!("table {name:?}"))?;
            let key = self.field(key_node, &HashSet::new())?;
            if !matches!(key, Field::Builtin(_) | Field::Attribute(_)) || key.field_type() != FieldType::Text
            {
                return Err(self.err(key_node.pos, "a table's key must be a text field of the action"));
            }
            let topic = match e.get("topic") {
                Some(t) => self.topic(t)?,
                None => format!("directory.{name}"),
            };
            tables.push(DirectoryTable {
                name: name.to_string(),
                topic,
                key,
            });
        }
        Ok(tables)
    }

    // ---- rules and conditions ----

    fn rules(&self, node: &Node, lanes: &[Lane], tables: &HashSet<&str>) -> Result<Vec<Rule>> {
        let mut rules: Vec<Rule> = Vec::new();
        for rule_node in self.seq(node, "`rules`")? {
            let e = self.map(rule_node, "a rule", RULE_KEYS)?;
            let name_node = self.require(&e, rule_node, "name", "a rule")?;
            let name = self.string(name_node, "a rule name")?;
            if !is_name(name) {
                return Err(self.err(
                    name_node.pos,
                    format!("rule name {name:?} must be lowercase letters, digits, '-' or '_'"),
                ));
            }
            if let Some(first) = rules.iter().find(|r| r.name == name) {
                return Err(self.err(
                    name_node.pos,
                    format!("duplicate rule name {name:?} (first at line {})", first.pos.line),
                ));
            }
            let what = format!("rule {name:?}");
            let lane_node = self.require(&e, rule_node, "lane", &what)?;
            let lane_name = self.string(lane_node, "a lane")?;
            let lane = lanes.iter().position(|l| l.name == lane_name).ok_or_else(|| {
                let known: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
                self.err(
                    lane_node.pos,
                    format!("unknown lane {lane_name:?} (lanes: {})", known.join(", ")),
                )
            })?;
            let when = self.condition(self.require(&e, rule_node, "when", &what)?, tables)?;
            let only_when_no_other_lane = match e.get("only_when_no_other_lane") {
                Some(b) => b
                    .boolean()
                    .ok_or_else(|| self.err(b.pos, "`only_when_no_other_lane` is true or false"))?,
                None => false,
            };
            rules.push(Rule {
                name: name.to_string(),
                lane,
                when,
                only_when_no_other_lane,
                pos: rule_node.pos,
            });
        }
        if rules.is_empty() {
            return Err(self.err(node.pos, "`rules` must hold at least one rule"));
        }
        Ok(rules)
    }

    /// A mapping of tests, all of which must hold. Keys are field paths or
    /// the combinators `any` (a list), `all` (a list) and `not` (a mapping).
    fn condition(&self, node: &Node, tables: &HashSet<&str>) -> Result<Condition> {
        let Value::Map(entries) = &node.value else {
            return Err(self.err(
                node.pos,
                format!("a condition is a mapping of tests, found {}", node.kind_name()),
            ));
        };
        if entries.is_empty() {
            return Err(self.err(node.pos, "a condition needs at least one test"));
        }
        self.map(node, "a condition", &[])?; // refuses duplicate keys
        let mut all = Vec::new();
        for (key, value) in entries {
            let name = self.string(key, "a condition key")?;
            let cond = match name {
                "any" | "all" => {
                    let items = self.seq(value, &format!("`{name}`"))?;
                    if items.is_empty() {
                        return Err(self.err(value.pos, format!("`{name}` needs at least one condition")));
                    }
                    let cs = items
                        .iter()
                        .map(|c| self.condition(c, tables))
                        .collect::<Result<_>>()?;
                    if name == "any" {
                        Condition::Any(cs)
                    } else {
                        Condition::All(cs)
                    }
                }
                "not" => Condition::Not(Box::new(self.condition(value, tables)?)),
                _ => {
                    let field = self.field(key, tables)?;
                    let matcher = self.matcher(&field, value)?;
                    Condition::Test(field, matcher)
                }
            };
            all.push(cond);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Condition::All(all)
        })
    }

    fn matcher(&self, field: &Field, node: &Node) -> Result<Matcher> {
        let path = field.path();
        let ty = field.field_type();
        if let Value::Map(entries) = &node.value {
            self.map(node, "a test", &[])?;
            if let Some((k, v)) = entries.iter().find(|(k, _)| k.scalar() == Some("present")) {
                if entries.len() > 1 {
                    return Err(self.err(k.pos, "`present` stands alone in its test"));
                }
                let want = v
                    .boolean()
                    .ok_or_else(|| self.err(v.pos, "`present` is true or false"))?;
                return Ok(Matcher::Present(want));
            }
            if !matches!(ty, FieldType::Decimal | FieldType::Count) {
                return Err(self.err(
                    node.pos,
                    format!("{path} is not a number: test it with values or `present`"),
                ));
            }
            let mut cmps = Vec::new();
            for (k, v) in entries {
                let op = k.scalar().and_then(Cmp::parse).ok_or_else(|| {
                    self.err(
                        k.pos,
                        format!(
                            "unknown comparison {:?} (use present, {})",
                            k.scalar().unwrap_or(""),
                            Cmp::NAMES.join(", ")
                        ),
                    )
                })?;
                cmps.push((op, self.decimal(v)?));
            }
            return Ok(Matcher::Compare(cmps));
        }
        match ty {
            FieldType::Bool => node
                .boolean()
                .map(Matcher::Is)
                .ok_or_else(|| self.err(node.pos, format!("{path} is true or false"))),
            FieldType::Decimal | FieldType::Count => Err(self.err(
                node.pos,
                format!("{path} is a number: compare it with {}", Cmp::NAMES.join(", ")),
            )),
            FieldType::Time => Err(self.err(node.pos, format!("{path} is a time: test it with `present`"))),
            FieldType::Enum(names) => {
                let values = self.strings(node, &path)?;
                let mut patterns = Vec::new();
                for (text, pos) in values {
                    if !names.contains(&text.as_str()) {
                        return Err(self.err(
                            pos,
                            format!("{path}: {text:?} is not one of {}", names.join(", ")),
                        ));
                    }
                    patterns.push(Pattern::Exact(text));
                }
                Ok(Matcher::OneOf(patterns))
            }
            FieldType::Text | FieldType::List => {
                let values = self.strings(node, &path)?;
                values
                    .into_iter()
                    .map(|(text, pos)| self.pattern(&text, pos))
                    .collect::<Result<_>>()
                    .map(Matcher::OneOf)
            }
        }
    }

    fn pattern(&self, text: &str, pos: Pos) -> Result<Pattern> {
        if !text.contains('*') {
            return Ok(Pattern::Exact(text.to_string()));
        }
        match text.strip_suffix(".*") {
            Some(prefix) if !prefix.is_empty() && !prefix.contains('*') => {
                Ok(Pattern::Prefix(format!("{prefix}.")))
            }
            _ => Err(self.err(
                pos,
                format!("bad pattern {text:?}: a wildcard is only allowed as a final `.*`, as in \"data.*\""),
            )),
        }
    }

    // ---- tests ----

    fn tests(
        &self,
        node: &Node,
        lanes: &[Lane],
        rules: &[Rule],
        tables: &HashSet<&str>,
    ) -> Result<Vec<TestCase>> {
        let lane_known = |name: &str| lanes.iter().any(|l| l.name == name);
        let mut cases: Vec<TestCase> = Vec::new();
        for (index, case) in self.seq(node, "`tests`")?.iter().enumerate() {
            let e = self.map(case, "a test case", TEST_KEYS)?;
            let name = self
                .string(self.require(&e, case, "name", "a test case")?, "a test name")?
                .to_string();
            if cases.iter().any(|c| c.name == name) {
                return Err(self.err(case.pos, format!("duplicate test name {name:?}")));
            }
            let what = format!("test {name:?}");
            let event = self.require(&e, case, "event", &what)?;
            let event_json = self.test_event(event, index, &name)?;
            let mut enrichment = BTreeMap::new();
            if let Some(en) = e.get("enrichment") {
                for (table, record) in self.map(en, "`enrichment`", &[])?.items {
                    if !tables.contains(table) {
                        return Err(self.err(en.pos, format!("unknown directory table {table:?}")));
                    }
                    let mut fields = BTreeMap::new();
                    for (k, v) in self.map(record, "a record", &[])?.items {
                        fields.insert(k.to_string(), self.string(v, "a record value")?.to_string());
                    }
                    enrichment.insert(table.to_string(), std::sync::Arc::new(fields));
                }
            }
            let expect = self.require(&e, case, "lanes", &what)?;
            let mut expected_lanes = Vec::new();
            for (lane, pos) in self.strings_or_empty(expect)? {
                if !lane_known(&lane) {
                    return Err(self.err(pos, format!("unknown lane {lane:?}")));
                }
                expected_lanes.push(lane);
            }
            let expected_rules = match e.get("rules") {
                None => None,
                Some(r) => {
                    let mut names = Vec::new();
                    for (rule, pos) in self.strings_or_empty(r)? {
                        if !rules.iter().any(|x| x.name == rule) {
                            return Err(self.err(pos, format!("unknown rule {rule:?}")));
                        }
                        names.push(rule);
                    }
                    Some(names)
                }
            };
            let missing_context = match e.get("missing_context") {
                None => None,
                Some(m) => {
                    let mut by_lane = BTreeMap::new();
                    for (lane, fields) in self.map(m, "`missing_context`", &[])?.items {
                        if !lane_known(lane) {
                            return Err(self.err(m.pos, format!("unknown lane {lane:?}")));
                        }
                        let names = self
                            .strings_or_empty(fields)?
                            .into_iter()
                            .map(|(f, _)| f)
                            .collect();
                        by_lane.insert(lane.to_string(), names);
                    }
                    Some(by_lane)
                }
            };
            cases.push(TestCase {
                name,
                pos: case.pos,
                event_json,
                enrichment,
                lanes: expected_lanes,
                rules: expected_rules,
                missing_context,
            });
        }
        Ok(cases)
    }

    /// The test's event as JSON text, with the required fields a test does
    /// not care about filled in so cases stay short.
    fn test_event(&self, node: &Node, index: usize, name: &str) -> Result<String> {
        let Value::Map(entries) = &node.value else {
            return Err(self.err(
                node.pos,
                "a test's `event` is a mapping in the AgentAction's JSON form",
            ));
        };
        let has = |k: &str| entries.iter().any(|(key, _)| key.scalar() == Some(k));
        let mut fields: Vec<String> = Vec::new();
        for (k, v) in [
            (
                "action_id",
                serde_json::Value::from(format!("matrix-test-{}", index + 1)),
            ),
            ("occurred_at", "2026-01-01T00:00:00Z".into()),
            ("agent_id", "matrix-test".into()),
            ("summary", name.into()),
        ] {
            if !has(k) {
                fields.push(format!("{}:{v}", serde_json::Value::from(k)));
            }
        }
        for (k, v) in entries {
            let mut field = serde_json::Value::from(k.scalar().unwrap_or_default()).to_string();
            field.push(':');
            v.write_json(&mut field);
            fields.push(field);
        }
        Ok(format!("{{{}}}", fields.join(",")))
    }

    // ---- scalars and shapes ----

    fn map<'n>(&self, node: &'n Node, what: &str, allowed: &[&str]) -> Result<Entries<'n>> {
        let Value::Map(entries) = &node.value else {
            return Err(self.err(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind_name()),
            ));
        };
        let mut items: Vec<(&str, &Node)> = Vec::new();
        for (k, v) in entries {
            let key = k
                .scalar()
                .ok_or_else(|| self.err(k.pos, "mapping keys must be plain names"))?;
            if !allowed.is_empty() && !allowed.contains(&key) {
                return Err(self.err(
                    k.pos,
                    format!(
                        "unknown key {key:?} in {what} (expected one of: {})",
                        allowed.join(", ")
                    ),
                ));
            }
            if items.iter().any(|(seen, _)| *seen == key) {
                return Err(self.err(k.pos, format!("duplicate key {key:?} in {what}")));
            }
            items.push((key, v));
        }
        Ok(Entries { items })
    }

    fn keys<'n>(&self, node: &'n Node) -> Vec<&'n Node> {
        match &node.value {
            Value::Map(entries) => entries.iter().map(|(k, _)| k).collect(),
            _ => Vec::new(),
        }
    }

    fn require<'n>(&self, e: &Entries<'n>, node: &Node, key: &str, what: &str) -> Result<&'n Node> {
        e.get(key)
            .ok_or_else(|| self.err(node.pos, format!("{what} needs `{key}`")))
    }

    fn seq<'n>(&self, node: &'n Node, what: &str) -> Result<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Ok(items),
            _ => Err(self.err(
                node.pos,
                format!("{what} must be a list, found {}", node.kind_name()),
            )),
        }
    }

    fn string<'n>(&self, node: &'n Node, what: &str) -> Result<&'n str> {
        match node.scalar() {
            Some(s) if !node.is_null() && !s.trim().is_empty() => Ok(s),
            _ => Err(self.err(node.pos, format!("{what} must be a non-empty string"))),
        }
    }

    /// One string or a list of them, each with its position.
    fn strings(&self, node: &Node, what: &str) -> Result<Vec<(String, Pos)>> {
        let out = self.strings_or_empty(node)?;
        if out.is_empty() {
            return Err(self.err(node.pos, format!("{what}: give at least one value")));
        }
        Ok(out)
    }

    fn strings_or_empty(&self, node: &Node) -> Result<Vec<(String, Pos)>> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .map(|i| Ok((self.string(i, "a value")?.to_string(), i.pos)))
                .collect(),
            Value::Scalar { .. } => Ok(vec![(self.string(node, "a value")?.to_string(), node.pos)]),
            Value::Map(_) => Err(self.err(node.pos, "expected a value or a list of values, found a mapping")),
        }
    }

    fn roster(&self, node: &Node) -> Result<Vec<String>> {
        let people = self.strings_or_empty(node)?;
        if people.is_empty() {
            return Err(self.err(node.pos, "a roster must name at least one approver"));
        }
        Ok(people.into_iter().map(|(p, _)| p).collect())
    }

    fn field(&self, node: &Node, tables: &HashSet<&str>) -> Result<Field> {
        let path = self.string(node, "a field path")?;
        let field = Field::parse(path).map_err(|m| self.err(node.pos, m))?;
        if let Field::Enrichment { table, .. } = &field
            && !tables.contains(table.as_str())
        {
            return Err(self.err(
                node.pos,
                format!("{path}: no directory table {table:?} is declared under `directory`"),
            ));
        }
        Ok(field)
    }

    fn topic(&self, node: &Node) -> Result<String> {
        let t = self.string(node, "a topic")?;
        let valid = t.len() <= 249
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid || t == "." || t == ".." {
            return Err(self.err(node.pos, format!("{t:?} is not a valid Kafka topic name")));
        }
        Ok(t.to_string())
    }

    fn decimal(&self, node: &Node) -> Result<Decimal> {
        let text = self.string(node, "a number")?;
        let ok = text.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-');
        ok.then(|| Decimal::from_str_exact(text).ok())
            .flatten()
            .ok_or_else(|| self.err(node.pos, format!("{text:?} is not a decimal amount")))
    }

    /// `80%` (of a step's SLA) or `off`.
    fn remind(&self, node: &Node) -> Result<Option<Percent>> {
        let text = self.string(node, "a reminder")?;
        if text == "off" {
            return Ok(None);
        }
        text.strip_suffix('%')
            .and_then(|n| n.trim().parse::<u8>().ok())
            .and_then(Percent::new)
            .map(Some)
            .ok_or_else(|| {
                self.err(
                    node.pos,
                    format!("{text:?} is not a reminder: write a share of the SLA from 1% to 99%, or off"),
                )
            })
    }

    fn duration(&self, node: &Node) -> Result<Duration> {
        let text = self.string(node, "a duration")?;
        parse_duration(text).filter(|d| !d.is_zero()).ok_or_else(|| {
            self.err(
                node.pos,
                format!("{text:?} is not a duration like 90s, 15m, 2h or 1h30m"),
            )
        })
    }
}

/// `90s`, `15m`, `2h`, `1h30m`, `1d`, `500ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

fn is_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `sha256:` of the canonical JSON of everything but the test cases: the
/// version changes exactly when routing, packets or escalation could.
fn version(root: &Node) -> String {
    let mut canonical = root.canonical_json();
    if let Some(map) = canonical.as_object_mut() {
        map.remove("tests");
    }
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

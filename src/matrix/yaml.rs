//! A YAML tree that remembers where every node came from.
//!
//! The matrix is read by people, so every refusal points at `file:line:column`.
//! Serde-based YAML crates lose positions after parsing; this small tree keeps
//! them, and leaves typing to the loader, which knows what each key expects.
//! Aliases and tags are refused: a policy file should say everything plainly,
//! and aliases are the classic way to make a small file expand without bound.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A position in the matrix file, 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Span> for Pos {
    fn from(span: Span) -> Self {
        Pos {
            line: span.start.line(),
            col: span.start.col() + 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    /// A scalar's text; `plain` is false for quoted and block scalars, which
    /// are always strings (`"true"` is text, `true` may be a boolean).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A YAML syntax problem, or a construct the matrix refuses.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// How deep a matrix may nest mappings and lists. A policy needs a handful
/// of levels (conditions nest through `any`, `all` and `not`); the tree, its
/// canonical form, test events and even dropping it recurse once per level,
/// so a hostile file nested ten thousand deep would otherwise overflow the
/// stack of `switchboard check` or of a hot reload.
pub const MAX_DEPTH: usize = 64;

/// Parses exactly one YAML document.
pub fn parse(source: &str) -> Result<Node, SyntaxError> {
    let events = Parser::new_from_str(source).map(|r| {
        r.map_err(|e| SyntaxError {
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })
    });
    let mut root: Option<Node> = None;
    // Containers under construction: the node and, for maps, a pending key.
    let mut stack: Vec<(Node, Option<Node>)> = Vec::new();
    let mut documents = 0;

    for item in events {
        let (event, span) = item?;
        let pos = Pos::from(span);
        let node = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => continue,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        pos,
                        message: "the matrix must be a single YAML document".into(),
                    });
                }
                continue;
            }
            Event::Alias(_) => {
                return Err(SyntaxError {
                    pos,
                    message: "YAML aliases are not allowed in a matrix; write the value out".into(),
                });
            }
            Event::Scalar(text, style, _, tag) => {
                refuse_tag(tag.is_some(), pos)?;
                Node {
                    pos,
                    value: Value::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain,
                    },
                }
            }
            Event::SequenceStart(_, tag) => {
                refuse_tag(tag.is_some(), pos)?;
                refuse_depth(stack.len(), pos)?;
                stack.push((
                    Node {
                        pos,
                        value: Value::Seq(Vec::new()),
                    },
                    None,
                ));
                continue;
            }
            Event::MappingStart(_, tag) => {
                refuse_tag(tag.is_some(), pos)?;
                refuse_depth(stack.len(), pos)?;
                stack.push((
                    Node {
                        pos,
                        value: Value::Map(Vec::new()),
                    },
                    None,
                ));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some((node, _)) => node,
                None => {
                    return Err(SyntaxError {
                        pos,
                        message: "unbalanced YAML structure".into(),
                    });
                }
            },
        };
        match stack.last_mut() {
            None => root = Some(node),
            Some((parent, pending_key)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(key) => entries.push((key, node)),
                },
                Value::Scalar { .. } => unreachable!("only containers are pushed on the stack"),
            },
        }
    }
    root.ok_or(SyntaxError {
        pos: Pos { line: 1, col: 1 },
        message: "the matrix file is empty".into(),
    })
}

fn refuse_depth(open: usize, pos: Pos) -> Result<(), SyntaxError> {
    if open >= MAX_DEPTH {
        Err(SyntaxError {
            pos,
            message: format!("the matrix is nested deeper than {MAX_DEPTH} levels"),
        })
    } else {
        Ok(())
    }
}

fn refuse_tag(tagged: bool, pos: Pos) -> Result<(), SyntaxError> {
    if tagged {
        Err(SyntaxError {
            pos,
            message: "YAML tags are not allowed in a matrix".into(),
        })
    } else {
        Ok(())
    }
}

impl Node {
    /// The text of a scalar, whatever its style.
    pub fn scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// A plain `true`/`false`.
    pub fn boolean(&self) -> Option<bool> {
        match &self.value {
            Value::Scalar { text, plain: true } if text == "true" => Some(true),
            Value::Scalar { text, plain: true } if text == "false" => Some(false),
            _ => None,
        }
    }

    /// A plain `null`, `~` or empty value.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if text.is_empty() || text == "null" || text == "~")
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The node as canonical JSON for hashing the matrix: every scalar is its
    /// text, mapping keys are sorted, so formatting and comments never change
    /// the version but any change of meaning does.
    pub fn canonical_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Scalar { .. } if self.is_null() => J::Null,
            Value::Scalar { text, .. } => J::String(text.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::canonical_json).collect()),
            Value::Map(entries) => {
                let sorted: std::collections::BTreeMap<String, J> = entries
                    .iter()
                    .map(|(k, v)| (k.scalar().unwrap_or_default().to_string(), v.canonical_json()))
                    .collect();
                J::Object(sorted.into_iter().collect())
            }
        }
    }

    /// Writes the node as JSON text the way an agent would have written it:
    /// plain `true`/`false`/`null` and numbers are typed, and numbers are
    /// copied verbatim so `100.01` reaches the decoder exactly. Inline test
    /// events go through the real decoder this way.
    pub fn write_json(&self, out: &mut String) {
        match &self.value {
            Value::Scalar { text, plain: true }
                if self.is_null() || self.boolean().is_some() || looks_numeric(text) =>
            {
                out.push_str(if self.is_null() { "null" } else { text });
            }
            Value::Scalar { text, .. } => out.push_str(&serde_json::Value::String(text.clone()).to_string()),
            Value::Seq(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            Value::Map(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(
                        &serde_json::Value::String(k.scalar().unwrap_or_default().to_string()).to_string(),
                    );
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

/// A JSON number literal (what `write_json` may copy verbatim).
fn looks_numeric(text: &str) -> bool {
    serde_json::from_str::<serde_json::Number>(text).is_ok()
}

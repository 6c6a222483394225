//! librdkafka properties an operator passes through (TLS, SASL, timeouts):
//! from a Java-style properties file (`--kafka-config`) and `--kafka
//! KEY=VALUE` flags, with secrets referenced rather than written inline.
//!
//! * The file is read first, then the flags, so a flag overrides the file.
//! * Any value may hold `${env:NAME}` (an environment variable) or
//!   `${file:/path}` (a file's content, without its trailing newline), as
//!   often as it likes. They are resolved once, at start; a variable that is
//!   not set or a file that cannot be read is an error naming the property,
//!   never its value.
//! * Values are never logged: [`KafkaProperties`] and [`Property`] print the
//!   values of secret-looking keys ([`is_secret`]) as `***` in `Debug`, and
//!   no error here quotes a value.

use std::fmt;
use std::path::{Path, PathBuf};

/// What a value of a secret-looking key prints as.
pub const REDACTED: &str = "***";

/// Keys whose values are treated as secrets when printed: any key naming a
/// password, secret, key, token, credential or JAAS configuration
/// (`sasl.password`, `ssl.key.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.client.secret`, `sasl.jaas.config`, …).
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas", "credential"]
        .iter()
        .any(|word| key.contains(word))
}

/// Why the pass-through properties could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesError {
    #[error("Kafka properties file {}: {source}", path.display())]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("Kafka properties file {}:{line}: expected KEY=VALUE", path.display())]
    BadLine { path: PathBuf, line: usize },
    #[error("Kafka property {key}: environment variable {name} is not set")]
    MissingEnv { key: String, name: String },
    #[error("Kafka property {key}: environment variable {name} is not valid UTF-8")]
    NotUnicodeEnv { key: String, name: String },
    #[error("Kafka property {key}: cannot read secret file {}: {source}", path.display())]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Kafka property {key}: {problem}")]
    BadReference { key: String, problem: String },
}

/// One `--kafka KEY=VALUE` flag, as typed (references not yet resolved).
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl fmt::Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, shown(&self.key, &self.value))
    }
}

impl std::str::FromStr for Property {
    type Err = String;

    /// `KEY=VALUE`; the key is trimmed, the value kept as typed. The error
    /// never repeats the input, which may hold a secret.
    fn from_str(s: &str) -> Result<Property, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(Property {
                key: k.trim().to_string(),
                value: v.to_string(),
            }),
            _ => Err("expected KEY=VALUE".to_string()),
        }
    }
}

/// Resolved pass-through properties in the order they apply (later ones
/// win). Dereferences to the list of pairs; `Debug` hides secret values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub Vec<(String, String)>);

impl KafkaProperties {
    /// The value that applies for `key` (the last one set).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, shown(k, v))))
            .finish()
    }
}

impl std::ops::Deref for KafkaProperties {
    type Target = Vec<(String, String)>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KafkaProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = &'a (String, String);
    type IntoIter = std::slice::Iter<'a, (String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Vec<(String, String)>> for KafkaProperties {
    fn from(pairs: Vec<(String, String)>) -> Self {
        KafkaProperties(pairs)
    }
}

fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret(key) { REDACTED } else { value }
}

/// The properties of `file` (if any) followed by `flags`, every reference
/// resolved from the process environment and the file system.
pub fn load(file: Option<&Path>, flags: &[Property]) -> Result<KafkaProperties, PropertiesError> {
    load_with(file, flags, &|name| std::env::var(name))
}

/// [`load`] with the environment of the caller's choosing (tests).
pub fn load_with(
    file: Option<&Path>,
    flags: &[Property],
    env: &dyn Fn(&str) -> Result<String, std::env::VarError>,
) -> Result<KafkaProperties, PropertiesError> {
    let mut pairs = match file {
        Some(path) => read_file(path)?,
        None => Vec::new(),
    };
    pairs.extend(flags.iter().map(|p| (p.key.clone(), p.value.clone())));
    let mut out = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        let value = resolve(&key, &value, env)?;
        out.push((key, value));
    }
    Ok(KafkaProperties(out))
}

/// Reads a Java-style properties file: `key=value` lines, surrounding
/// whitespace trimmed; blank lines and lines starting with `#` or `!` are
/// ignored.
pub fn read_file(path: &Path) -> Result<Vec<(String, String)>, PropertiesError> {
    let text = std::fs::read_to_string(path).map_err(|source| PropertiesError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|line| PropertiesError::BadLine {
        path: path.to_path_buf(),
        line,
    })
}

/// Parses properties text; `Err(line number)` for a line that is not
/// `key=value`.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, usize> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_string(), v.trim().to_string())),
            _ => return Err(i + 1),
        }
    }
    Ok(out)
}

/// Replaces every `${env:NAME}` and `${file:/path}` in `value`. Anything
/// else (including a `$` or `${` of another kind) is kept as written.
pub fn resolve(
    key: &str,
    value: &str,
    env: &dyn Fn(&str) -> Result<String, std::env::VarError>,
) -> Result<String, PropertiesError> {
    const ENV: &str = "${env:";
    const FILE: &str = "${file:";
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    loop {
        let next = [ENV, FILE]
            .iter()
            .filter_map(|tag| rest.find(tag).map(|at| (at, *tag)))
            .min_by_key(|(at, _)| *at);
        let Some((at, tag)) = next else {
            out.push_str(rest);
            return Ok(out);
        };
        out.push_str(&rest[..at]);
        let after = &rest[at + tag.len()..];
        let Some(end) = after.find('}') else {
            return Err(PropertiesError::BadReference {
                key: key.to_string(),
                problem: format!("a {tag}…}} reference is not closed with }}"),
            });
        };
        let name = &after[..end];
        if name.trim().is_empty() {
            return Err(PropertiesError::BadReference {
                key: key.to_string(),
                problem: format!("a {tag}}} reference names nothing"),
            });
        }
        if tag == ENV {
            match env(name) {
                Ok(v) => out.push_str(&v),
                Err(std::env::VarError::NotPresent) => {
                    return Err(PropertiesError::MissingEnv {
                        key: key.to_string(),
                        name: name.to_string(),
                    });
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(PropertiesError::NotUnicodeEnv {
                        key: key.to_string(),
                        name: name.to_string(),
                    });
                }
            }
        } else {
            let path = PathBuf::from(name);
            let content = std::fs::read_to_string(&path).map_err(|source| PropertiesError::SecretFile {
                key: key.to_string(),
                path: path.clone(),
                source,
            })?;
            // Secret files usually end with a newline nobody means.
            out.push_str(
                content
                    .strip_suffix('\n')
                    .map_or(content.as_str(), |c| c.strip_suffix('\r').unwrap_or(c)),
            );
        }
        rest = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Result<String, std::env::VarError> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .ok_or(std::env::VarError::NotPresent)
        }
    }

    fn flag(s: &str) -> Property {
        s.parse().unwrap()
    }

    #[test]
    fn parses_java_style_properties() {
        let text = "# TLS\n\nsecurity.protocol = SASL_SSL\n! another comment\n  sasl.mechanism=SCRAM-SHA-512  \nsasl.jaas.config=a=b c=d\n";
        assert_eq!(
            parse(text).unwrap(),
            vec![
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
                ("sasl.mechanism".to_string(), "SCRAM-SHA-512".to_string()),
                ("sasl.jaas.config".to_string(), "a=b c=d".to_string()),
            ]
        );
        assert_eq!(parse("ok=1\nnot a property\n"), Err(2));
        assert_eq!(parse("=value\n"), Err(1));
    }

    #[test]
    fn flags_come_after_the_file_and_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka.properties");
        std::fs::write(&file, "security.protocol=SSL\nsocket.timeout.ms=1000\n").unwrap();
        let props = load_with(Some(&file), &[flag("security.protocol=SASL_SSL")], &env(&[])).unwrap();
        assert_eq!(props.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(props.get("socket.timeout.ms"), Some("1000"));
        // Applied in order, so the flag is set last and wins in librdkafka too.
        assert_eq!(props.last().unwrap().0, "security.protocol");
    }

    #[test]
    fn resolves_env_and_file_references() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let file_ref = format!("${{file:{}}}", secret.display());
        let e = env(&[("KAFKA_USER", "svc-switchboard")]);
        assert_eq!(resolve("sasl.password", &file_ref, &e).unwrap(), "s3cret");
        assert_eq!(
            resolve("sasl.username", "${env:KAFKA_USER}", &e).unwrap(),
            "svc-switchboard"
        );
        assert_eq!(
            resolve(
                "sasl.jaas.config",
                &format!("user=\"${{env:KAFKA_USER}}\" password=\"{file_ref}\";"),
                &e
            )
            .unwrap(),
            "user=\"svc-switchboard\" password=\"s3cret\";"
        );
        // Other dollars are left alone.
        assert_eq!(
            resolve("client.id", "cost$ ${other} $env", &e).unwrap(),
            "cost$ ${other} $env"
        );
    }

    #[test]
    fn missing_secrets_name_the_property_and_never_the_value() {
        let err = load_with(None, &[flag("sasl.password=${env:NOPE_NOT_SET}")], &env(&[])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("sasl.password"), "{message}");
        assert!(message.contains("NOPE_NOT_SET"), "{message}");
        assert!(message.contains("not set"), "{message}");

        let err = resolve("ssl.key.password", "${file:/nonexistent/secret}", &env(&[])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("ssl.key.password"), "{message}");
        assert!(message.contains("/nonexistent/secret"), "{message}");

        let err = resolve("sasl.password", "hunter2${env:X", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("sasl.password"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka.properties");
        std::fs::write(&file, "ok=1\nhunter2\n").unwrap();
        let err = load_with(Some(&file), &[], &env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("kafka.properties:2: expected KEY=VALUE"),
            "{err}"
        );

        let err = "hunter2".parse::<Property>().unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn debug_hides_secret_values() {
        let props = KafkaProperties(vec![
            ("security.protocol".into(), "SASL_SSL".into()),
            ("sasl.password".into(), "hunter2".into()),
            ("ssl.key.password".into(), "hunter3".into()),
            ("sasl.jaas.config".into(), "password=hunter4".into()),
            ("sasl.oauthbearer.client.secret".into(), "hunter5".into()),
            (
                "sasl.oauthbearer.token.endpoint.url".into(),
                "https://x/?t=hunter6".into(),
            ),
        ]);
        let shown = format!("{props:?}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
        assert!(!shown.contains("hunter"), "{shown}");
        let flag = flag("sasl.password=hunter2");
        assert!(!format!("{flag:?}").contains("hunter2"));
    }
}

//! Security settings as operators pass them: a properties file
//! (`--kafka-config`) and `--kafka` flags whose values reference secrets
//! (`${env:NAME}`, `${file:/path}`), resolved at start for `run`, `inbox`
//! and `decide`; a missing secret is a clear error naming the property, and
//! no secret value ever reaches the output, even at `RUST_LOG=debug`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use switchboard::config::Guarantee;

const SECRET_PASSWORD: &str = "hunter2-from-a-file";
const SECRET_USER: &str = "svc-hunter3-from-env";

fn output(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = switchboard_command();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("SB_TEST_UNSET_SECRET");
    cmd.output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path
}

#[test]
fn a_missing_secret_is_an_error_naming_the_property() {
    let dir = tempfile::tempdir().unwrap();
    let matrix = default_matrix_path();
    let matrix = matrix.to_str().unwrap();
    let unset = "sasl.password=${env:SB_TEST_UNSET_SECRET}";
    // Resolution comes before any connection: no broker is needed (port 9
    // has nobody listening).
    for args in [
        vec!["run", "--matrix", matrix, "--kafka", unset],
        vec!["inbox", "finance", "--kafka", unset],
        vec![
            "decide",
            "a-1",
            "--lane",
            "finance",
            "--approve",
            "--by",
            "fran",
            "--kafka",
            unset,
        ],
    ] {
        let mut args = args.clone();
        args.extend(["--bootstrap-servers", "127.0.0.1:9"]);
        let out = output(&args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(
                "Kafka property sasl.password: environment variable SB_TEST_UNSET_SECRET is not set"
            ),
            "{args:?}: {err}"
        );
    }

    // A secret file that is not there, from a properties file given by its
    // environment variable.
    let properties = write(
        dir.path(),
        "kafka.properties",
        "security.protocol=SSL\nssl.key.password=${file:/nonexistent/kafka-key-password}\n",
    );
    let out = output(
        &["decide", "a-1", "--lane", "finance", "--reject", "--by", "fran"],
        &[
            ("SWITCHBOARD_KAFKA_CONFIG", properties.to_str().unwrap()),
            ("SWITCHBOARD_BOOTSTRAP_SERVERS", "127.0.0.1:9"),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "Kafka property ssl.key.password: cannot read secret file /nonexistent/kafka-key-password"
        ),
        "{err}"
    );

    // A properties file that is not there, or not properties.
    let out = output(
        &[
            "inbox",
            "finance",
            "--bootstrap-servers",
            "127.0.0.1:9",
            "--kafka-config",
            "/nonexistent/kafka.properties",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Kafka properties file /nonexistent/kafka.properties"),
        "{}",
        stderr(&out)
    );
    let broken = write(
        dir.path(),
        "broken.properties",
        "# TLS\nsecurity.protocol=SSL\nhunter2\n",
    );
    let out = output(
        &[
            "inbox",
            "finance",
            "--bootstrap-servers",
            "127.0.0.1:9",
            "--kafka-config",
            broken.to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("broken.properties:3: expected KEY=VALUE"), "{err}");
    assert!(!err.contains("hunter2"), "the line is not repeated: {err}");
}

#[test]
fn help_does_not_show_the_kafka_environment_variable() {
    let out = output(
        &["run", "--help"],
        &[("SWITCHBOARD_KAFKA", "sasl.password=hunter2-in-env")],
    );
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("SWITCHBOARD_KAFKA"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

/// `run`, `inbox` and `decide` with SASL credentials from a file and the
/// environment, at debug level (and librdkafka's own configuration dump):
/// the credentials appear nowhere. The properties file also gives the
/// bootstrap servers, from the environment, while the flag names a port
/// where nothing listens: each command works only if the file and its
/// references reached every client it creates.
#[test]
fn secrets_never_reach_the_output_even_at_debug() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    kafka.create_topics(&config, &matrix);

    let dir = tempfile::tempdir().unwrap();
    let password = write(dir.path(), "kafka-password", &format!("{SECRET_PASSWORD}\n"));
    let properties = write(
        dir.path(),
        "kafka.properties",
        &format!(
            "# The mock cluster speaks no SASL; librdkafka ignores the credentials\n\
             # under PLAINTEXT but still holds and could print them.\n\
             bootstrap.servers=${{env:SB_TEST_BOOTSTRAP}}\n\
             security.protocol=PLAINTEXT\n\
             sasl.username=${{env:SB_TEST_USER}}\n\
             sasl.password=${{file:{}}}\n",
            password.display()
        ),
    );
    let env = [
        ("SB_TEST_BOOTSTRAP", kafka.bootstrap()),
        ("SB_TEST_USER", SECRET_USER.to_string()),
        ("RUST_LOG", "debug".to_string()),
    ];
    let command = |name: &str, args: &[&str]| {
        let mut cmd = switchboard_command();
        cmd.args(args)
            .args(["--bootstrap-servers", "127.0.0.1:9", "--kafka-config"])
            .arg(&properties);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        Proc::spawn(name, cmd)
    };
    let check = |proc: &Proc| {
        let (out, log) = (proc.stdout(), proc.log());
        for secret in [SECRET_PASSWORD, SECRET_USER] {
            assert!(
                !out.contains(secret),
                "{}: stdout shows a secret:\n{out}",
                proc.name
            );
            assert!(
                !log.contains(secret),
                "{}: stderr shows a secret:\n{log}",
                proc.name
            );
        }
        assert!(
            log.contains("DEBUG"),
            "{}: debug logging was on:\n{log}",
            proc.name
        );
    };

    let sample = samples()
        .into_iter()
        .find(|(name, _)| name == "refund-over-threshold")
        .expect("the refund sample")
        .1;
    let action = with_id(&sample, "secret-1");
    kafka.produce(
        "agent.actions",
        Some(b"secret-1"),
        Some(action.to_string().as_bytes()),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let mut run = command(
        "run",
        &[
            "run",
            "--matrix",
            default_matrix_path().to_str().unwrap(),
            "--stage",
            "route",
            "--max-events",
            "1",
            "--metrics-addr",
            &addr,
        ],
    );
    run.wait_success(Duration::from_secs(60));
    check(&run);

    let mut inbox = command("inbox", &["inbox", "finance"]);
    inbox.wait_success(Duration::from_secs(60));
    check(&inbox);
    assert!(inbox.stdout().contains("secret-1  "), "{}", inbox.stdout());

    // With librdkafka's configuration dump on as well.
    let mut decide = command(
        "decide",
        &[
            "decide",
            "secret-1",
            "--lane",
            "finance",
            "--approve",
            "--by",
            "fran",
            "--kafka",
            "debug=conf",
        ],
    );
    decide.wait_success(Duration::from_secs(60));
    check(&decide);
    assert!(
        decide.log().contains("sasl.password = [redacted]"),
        "librdkafka printed its configuration:\n{}",
        decide.log()
    );
    assert!(
        decide.stdout().contains("written to approvals.decisions"),
        "{}",
        decide.stdout()
    );
}

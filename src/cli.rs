//! The command line of DESIGN.md. Each subcommand parses its flags here and
//! hands plain values to the library; exit codes are part of the contract.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::decode::Decoder;
use crate::enrich::{Directory, Record, enrich};
use crate::explain::explain;
use crate::matrix::Matrix;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Routes AI-agent actions to the human approver who owns the risk"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show where one action would go and why, without Kafka.
    ///
    /// Exit status: 0 routed, 1 invalid event, 2 invalid matrix.
    Explain {
        /// The matrix file.
        #[arg(long, env = "SWITCHBOARD_MATRIX")]
        matrix: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text, env = "SWITCHBOARD_FORMAT")]
        format: Format,
        /// Directory records to enrich with, as JSON: {"table": {"key": {"field": "value"}}}.
        #[arg(long, env = "SWITCHBOARD_DIRECTORY")]
        directory: Option<PathBuf>,
        /// A JSON AgentAction file, or `-` for standard input.
        event: PathBuf,
    },
    /// Validate a matrix and run the test cases written in it.
    ///
    /// Exit status: 0 all cases pass, 1 a case fails, 2 invalid matrix.
    Check {
        /// The matrix file.
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Exit statuses shared by `explain` and `check`.
const EXIT_INVALID_EVENT: u8 = 1;
const EXIT_INVALID_MATRIX: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Explain {
            matrix,
            format,
            directory,
            event,
        } => explain_cmd(&matrix, format, directory.as_deref(), &event),
        Command::Check { file } => check_cmd(&file),
    }
}

fn explain_cmd(matrix_path: &Path, format: Format, directory: Option<&Path>, event: &Path) -> ExitCode {
    let matrix = match Matrix::load(matrix_path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("invalid matrix: {e}");
            return ExitCode::from(EXIT_INVALID_MATRIX);
        }
    };
    let directory = match directory.map(read_directory).transpose() {
        Ok(d) => d.unwrap_or_default(),
        Err(e) => {
            eprintln!("invalid directory file: {e}");
            return ExitCode::from(EXIT_INVALID_EVENT);
        }
    };
    let bytes = match read_input(event) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read event {}: {e}", event.display());
            return ExitCode::from(EXIT_INVALID_EVENT);
        }
    };
    let action = match Decoder::bundled().decode(&bytes) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("invalid event: {e}");
            return ExitCode::from(EXIT_INVALID_EVENT);
        }
    };
    let enrichment = enrich(&matrix, &action, &directory);
    let report = explain(&matrix, &action, &enrichment);
    match format {
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("cannot render the report: {e}");
                return ExitCode::FAILURE;
            }
        },
        Format::Text => print!("{}", report.to_text(&matrix)),
    }
    ExitCode::SUCCESS
}

fn check_cmd(file: &Path) -> ExitCode {
    let matrix = match Matrix::load(file) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("invalid matrix: {e}");
            return ExitCode::from(EXIT_INVALID_MATRIX);
        }
    };
    let report = matrix.run_tests();
    for failure in &report.failures {
        eprintln!(
            "{}:{}:{}: test {:?} failed: {}",
            matrix.source, failure.pos.line, failure.pos.col, failure.name, failure.problem
        );
    }
    println!(
        "{}: {} lanes, {} rules; {} test cases passed, {} failed; version {}",
        matrix.source,
        matrix.lanes.len(),
        matrix.rules.len(),
        report.passed,
        report.failures.len(),
        matrix.version
    );
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID_EVENT)
    }
}

fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path)
    }
}

fn read_directory(path: &Path) -> Result<Directory, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tables: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Record>> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut directory = Directory::default();
    for (table, records) in tables {
        for (key, record) in records {
            directory.upsert(&table, &key, record);
        }
    }
    Ok(directory)
}

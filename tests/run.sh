#!/usr/bin/env bash
# The one test command (README): installs what the suite needs when it is
# missing, then runs formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# tansu 0.6.0, the Kafka-compatible broker the consumer-group, restart and
# throughput tests start as a child process (about 10 minutes to build once,
# then cached in ~/.cargo/bin). Newer releases need a newer rustc.
if ! command -v tansu >/dev/null 2>&1 || ! tansu --version 2>/dev/null | grep -q '0\.6\.0'; then
  echo "== installing tansu 0.6.0 (once)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== cargo test"
cargo test --all-targets

echo "== switchboard check deploy/matrix.yaml"
cargo run --quiet -- check deploy/matrix.yaml

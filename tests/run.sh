#!/usr/bin/env bash
# The one test command (README): installs what the suite needs when it is
# missing, then runs formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== cargo test"
cargo test --all-targets

echo "== switchboard check deploy/matrix.yaml"
cargo run --quiet -- check deploy/matrix.yaml

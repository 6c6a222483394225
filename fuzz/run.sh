#!/usr/bin/env bash
# Runs the fuzz targets (README: Reliability), one at a time, since the
# development machines have two cores shared with other builds.
#
#   fuzz/run.sh                  every target, 600 s each
#   fuzz/run.sh matrix 60        one target, 60 s
#   fuzz/run.sh all 30           every target, 30 s each
#
# cargo-fuzz builds with -Zsanitizer=address, which needs a nightly
# toolchain: it uses `cargo +nightly` when rustup has one, and otherwise the
# stable toolchain with RUSTC_BOOTSTRAP=1 (which lets the nightly flags
# through). cargo-fuzz is installed from crates.io when missing. New inputs
# go to fuzz/work/<target> (ignored by git); crashes to
# fuzz/artifacts/<target>/; the checked-in seeds in fuzz/corpus/<target>/
# are only read. Reproduce a crash with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-…
set -euo pipefail
cd "$(dirname "$0")"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

which="${1:-all}"
seconds="${2:-600}"
targets=(decode_json decode_avro decision matrix)
if [ "$which" != all ]; then
  targets=("$which")
fi

toolchain=()
if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  echo "== no nightly toolchain: stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

for target in "${targets[@]}"; do
  echo "== $target for ${seconds}s"
  mkdir -p "work/$target"
  cargo "${toolchain[@]}" fuzz run "$target" "work/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    2>&1 | tee "work/$target.log"
done

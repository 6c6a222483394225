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

# Debian packages: promtool (from prometheus), with which the alert rules are
# checked and unit-tested and tests/ops.rs parses every dashboard query; and
# gdb, with which a test reports where a process that did not exit waits.
PACKAGES=()
command -v promtool >/dev/null 2>&1 || PACKAGES+=(prometheus)
command -v gdb >/dev/null 2>&1 || PACKAGES+=(gdb)
if [ ${#PACKAGES[@]} -gt 0 ]; then
  echo "== installing Debian's ${PACKAGES[*]}"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${PACKAGES[@]}"
fi

# Schema validators from PyPI, in a virtualenv of their own. Both bundle their
# schemas, so nothing is fetched while validating: kubernetes-validate has
# Kubernetes' JSON schemas, check-jsonschema the compose-spec schema.
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard-tools"
TOOL_VERSIONS="kubernetes-validate==1.37.0 check-jsonschema==0.39.0"
if [ "$(cat "$TOOLS/.installed" 2>/dev/null)" != "$TOOL_VERSIONS" ]; then
  echo "== installing $TOOL_VERSIONS into $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  # shellcheck disable=SC2086 # one word per requirement
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check $TOOL_VERSIONS
  echo "$TOOL_VERSIONS" > "$TOOLS/.installed"
fi

echo "== promtool: alert rules, their unit tests, the scrape config"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
promtool check config deploy/prometheus/prometheus.yml

echo "== Kubernetes manifests against the Kubernetes schemas (strict)"
k8s_manifests=()
for f in deploy/k8s/*.yaml; do
  case "$(basename "$f")" in
    kustomization.yaml | matrix.yaml) ;;
    *) k8s_manifests+=("$f") ;;
  esac
done
for version in 1.30.0 1.37.0; do
  "$TOOLS/bin/kubernetes-validate" --strict --quiet -k "$version" "${k8s_manifests[@]}"
done
if command -v kubectl >/dev/null 2>&1; then
  # What `kubectl apply -k` would send, the generated matrix ConfigMap included.
  built="$(mktemp)"
  kubectl kustomize deploy/k8s > "$built"
  "$TOOLS/bin/kubernetes-validate" --strict --quiet "$built"
  rm -f "$built"
fi

echo "== docker-compose.yml"
"$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  docker compose config -q
else
  echo "(no docker compose plugin here: checked against the compose-spec schema only)"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== cargo test"
cargo test --all-targets

echo "== switchboard check deploy/matrix.yaml"
cargo run --quiet -- check deploy/matrix.yaml

#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, clippy, the local control plane and tools
# (built or installed when missing, cached when warm), then every test target.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cache=${MDE_CACHE_DIR:-$HOME/.cache/mde-isolation-operator}
# CI runs in a fresh clone: keep cargo's build outside it so a warm run stays short.
if [[ ${CI:-} == true && -z ${CARGO_TARGET_DIR:-} ]]; then
  export CARGO_TARGET_DIR=$cache/cargo-target
fi

step() { printf '\n==> %s\n' "$*"; }
start=$SECONDS

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
step "cargo doc (broken doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --document-private-items --quiet
step "local control plane"
scripts/build-control-plane.sh >/dev/null
step "kubectl and helm"
scripts/install-tools.sh >/dev/null
scripts/install-promtool.sh # optional: promtool checks of the alert rules (skipped when missing)
scripts/install-lua.sh # lua5.1 and lua5.4 for tests/argocd_health.rs (it fails without them)
step "cargo test"
# Every target but the benchmark (clippy above still builds it): run as a test, the bench
# binary would run the whole benchmark (`make bench`).
cargo test --lib --bins --tests --no-fail-fast
step "go test in tests/control-plane (kstatus)"
# The flags of scripts/build-control-plane.sh, so the test reuses the compiled Kubernetes packages.
(cd tests/control-plane && CGO_ENABLED=0 GOTOOLCHAIN=local go test -trimpath -count=1 ./...)
step "demo in CI mode"
scripts/demo.sh --exit-when-settled >/dev/null
echo "test suite finished in $((SECONDS - start))s"

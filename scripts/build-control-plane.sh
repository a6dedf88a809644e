#!/usr/bin/env bash
# Builds the test control plane (tests/control-plane: a real kube-apiserver with
# an embedded etcd, see its main.go) and caches the binary, keyed by a hash of
# its sources, under ${MDE_CACHE_DIR:-$HOME/.cache/mde-isolation-operator}.
# Links it to .tools/bin/kube-control-plane and prints the binary's path as the
# last line of stdout.
#
# A cold build compiles much of Kubernetes: several minutes and a few GB of
# memory on a small machine. A warm call (same sources) takes well under a
# second. Needs only Go and its module proxy.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$repo/tests/control-plane

die() { echo "build-control-plane: error: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 ||
  die "'go' is not on PATH; install Go (the version in tests/control-plane/go.mod or newer) to build the test control plane"

# Stamp the Kubernetes version into the binary the way upstream release builds
# do; otherwise the server reports v0.0.0-master, which kubectl and Helm reject.
k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ { print $2; exit }' "$src/go.mod")
[[ -n $k8s_version ]] || die "no k8s.io/kubernetes requirement in $src/go.mod"
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean"
done

# The cache key covers the sources and the link flags derived from them.
if command -v sha256sum >/dev/null 2>&1; then
  sha256() { sha256sum | cut -d' ' -f1; }
else
  sha256() { shasum -a 256 | cut -d' ' -f1; }
fi
hash=$( (cat "$src/go.mod" "$src/go.sum" "$src/main.go"; echo "$ldflags") | sha256)
cache_root=${MDE_CACHE_DIR:-$HOME/.cache/mde-isolation-operator}/control-plane
out_dir=$cache_root/$hash
bin=$out_dir/kube-control-plane

build() {
  [[ -x $bin ]] && return 0 # another process built it while we waited
  mkdir -p "$out_dir"
  echo "build-control-plane: building $bin (several minutes when cold)..." >&2
  local start=$SECONDS tmp="$bin.tmp.$$"
  # Static, stripped, reproducible; never switch toolchains behind our back.
  if ! (cd "$src" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -trimpath -ldflags="$ldflags" -o "$tmp" .) >&2; then
    rm -f "$tmp"
    die "go build failed in $src"
  fi
  mv -f "$tmp" "$bin" # atomic: readers see the old state or a whole binary
  echo "build-control-plane: built in $((SECONDS - start))s" >&2
  # Each binary is ~100 MB: drop builds of other sources unused for two weeks.
  find "$cache_root" -mindepth 1 -maxdepth 1 -type d ! -name "$hash" -mtime +14 -exec rm -rf {} + 2>/dev/null || true
}

if [[ ! -x $bin ]]; then
  mkdir -p "$cache_root"
  if command -v flock >/dev/null 2>&1; then
    # Parallel test binaries may all ask for the harness; build it once.
    exec 9>"$cache_root/.build.lock"
    flock 9
    build
    exec 9>&-
  else
    build
  fi
fi

touch "$out_dir" # marks this build as in use for the pruning above
mkdir -p "$repo/.tools/bin"
ln -sfn "$bin" "$repo/.tools/bin/kube-control-plane"
echo "$bin"

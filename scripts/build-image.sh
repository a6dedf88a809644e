#!/usr/bin/env bash
# Builds the operator image without a Docker daemon and without pulling a base image: the static
# binary is built on the host with cargo, then buildah builds Containerfile.local (FROM scratch,
# COPY only) in chroot isolation with the vfs storage driver (no overlay mounts, no namespaces
# to set up), as in a sandbox or CI container. The result is the same image the Dockerfile builds.
#
#   scripts/build-image.sh                       # tag: the chart's default image
#   IMAGE=registry.example/mde:dev scripts/build-image.sh
#   OCI_ARCHIVE=target/image.tar scripts/build-image.sh   # also write an OCI archive
#
# Needs buildah (Debian: apt-get install buildah) and the Rust toolchain for the host target.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cache=${MDE_CACHE_DIR:-$HOME/.cache/mde-isolation-operator}
die() { echo "build-image: error: $*" >&2; exit 1; }

command -v buildah >/dev/null 2>&1 || die "buildah is not installed (Debian: apt-get install buildah)"
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/mde-isolation-operator/Chart.yaml)
image=${IMAGE:-ghcr.io/mde-isolation-operator/mde-isolation-operator:${app_version}}

case "$(uname -m)" in
  x86_64) target=x86_64-unknown-linux-gnu ;;
  aarch64) target=aarch64-unknown-linux-gnu ;;
  *) die "unsupported architecture $(uname -m)" ;;
esac
# A target directory of its own: crt-static changes RUSTFLAGS, which would otherwise rebuild the
# whole dependency tree of the ordinary (test) builds in target/.
target_dir=${MDE_IMAGE_TARGET_DIR:-$cache/image-target}
echo "build-image: cargo build --release (static, $target)..." >&2
RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release --locked \
  --target "$target" --target-dir "$target_dir" --bin mde-isolation-operator
binary=$target_dir/$target/release/mde-isolation-operator
if readelf -l "$binary" | grep -q 'Requesting program interpreter'; then
  die "$binary is dynamically linked"
fi

ca=/etc/ssl/certs/ca-certificates.crt
[[ -f $ca ]] || die "$ca is missing (Debian: apt-get install ca-certificates)"
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# Without symbols (a third of the size); panics still name their location.
if command -v strip >/dev/null 2>&1; then
  strip -o "$context/mde-isolation-operator" "$binary"
  chmod 0555 "$context/mde-isolation-operator"
else
  install -m 0555 "$binary" "$context/mde-isolation-operator"
fi
install -m 0444 "$ca" "$context/ca-certificates.crt"

storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")
echo "build-image: buildah bud -> $image" >&2
buildah "${storage[@]}" bud --quiet --isolation chroot --layers=false \
  -f "$repo/Containerfile.local" -t "$image" "$context" >/dev/null
buildah "${storage[@]}" images --format '{{.Name}}:{{.Tag}} {{.ID}} {{.Size}}' "$image"
if [[ -n ${OCI_ARCHIVE:-} ]]; then
  rm -f "$OCI_ARCHIVE"
  buildah "${storage[@]}" push --quiet "$image" "oci-archive:$OCI_ARCHIVE:$image"
  echo "build-image: wrote $OCI_ARCHIVE ($(du -h "$OCI_ARCHIVE" | cut -f1))" >&2
fi

#!/usr/bin/env bash
# Installs the Lua interpreters that tests/argocd_health.rs runs the Argo CD health check with:
# lua5.4, and lua5.1 because Argo CD evaluates health checks with gopher-lua, which implements
# Lua 5.1 (so a script must not rely on anything newer). Debian packages; needs root (as in CI).
# Idempotent: does nothing when both are on PATH.
set -euo pipefail

missing=()
for lua in lua5.4 lua5.1; do
  command -v "$lua" >/dev/null 2>&1 || missing+=("$lua")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

command -v apt-get >/dev/null 2>&1 ||
  { echo "install-lua: error: ${missing[*]} missing and apt-get is not available; install them by hand" >&2; exit 1; }
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
echo "install-lua: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >&2
for lua in "${missing[@]}"; do
  command -v "$lua" >/dev/null 2>&1 || { echo "install-lua: error: $lua still not on PATH" >&2; exit 1; }
done

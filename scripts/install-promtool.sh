#!/usr/bin/env bash
# Installs promtool (from Debian's `prometheus` package) for tests/observability_pack.rs, which
# runs `promtool check rules` and `promtool test rules` on the chart's alert rules when it is on
# PATH. Idempotent. Never fails the caller: without apt-get or root, or when the install fails,
# it prints a note and the test skips only its promtool sub-checks.
set -uo pipefail

note() { echo "install-promtool: $*" >&2; }

if command -v promtool >/dev/null 2>&1; then
  promtool --version 2>&1 | head -n 1
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [[ $(id -u) -ne 0 ]]; then
  note "promtool is not installed and apt-get (as root) is unavailable; the promtool checks will be skipped"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }
# The package lists may be missing or stale on a fresh machine: update once and retry.
if ! install && ! { apt-get update -qq >/dev/null 2>&1 && install; }; then
  note "apt-get install prometheus failed; the promtool checks will be skipped"
  exit 0
fi
# The package also brings a Prometheus server service; nothing here starts it.
if command -v promtool >/dev/null 2>&1; then
  promtool --version 2>&1 | head -n 1
else
  note "the prometheus package did not provide promtool; the promtool checks will be skipped"
fi
exit 0

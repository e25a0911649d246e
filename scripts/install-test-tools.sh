#!/usr/bin/env bash
# Install the outside tools the test suite needs: `prometheus` and `promtool`
# (tests/deploy/ runs promtool on our config and rules and starts its own Prometheus).
# Idempotent: does nothing when both are on PATH. Debian/Ubuntu (apt-get) only.
# The package's service is kept from starting (the tests start their own Prometheus on a
# free port); if it starts anyway, it is stopped again.
set -euo pipefail

have_tools() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if have_tools; then
  exit 0
fi

die() {
  echo "install-test-tools: $*" >&2
  echo "install-test-tools: install Prometheus 2.x so that 'prometheus' and 'promtool' are on PATH" \
    "(Debian/Ubuntu: apt-get install prometheus; elsewhere: the Prometheus release tarball)." >&2
  exit 1
}

command -v apt-get >/dev/null 2>&1 || die "'prometheus'/'promtool' are missing and apt-get is not available"

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
  sudo -n true 2>/dev/null || die "'prometheus'/'promtool' are missing; installing them needs root, and sudo asks for a password (run: sudo $0)"
else
  die "'prometheus'/'promtool' are missing; installing them needs root (or sudo), and neither is available"
fi

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d whether a service may start; exit code
# 101 says no. Only add our own when none exists, and remove exactly that one afterwards.
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
cleanup() {
  if [ "$OWN_POLICY" -eq 1 ]; then
    "${SUDO[@]}" rm -f "$POLICY" || true
  fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# added by energy-proxy scripts/install-test-tools.sh for one install\nexit 101\n' \
    | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  OWN_POLICY=1
fi

export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
  apt-get install -y -q --no-install-recommends prometheus)
log=$(mktemp)
if ! "${APT[@]}" >"$log" 2>&1; then
  # Usually a stale or empty package index (fresh containers): refresh it once and retry.
  if ! "${SUDO[@]}" apt-get update -q >>"$log" 2>&1 || ! "${APT[@]}" >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    die "apt-get install prometheus failed (output above)"
  fi
fi
rm -f "$log"

# Belt and braces: if a service manager started the packaged Prometheus, stop it, so that
# nothing keeps running (and holding port 9090) after the install.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  "${SUDO[@]}" systemctl stop prometheus.service >/dev/null 2>&1 || true
  "${SUDO[@]}" systemctl disable prometheus.service >/dev/null 2>&1 || true
elif command -v service >/dev/null 2>&1; then
  "${SUDO[@]}" service prometheus stop >/dev/null 2>&1 || true
fi

have_tools || die "the prometheus package installed, but 'prometheus'/'promtool' are still not on PATH"
echo "install-test-tools: $(prometheus --version 2>&1 | head -n 1)"

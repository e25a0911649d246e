#!/usr/bin/env bash
# Install the outside tools the test suite needs: `prometheus` and `promtool`
# (tests/deploy/ runs promtool on our config and rules and starts its own Prometheus), and
# PostgreSQL's server programs (the request store's tests start a private server,
# tests/support/pg.py), and Chromium (the live page's tests drive it headless through playwright,
# tests/support/browser.py; nothing is downloaded by playwright). Idempotent: does nothing when all
# are there. Debian/Ubuntu (apt-get) only.
# The packages' services are kept from starting (the tests start their own servers on free
# ports); if one starts anyway, it is stopped again.
set -euo pipefail

have_prometheus() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }
have_postgres() {
  command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null 2>&1
}

have_chromium() {
  [ -n "${CHROMIUM:-}" ] && command -v "$CHROMIUM" >/dev/null 2>&1 && return 0
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

PACKAGES=()
have_prometheus || PACKAGES+=(prometheus)
have_postgres || PACKAGES+=(postgresql)
have_chromium || PACKAGES+=(chromium)
if [ "${#PACKAGES[@]}" -eq 0 ]; then
  exit 0
fi

die() {
  echo "install-test-tools: $*" >&2
  echo "install-test-tools: the tests need Prometheus 2.x ('prometheus', 'promtool' on PATH)," \
    "PostgreSQL's server (initdb, pg_ctl) and Chromium" \
    "(Debian/Ubuntu: apt-get install prometheus postgresql chromium)." >&2
  exit 1
}

command -v apt-get >/dev/null 2>&1 || die "${PACKAGES[*]} missing and apt-get is not available"

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
  sudo -n true 2>/dev/null || die "${PACKAGES[*]} missing; installing needs root, and sudo asks for a password (run: sudo $0)"
else
  die "${PACKAGES[*]} missing; installing needs root (or sudo), and neither is available"
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
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}")
log=$(mktemp)
if ! "${APT[@]}" >"$log" 2>&1; then
  # Usually a stale or empty package index (fresh containers): refresh it once and retry.
  if ! "${SUDO[@]}" apt-get update -q >>"$log" 2>&1 || ! "${APT[@]}" >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    die "apt-get install ${PACKAGES[*]} failed (output above)"
  fi
fi
rm -f "$log"

# Belt and braces: if a service manager started a packaged server, stop it, so that
# nothing keeps running (and holding port 9090 or 5432) after the install.
for service in prometheus postgresql; do
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl stop "$service.service" >/dev/null 2>&1 || true
    "${SUDO[@]}" systemctl disable "$service.service" >/dev/null 2>&1 || true
  elif command -v service >/dev/null 2>&1; then
    "${SUDO[@]}" service "$service" stop >/dev/null 2>&1 || true
  fi
done

have_prometheus || die "the prometheus package installed, but 'prometheus'/'promtool' are still not on PATH"
have_postgres || die "the postgresql package installed, but its initdb/pg_ctl are not found"
have_chromium || die "the chromium package installed, but 'chromium' is not on PATH"
echo "install-test-tools: $(prometheus --version 2>&1 | head -n 1)"
echo "install-test-tools: $(chromium --version 2>/dev/null | head -n 1)"
echo "install-test-tools: PostgreSQL $(ls -d /usr/lib/postgresql/*/ 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"

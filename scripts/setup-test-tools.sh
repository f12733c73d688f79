#!/usr/bin/env bash
# Test-only system tools: Debian's chromium for the report's browser tests (playwright drives it; no browser
# download). Skipped quietly where it is present already or where apt-get cannot run (not root): those tests
# then skip with a reason.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup-test-tools: installing chromium (Debian) for the report tests"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "setup-test-tools: chromium not installed and apt-get unavailable; browser tests will be skipped" >&2
fi

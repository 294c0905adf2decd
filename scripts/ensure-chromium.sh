#!/usr/bin/env bash
# Make sure Debian's chromium and its chromedriver are installed: the audit report test
# renders the report in chromium, headless, and the console's tests
# (tests/integration/console) drive it through chromedriver. Idempotent: quick when both
# are there. Nothing is pulled from anywhere but the machine's own Debian mirror.
set -euo pipefail

log() { printf 'ensure-chromium: %s\n' "$*" >&2; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    log "chromium or chromedriver is missing and only root can install them:" \
        "apt-get install chromium chromium-driver"
    exit 2
fi
log "installing chromium and chromium-driver from Debian"
# Wait for another apt run (another make, unattended upgrades) rather than fail.
apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null
command -v chromedriver >/dev/null

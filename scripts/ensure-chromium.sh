#!/usr/bin/env bash
# Make sure Debian's chromium is installed: the audit report test renders the report
# in it, headless. Idempotent: quick when chromium is there. Nothing is pulled from
# anywhere but the machine's own Debian mirror.
set -euo pipefail

log() { printf 'ensure-chromium: %s\n' "$*" >&2; }

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    log "chromium is missing and only root can install it: apt-get install chromium"
    exit 2
fi
log "installing chromium from Debian"
# Wait for another apt run (another make, unattended upgrades) rather than fail.
apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null

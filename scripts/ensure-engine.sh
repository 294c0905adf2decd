#!/usr/bin/env bash
# Make sure a Docker Engine answers on /var/run/docker.sock, with gVisor's
# runsc registered as a runtime.  Idempotent: quick when the engine is up.
#
# On a fresh Debian 12 machine (as root, no systemd) this installs Debian's
# docker.io, runsc and debootstrap, writes /etc/docker/daemon.json and starts
# dockerd in the background.  Nothing is pulled from a registry.
set -euo pipefail

SOCKET=/var/run/docker.sock
DAEMON_JSON=/etc/docker/daemon.json
LOG=/var/log/callward-dockerd.log

log() { printf 'ensure-engine: %s\n' "$*" >&2; }

engine_answers() {
    python3 - "$SOCKET" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
try:
    s.connect(sys.argv[1])
    s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
    sys.exit(0 if b"OK" in s.recv(4096) else 1)
except OSError:
    sys.exit(1)
PY
}

need_packages=()
command -v dockerd >/dev/null 2>&1 || need_packages+=(docker.io)
command -v runsc >/dev/null 2>&1 || need_packages+=(runsc)
command -v debootstrap >/dev/null 2>&1 || need_packages+=(debootstrap)
if ((${#need_packages[@]})); then
    if [[ $(id -u) != 0 ]]; then
        log "missing ${need_packages[*]} and not root: install them, then run again"
        exit 2
    fi
    log "installing ${need_packages[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

want_daemon_json=$(python3 - "$(command -v runsc)" <<'PY'
import json, sys
print(json.dumps({"runtimes": {"runsc": {"path": sys.argv[1], "runtimeArgs": ["--network=none"]}}}, indent=2, sort_keys=True))
PY
)
config_changed=0
if [[ $(id -u) == 0 ]]; then
    mkdir -p /etc/docker
    if [[ ! -f $DAEMON_JSON ]] || ! python3 - "$DAEMON_JSON" <<'PY'
import json, sys
have = json.load(open(sys.argv[1]))
sys.exit(0 if "runsc" in have.get("runtimes", {}) else 1)
PY
    then
        log "registering runsc in $DAEMON_JSON"
        printf '%s\n' "$want_daemon_json" >"$DAEMON_JSON"
        config_changed=1
    fi
fi

if engine_answers; then
    if ((config_changed)); then
        log "asking dockerd to reload $DAEMON_JSON"
        pkill -HUP -x dockerd || true
        sleep 1
    fi
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "no Docker Engine answers on $SOCKET and only root can start one"
    exit 2
fi

log "starting dockerd in the background (log: $LOG)"
# containerd is started by dockerd itself; setsid keeps it alive after make exits.
setsid nohup dockerd >>"$LOG" 2>&1 </dev/null &
for _ in $(seq 1 120); do
    if engine_answers; then
        log "dockerd answers"
        exit 0
    fi
    sleep 0.5
done
log "dockerd did not answer within 60 s; last lines of $LOG:"
tail -n 20 "$LOG" >&2
exit 1

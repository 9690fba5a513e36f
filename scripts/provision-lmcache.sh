#!/usr/bin/env bash
# Provision the real LMCache controller for pixiu-kv's integration tier, and print the
# path of its `lmcache_controller` executable on stdout (nothing else goes to stdout):
#
#   PIXIU_KV_LMCACHE_CONTROLLER=$(bash scripts/provision-lmcache.sh)
#   export PIXIU_KV_LMCACHE_CONTROLLER
#
# Idempotent: the virtual environment at ${PIXIU_KV_LMCACHE_VENV:-$HOME/.cache/pixiu-kv/lmcache-0.5.6}
# is (re)built only while its `.complete` marker is missing. It lives outside the clone so
# CI can cache it. Torch is installed first and pinned so that lmcache does not pull a
# CUDA build. Measured on a 2-core machine with local wheels: 2-5 minutes, ~1.9 GB.
set -euo pipefail

LMCACHE_VERSION=0.5.6
TORCH_VERSION=2.13.0
VENV=${PIXIU_KV_LMCACHE_VENV:-$HOME/.cache/pixiu-kv/lmcache-${LMCACHE_VERSION}}
PYTHON=${PYTHON:-python3}
CONTROLLER="$VENV/bin/lmcache_controller"

log() { printf 'provision-lmcache: %s\n' "$*" >&2; }

provision() {
    if [ -f "$VENV/.complete" ] && [ -x "$CONTROLLER" ]; then
        log "using $VENV"
        return
    fi
    log "building $VENV (lmcache==$LMCACHE_VERSION, torch==$TORCH_VERSION)"
    mkdir -p "$(dirname "$VENV")"
    # --clear: a venv left half-built by an interrupted run starts over.
    "$PYTHON" -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install -q -U pip >&2
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" >&2
    "$VENV/bin/python" -m pip install -q "lmcache==$LMCACHE_VERSION" >&2
    if [ ! -x "$CONTROLLER" ]; then
        log "lmcache installed but $CONTROLLER is missing"
        exit 1
    fi
    touch "$VENV/.complete"
    log "ready: $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV"
}

mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null 2>&1; then
    # Concurrent CI jobs on one machine must not build the same venv twice at once.
    exec 9>"$VENV.lock"
    flock 9
fi
provision
printf '%s\n' "$CONTROLLER"

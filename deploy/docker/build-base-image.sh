#!/usr/bin/env bash
# Build a Debian bookworm base image with python3 (3.11) and venv without any registry:
# debootstrap a minimal root file system, then `docker import` it. For hosts whose Docker
# cannot pull python:3.11-slim-bookworm; pass the result to the image build:
#
#   deploy/docker/build-base-image.sh warren-base:bookworm
#   WARREN_BASE_IMAGE=warren-base:bookworm docker compose build
#
# Idempotent: an image of that name already present is kept. Needs root and debootstrap
# (apt-get install debootstrap); the Debian mirror is the one apt uses on this host.
set -euo pipefail

name="${1:-warren-base:bookworm}"
suite=bookworm

if docker image inspect "$name" >/dev/null 2>&1; then
    echo "build-base-image: $name is already there"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "build-base-image: needs debootstrap" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "build-base-image: debootstrap needs root" >&2; exit 1; }

# The mirror apt uses here (deb822 sources first, then the one-line format); none found:
# debootstrap's own default.
mirror=""
if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
if [[ -z "$mirror" && -r /etc/apt/sources.list ]]; then
    mirror="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/warren-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
started=$SECONDS
echo "build-base-image: debootstrap $suite into $rootfs (about a minute)"
# python3-venv brings ensurepip's wheels: the image build makes its venv with them.
debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$rootfs" $mirror \
    >"$rootfs.log" 2>&1 || { tail -30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# What an image does not need: downloaded packages, package lists, docs, logs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
tar -C "$rootfs" --numeric-owner -c . \
    | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$name" >/dev/null
echo "build-base-image: $name built in $((SECONDS - started)) s"

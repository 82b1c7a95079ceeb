#!/usr/bin/env bash
# Build a local Debian base image with Python for the worker, without any registry:
# debootstrap a minimal bookworm root filesystem and `docker import` it.
#   docker/make-base-image.sh [TAG]        (default so8t-base:bookworm)
# Used where Docker Hub (and so nvidia/cuda) is unreachable: CI, air-gapped builders.
set -euo pipefail
tag=${1:-so8t-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,libgomp1,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import - "$tag" >/dev/null
echo "base image $tag imported"

#!/usr/bin/env bash
# Builds the Debian bookworm base image (python3.11 + CA certificates) from Debian packages with
# mmdebstrap and imports it into podman as $BASE_IMAGE. Use it where no image registry can be
# reached; elsewhere pass a public base (BASE=python:3.11-slim-bookworm) to build-image.sh.
# Cached by tag: does nothing when the image already exists (REBUILD=1 forces a new one).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ENGINE=podman
"$ROOT/scripts/install-container-tools.sh"

if [ -z "${REBUILD:-}" ] && podman image exists "$BASE_IMAGE"; then
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "bootstrapping $BASE_IMAGE from Debian packages (mmdebstrap) ..." >&2
# --variant=apt: only essential packages + apt; the package list is what the image runs on.
# Documentation, man pages and translations are left out (licences stay).
mmdebstrap --quiet --variant=apt \
    --include=python3.11,python3.11-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    bookworm "$tmp/base.tar"
podman import --quiet "$tmp/base.tar" "$BASE_IMAGE" >/dev/null
echo "built $BASE_IMAGE" >&2

#!/usr/bin/env bash
# Installs what building and running the image needs on a Debian/Ubuntu host, only when missing:
# podman + runc (the container engine; runc because crun cannot run in every sandbox) and
# mmdebstrap (bootstraps the Debian base image when no registry can be reached), and catatonit
# (the init of the pause container `podman play kube` builds locally for each pod).
# Needs root (apt-get); CI and developers run as root on this project's machines.
set -euo pipefail

missing=()
for tool in podman runc mmdebstrap catatonit; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "installing: ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install ${missing[*]} with your system's package manager" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
